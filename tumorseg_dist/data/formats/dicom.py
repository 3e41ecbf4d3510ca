"""`dicom`: one folder of DICOM files per series (one case), its label a NIfTI volume.

A series folder is a folder that directly holds DICOM files (`.dcm`, `.dicom`, `.ima`, or no
extension with the `DICM` signature). Its label is, in this order:
1. the one NIfTI file inside the series folder (`CASE/ct/*.dcm` + `CASE/ct/label.nii.gz`);
2. `SERIES.nii.gz` (or `SERIES_seg.nii.gz`, ...) beside it (`cases/P1/*.dcm` + `cases/P1.nii.gz`);
3. the one NIfTI file in the parent folder, when that holds no other series
   (`P1/ct/*.dcm` + `P1/label.nii.gz`); the case is then the parent (`P1`).
The label must be on the series' voxel grid (as dcm2niix, 3D Slicer and nnU-Net write it).
DICOM SEG and RTSTRUCT are not read: a case whose only label is one is refused with a message
saying how to convert it; folders of other non-image objects (RTDOSE, SR, ...) are left out.
The group is the case, so a case never spans two splits.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from .common import Item, Options, Problem, Scan
from .volumes import (LABEL_FIX, LABEL_SUFFIXES, NOT_IMAGES, case_keys, dcmread, dicom_kind, is_dicom_name,
                      nifti_stem, resolve_labels)


def _series(root: Path, files: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in files:
        if is_dicom_name(root, f):
            out.setdefault(PurePosixPath(f).parent.as_posix(), []).append(f)
    return out


def _kind(root: Path, f: str) -> str:
    """The one header read at scan time: a SEG, RTSTRUCT, RTDOSE, ... folder is not an image series."""
    try:
        ds = dcmread(root / f, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
    except Exception:   # an unreadable file is reported by the worker that reads the series
        return ""
    return dicom_kind(ds)


def _niftis_in(files_by_dir: dict[str, list[str]], d: str) -> list[str]:
    return [f for f in files_by_dir.get(d, []) if nifti_stem(PurePosixPath(f).name)]


def _pairs(root: Path, files: list[str]):
    series = _series(root, files)
    kinds = {d: _kind(root, sorted(fs)[0]) for d, fs in series.items()}
    segs = {d for d, k in kinds.items() if k in NOT_IMAGES}
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(PurePosixPath(f).parent.as_posix(), []).append(f)
    images = {d: fs for d, fs in series.items() if d not in segs}
    per_parent: dict[str, int] = {}
    for d in images:
        per_parent[PurePosixPath(d).parent.as_posix()] = per_parent.get(PurePosixPath(d).parent.as_posix(), 0) + 1
    pairs, missing, claimed = [], [], set()
    for d, fs in sorted(images.items()):
        p = PurePosixPath(d)
        parent = p.parent.as_posix()
        inside = _niftis_in(by_dir, d)
        beside = [f for f in _niftis_in(by_dir, parent)
                  if nifti_stem(PurePosixPath(f).name) in {p.name, *(p.name + s for s in LABEL_SUFFIXES)}]
        above = _niftis_in(by_dir, parent)
        if len(inside) == 1:
            lab, case = inside[0], d if d != "." else root.name
        elif len(beside) == 1:
            lab, case = beside[0], d
        elif per_parent[parent] == 1 and len(above) == 1 and parent != ".":
            lab, case = above[0], parent
        else:
            missing.append((d, sorted(fs), inside, [s for s in segs if PurePosixPath(s).parent.as_posix() in
                                                    (parent, d)]))
            continue
        pairs.append((d, sorted(fs), lab, case))
        claimed.add(lab)
    return pairs, missing, segs, series, kinds


def detect(root: Path, files: list[str]) -> str | None:
    series = _series(root, files)
    if not series:
        return None
    pairs = _pairs(root, files)[0]
    if not pairs:
        return None
    n = sum(len(fs) for _, fs, _, _ in pairs)
    return f"folders of DICOM files with a NIfTI label beside them ({len(pairs)} series, {n} DICOM files)"


def scan(root: Path, files: list[str], opts: Options) -> Scan:
    pairs, missing, segs, series, kinds = _pairs(root, files)
    labels = resolve_labels(opts.labels, None, "--format dicom", classes=opts.classes)
    items = [Item("", d, [lab], group=case, volume={"reader": "dicom", "case": case, "files": fs, "labels": labels})
             for d, fs, lab, case in pairs]
    problems = []
    for d, fs, inside, seg_dirs in missing:
        labels_like = [x for x in seg_dirs if kinds[x] in LABEL_FIX]
        if labels_like:
            x = labels_like[0]
            problems.append(Problem(sorted(series[x])[0], f"is {NOT_IMAGES[kinds[x]]}, the only label of series {d}/",
                                    LABEL_FIX[kinds[x]]))
        elif len(inside) > 1:
            problems.append(Problem(d, f"holds {len(inside)} NIfTI files ({', '.join(inside[:3])}); "
                                       f"cannot tell which one is the label", "keep one label volume per series"))
        else:
            name = PurePosixPath(d).name
            problems.append(Problem(d, f"is a DICOM series ({len(fs)} files) without a label volume (looked for "
                                       f"one .nii.gz inside it, {name}.nii.gz beside it, or one .nii.gz in its "
                                       f"parent folder)", "add the label volume or remove the series"))
    case_keys(items)
    used = {f for it in items for f in [*it.volume["files"], *it.mask_sources]}
    used |= {f for d, fs, _, _ in missing for f in fs}
    ignored_segs = sorted(d for d in segs if not any(d in m[3] for m in missing))
    used |= {f for d in ignored_segs for f in series[d]}
    notes = ["pairs: a DICOM series folder + its NIfTI label (inside it, SERIES.nii.gz beside it, or the one "
             "in its parent)",
             "labels: " + ("any non-zero value is tumour" if labels["foreground"] is None
                           else f"tumour = {labels['foreground']}"),
             f"groups: the case ({len(items)} cases)"]
    if ignored_segs:
        shown = ", ".join(f"{d} ({kinds[d]})" for d in ignored_segs[:5])
        notes.append(f"DICOM folder(s) that are not image series, not read: {shown}")
    return Scan(items, problems, [f for f in files if f not in used], notes,
                extra_files=sorted(f for it in items for f in it.volume["files"]))
