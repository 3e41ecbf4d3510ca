"""`nifti`: image/label volume pairs (`.nii.gz` or `.nii`) matched by name.

Two rules, tried on every NIfTI file:
* folders: `.../images/X.nii.gz` + `.../labels/X.nii.gz`: the same relative path with one folder
  from IMAGE_DIRS replaced by one from LABEL_DIRS (MSD's `imagesTr/` + `labelsTr/` among them);
* suffix: `X.nii.gz` + `X_seg.nii.gz` side by side, the suffix one of LABEL_SUFFIXES.
The case is the image's path without the images folder and the extension (`liver_3`,
`P001/ct`); it is the group, so a case never spans two splits (several volumes of one patient:
`--groups FILE.csv`).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from .common import Item, Options, Problem, Scan
from .volumes import IMAGE_DIRS, LABEL_DIRS, LABEL_SUFFIXES, case_keys, nifti_stem, resolve_labels


def _role(parts: tuple[str, ...]) -> tuple[str, tuple, str] | None:
    """("image" | "label", key, case) when a folder on the path is an images or labels folder
    (the last such folder counts); the key is the same for an image and its label."""
    for i in range(len(parts) - 2, -1, -1):
        low = parts[i].lower()
        role = "image" if low in IMAGE_DIRS else "label" if low in LABEL_DIRS else None
        if role:
            rest = PurePosixPath(*parts[:i], *parts[i + 1:])
            case = (rest.parent / nifti_stem(rest.name)).as_posix().removeprefix("./")
            return role, (parts[:i], tuple(p.lower() for p in parts[i + 1:-1]), nifti_stem(parts[-1])), case
    return None


def _unlabelled(f: str) -> bool:
    """MSD's and nnU-Net's test images (`imagesTs/`) come without labels: not cases, not errors."""
    return any(part.lower() == "imagests" for part in PurePosixPath(f).parts[:-1])


def _pairs(files: list[str]) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """(image, label, case) pairs, images without a label, labels without an image."""
    nii = [f for f in files if nifti_stem(PurePosixPath(f).name) and not _unlabelled(f)]
    pairs, claimed, labels = [], set(), set()
    by_key: dict[tuple, dict[str, list[tuple[str, str]]]] = {}
    for f in nii:   # folder rule
        r = _role(PurePosixPath(f).parts)
        if r:
            by_key.setdefault(r[1], {}).setdefault(r[0], []).append((f, r[2]))
            if r[0] == "label":
                labels.add(f)
    for roles in by_key.values():
        if roles.get("image") and roles.get("label"):
            (img, case), (lab, _) = roles["image"][0], roles["label"][0]
            pairs.append((img, lab, case))
            claimed.update((img, lab))
    stems = {}
    for f in nii:
        p = PurePosixPath(f)
        stems.setdefault((p.parent.as_posix(), nifti_stem(p.name)), []).append(f)
    for f in nii:   # suffix rule
        if f in claimed:
            continue
        p = PurePosixPath(f)
        stem = nifti_stem(p.name)
        suf = next((x for x in LABEL_SUFFIXES if stem.lower().endswith(x) and len(stem) > len(x)), None)
        if suf is None:
            continue
        labels.add(f)
        hits = [h for h in stems.get((p.parent.as_posix(), stem[:-len(suf)]), []) if h not in claimed]
        if hits:
            pairs.append((hits[0], f, (p.parent / stem[:-len(suf)]).as_posix().removeprefix("./")))
            claimed.update((hits[0], f))
    orphans = sorted(f for f in nii if f not in claimed and f not in labels)
    lonely = sorted(f for f in labels if f not in claimed)
    return sorted(pairs), orphans, lonely


def detect(root: Path, files: list[str]) -> str | None:
    pairs, _, _ = _pairs(files)
    if not pairs:
        return None
    return (f"NIfTI volume pairs by name (images/X.nii.gz + labels/X.nii.gz or X.nii.gz + X_seg.nii.gz: "
            f"{len(pairs)} pairs)")


def scan(root: Path, files: list[str], opts: Options) -> Scan:
    pairs, orphans, lonely = _pairs(files)
    labels = resolve_labels(opts.labels, None, "--format nifti", classes=opts.classes)
    items = [Item("", img, [lab], group=case, volume={"reader": "nifti", "case": case, "labels": labels})
             for img, lab, case in pairs]
    problems = [Problem(f, "is a volume without a label (looked for labels/ beside its folder and for "
                           f"{LABEL_SUFFIXES[0]}, {', '.join(LABEL_SUFFIXES[1:])} beside it)",
                        "add the label or remove the volume") for f in orphans]
    problems += [Problem(f, "is a label without an image volume", "add the image or remove the label")
                 for f in lonely]
    case_keys(items)
    used = {f for it in items for f in [it.source, *it.mask_sources]} | set(orphans) | set(lonely)
    test = [f for f in files if nifti_stem(PurePosixPath(f).name) and _unlabelled(f)]
    notes = ["pairs: images/X + labels/X (folder names as in docs/pack.md) or X + X_seg (_label, _mask, _gt) "
             "beside it",
             "labels: " + ("any non-zero value is tumour" if labels["foreground"] is None
                           else f"tumour = {labels['foreground']}"),
             f"groups: the case ({len(items)} cases)"]
    if test:
        notes.append(f"imagesTs/: {len(test)} volume(s) without labels, not packed")
    return Scan(items, problems, [f for f in files if f not in used], notes)
