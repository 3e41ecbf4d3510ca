"""`suffix`: `X.ext` + `X_mask.ext` side by side, at any depth (LGG `.tif`, BUSI `.png`).

Extra masks `X_mask_1.ext`, `X_mask_2.ext` belong to the same image and are united. The mask
may have another image extension than the image. Groups (`--groups auto`): a folder whose
images are all named `<folder>_<number>` is one case (LGG `TCGA_CS_4941_19960909/
TCGA_CS_4941_19960909_7.tif`), so its slices stay in one split; otherwise every image is its
own group (BUSI's `benign/` is a class, not a patient).
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from .classes import assign_by_path, parse_classes
from .common import Item, LayoutError, Options, Problem, Scan, assign_keys, claim_masks, is_image_name


def _split_names(files: list[str], suffix: str):
    pat = re.compile(rf"(.*){re.escape(suffix)}(_\d+)?")
    images, masks = [], {}
    for f in files:
        if not is_image_name(f):
            continue
        p = PurePosixPath(f)
        m = pat.fullmatch(p.stem)
        if m and m.group(1):
            masks.setdefault((p.parent / m.group(1)).as_posix(), []).append(f)
        else:
            images.append(f)
    return images, masks


def detect(root: Path, files: list[str], suffix: str = "_mask") -> str | None:
    images, masks = _split_names(files, suffix)
    paired = [i for i in images if PurePosixPath(i).with_suffix("").as_posix() in masks]
    if not paired:
        return None
    dirs = {PurePosixPath(i).parent.as_posix() for i in paired}
    return (f"image files with a '{suffix}' partner beside them (X.ext + X{suffix}.ext: "
            f"{len(paired)} pairs in {len(dirs)} folder(s))")


def scan(root: Path, files: list[str], opts: Options) -> Scan:
    if not opts.mask_suffix:
        raise LayoutError("--mask-suffix must not be empty for --format suffix (e.g. _mask)")
    images, masks = _split_names(files, opts.mask_suffix)
    items, problems, used = [], [], set()
    for img, found in claim_masks(images, masks, lambda i: PurePosixPath(i).with_suffix("").as_posix()):
        base = PurePosixPath(img).with_suffix("").as_posix()
        used.add(img)
        if not found:
            problems.append(Problem(img, f"has no mask (looked for {base}{opts.mask_suffix}.* beside it)",
                                    "add the mask or remove the image"))
            continue
        used.update(found)
        items.append(Item("", img, found))
    for base, ms in sorted(masks.items()):
        for m in ms:
            used.add(m)
            problems.append(Problem(m, f"is a mask without an image (looked for {base}.* beside it)",
                                    "add the image or remove the mask"))
    notes = [f"pairs: X.ext + X{opts.mask_suffix}.ext (+ X{opts.mask_suffix}_N.ext, united)"]
    notes.append(_groups(items))
    notes += assign_by_path(items, parse_classes(opts.classes))
    assign_keys(items)
    return Scan(items, problems, [f for f in files if f not in used], notes)


def _groups(items: list[Item]) -> str:
    by_dir: dict[str, list[Item]] = {}
    for it in items:
        by_dir.setdefault(PurePosixPath(it.source).parent.as_posix(), []).append(it)
    cases = []
    for d, its in by_dir.items():
        name = PurePosixPath(d).name
        if name and all(re.fullmatch(rf"{re.escape(name)}_\d+", PurePosixPath(i.source).stem) for i in its):
            cases.append(name)
            for it in its:
                it.group = name
    if cases:
        return (f"groups: {len(cases)} case folder(s) whose files are <folder>_<n> "
                f"(e.g. {sorted(cases)[0]}); one group each")
    return "groups: none in the layout; every image is its own group"
