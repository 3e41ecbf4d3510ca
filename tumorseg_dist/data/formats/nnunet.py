"""`nnunet`: an nnU-Net v2 raw dataset folder.

`dataset.json` + `imagesTr/CASE_0000{file_ending}` (one file per channel, `_0000`, `_0001`, ...)
+ `labelsTr/CASE{file_ending}`. `file_ending` `.nii.gz`/`.nii` are volumes, sliced along --axis;
`.png`/`.bmp`/`.tif` is nnU-Net's 2D variant, one sample per case. `imagesTs/` has no labels and
is not packed. The group is the case, so one case never spans two splits.
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from .common import Item, LayoutError, Options, Problem, Scan
from .volumes import IMAGE2D_EXTS, NIFTI_EXTS, case_keys, resolve_labels

_CHANNEL = re.compile(r"(.+)_(\d{4})")


def _datasets(files: list[str]) -> list[str]:
    """Folders holding dataset.json with imagesTr/ and labelsTr/ beside it ("" = INPUT)."""
    have = set(files)
    out = []
    for f in files:
        p = PurePosixPath(f)
        if p.name != "dataset.json":
            continue
        base = p.parent.as_posix()
        pre = "" if base == "." else base + "/"
        if any(x.startswith(pre + "imagesTr/") for x in have) and any(x.startswith(pre + "labelsTr/") for x in have):
            out.append("" if base == "." else base)
    return out


def _channel_files(files: list[str], base: str) -> list[str]:
    pre = f"{base}/imagesTr/" if base else "imagesTr/"
    return [f for f in files if f.startswith(pre) and "/" not in f[len(pre):]]


def detect(root: Path, files: list[str]) -> str | None:
    found = []
    for base in _datasets(files):
        imgs = [f for f in _channel_files(files, base) if _CHANNEL.fullmatch(_stem(PurePosixPath(f).name))]
        if imgs:
            found.append((base, len(imgs)))
    if not found:
        return None
    base, n = found[0]
    return (f"dataset.json with imagesTr/ (CASE_0000 channel files: {n}) and labelsTr/ (an nnU-Net raw dataset"
            + (f" in {base}/" if base else "") + (f"; {len(found)} datasets" if len(found) > 1 else "") + ")")


def _stem(name: str) -> str:
    low = name.lower()
    for ext in (*NIFTI_EXTS, *IMAGE2D_EXTS):
        if low.endswith(ext):
            return name[:-len(ext)]
    return name


def _read_json(root: Path, path: str) -> dict:
    try:
        ds = json.loads((root / path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"{path}: cannot be read as JSON ({e}); fix dataset.json") from e
    if not isinstance(ds, dict):
        raise LayoutError(f"{path}: is not a JSON object; fix dataset.json")
    return ds


def _declared_labels(ds: dict, path: str) -> dict[str, int]:
    labels = ds.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise LayoutError(f"{path}: has no 'labels' (nnU-Net v2: {{\"background\": 0, \"tumour\": 1}}); fix dataset.json")
    out = {}
    for k, v in labels.items():
        if isinstance(v, int) and not isinstance(v, bool):
            out[k] = v                    # v2: name -> value
        elif str(k).isdigit() and isinstance(v, str):
            out[v] = int(k)               # v1 (MSD): "value" -> name
        else:
            raise LayoutError(f"{path}: label {k!r}: {v!r} is a region (a list of values), which pack does not "
                              f"map; give the values that are tumour with --labels (e.g. --labels 1,2)")
    return {k: v for k, v in out.items() if v != 0}


def scan(root: Path, files: list[str], opts: Options) -> Scan:
    bases = _datasets(files)
    if not bases:
        raise LayoutError(f"no nnU-Net dataset under {root}: expected dataset.json with imagesTr/ and labelsTr/ "
                          f"beside it")
    if len(bases) > 1:
        raise LayoutError(f"{root} holds {len(bases)} nnU-Net datasets ({', '.join(b or '.' for b in bases)}); "
                          f"give one dataset folder as INPUT")
    base = bases[0]
    pre = f"{base}/" if base else ""
    ds_path = f"{pre}dataset.json"
    ds = _read_json(root, ds_path)
    ending = ds.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise LayoutError(f"{ds_path}: has no file_ending (e.g. \".nii.gz\" or \".png\"); fix dataset.json")
    low = ending.lower()
    if low in NIFTI_EXTS:
        reader = "nifti"
    elif low in IMAGE2D_EXTS:
        reader = "image2d"
    else:
        raise LayoutError(f"{ds_path}: file_ending {ending} is not read by pack: use .nii.gz/.nii volumes or "
                          f"2D .png/.bmp/.tif (convert the dataset, e.g. with nnU-Net's own conversion scripts)")
    channels = ds.get("channel_names") or ds.get("modality") or {"0": "image"}
    n_chan = len(channels)
    declared = _declared_labels(ds, ds_path)
    labels = resolve_labels(opts.labels, declared, ds_path, classes=opts.classes)
    cases: dict[str, dict[int, str]] = {}
    problems, used = [], {ds_path}
    for f in _channel_files(files, base):
        name = PurePosixPath(f).name
        if not name.lower().endswith(low):
            continue
        m = _CHANNEL.fullmatch(name[:-len(ending)])
        if not m:
            used.add(f)
            problems.append(Problem(f, f"is not named CASE_NNNN{ending} (the channel number is missing)",
                                    "rename it to CASE_0000" + ending))
            continue
        cases.setdefault(m.group(1), {})[int(m.group(2))] = f
        used.add(f)
    label_pre = f"{pre}labelsTr/"
    label_files = {f[len(label_pre):-len(ending)]: f for f in files
                   if f.startswith(label_pre) and f.lower().endswith(low) and "/" not in f[len(label_pre):]}
    items = []
    for case, chans in sorted(cases.items()):
        first = chans[min(chans)]
        missing = [k for k in range(n_chan) if k not in chans]
        if missing and not (reader == "image2d" and list(chans) == [0]):   # one RGB file holds 3 channels
            problems.append(Problem(first, f"case {case} lacks channel(s) {', '.join(f'{k:04d}' for k in missing)} "
                                           f"of the {n_chan} in dataset.json's channel_names",
                                    f"add imagesTr/{case}_{missing[0]:04d}{ending} or remove the case"))
            continue
        extra = [k for k in chans if k >= n_chan]
        if extra:
            problems.append(Problem(chans[extra[0]], f"is channel {extra[0]:04d} but dataset.json lists {n_chan}",
                                    "fix channel_names in dataset.json or remove the file"))
            continue
        lab = label_files.pop(case, None)
        if lab is None:
            problems.append(Problem(first, f"case {case} has no label (looked for {label_pre}{case}{ending})",
                                    "add the label or remove the case's images"))
            continue
        used.add(lab)
        srcs = [chans[k] for k in sorted(chans)]
        items.append(Item("", srcs[0], [lab], group=case,
                          volume={"reader": reader, "case": case, "channels": srcs, "labels": labels}))
    for case, lab in sorted(label_files.items()):
        used.add(lab)
        problems.append(Problem(lab, f"is a label without images (looked for {pre}imagesTr/{case}_0000{ending})",
                                "add the images or remove the label"))
    case_keys(items)
    test = [f for f in files if f.startswith(f"{pre}imagesTs/")]
    notes = [f"cases: {pre}imagesTr/CASE_NNNN{ending} ({n_chan} channel(s)) + {label_pre}CASE{ending}; "
             + ("2D images, one sample per case" if reader == "image2d" else "volumes, sliced along --axis"),
             f"labels: {_label_note(labels, declared)}",
             f"groups: the case ({len(items)} cases)"]
    if test:
        notes.append(f"imagesTs/: {len(test)} file(s) without labels, not packed")
    # dataset.json decides the labels and channels, so it is part of the fingerprint
    return Scan(items, problems, [f for f in files if f not in used], notes, extra_files=[ds_path])


def _label_note(labels: dict, declared: dict[str, int]) -> str:
    named = ", ".join(f"{k}={v}" for k, v in declared.items())
    if labels["foreground"] is None:
        return (f"any non-zero value is tumour (dataset.json declares {named}; --labels NAME picks some)")
    return f"tumour = {labels['foreground']} (dataset.json declares {named})"
