"""`folders`: `ROOT/<images dir>/<name>` + `ROOT/<masks dir>/<name>`, matched by relative path.

The two folders are siblings with names like `images/`+`masks/` or `data/`+`mask/` (any depth,
any extra nesting below them, e.g. `data/temp/1.png` + `mask/temp/1.png`), or given with
`--images-dir/--masks-dir`. A mask may have another extension than its image (`1.jpg` +
`1.png`) or carry the mask suffix (`1.png` + `1_mask.png`). Several pairs of folders under
`train/`, `val/`, `test/` parents keep those splits.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from .classes import assign_by_path, parse_classes
from .common import (Item, LayoutError, Options, Problem, Scan, SPLIT_NAMES, assign_keys, claim_masks,
                     is_image_name)

IMAGE_DIRS = {"image", "images", "img", "imgs", "data", "input", "inputs", "x", "scans", "slices"}
MASK_DIRS = {"mask", "masks", "label", "labels", "gt", "ground_truth", "groundtruth", "annotation",
             "annotations", "y", "seg", "segmentation", "segmentations", "target", "targets"}


def _dirs(files: list[str]) -> set[str]:
    out = set()
    for f in files:
        p = PurePosixPath(f).parent
        while p.as_posix() != ".":
            out.add(p.as_posix())
            p = p.parent
    return out


def _under(files: list[str], d: str) -> list[str]:
    prefix = d.rstrip("/") + "/"
    return [f[len(prefix):] for f in files if f.startswith(prefix) and is_image_name(f)]


def find_pairs(files: list[str]) -> list[tuple[str, str]]:
    """Sibling (images dir, masks dir) pairs that both hold image files."""
    dirs = _dirs(files)
    by_parent: dict[str, list[str]] = {}
    for d in dirs:
        by_parent.setdefault(PurePosixPath(d).parent.as_posix(), []).append(d)
    pairs = []
    for parent, kids in sorted(by_parent.items()):
        imgs = sorted(k for k in kids if PurePosixPath(k).name.lower() in IMAGE_DIRS)
        msks = sorted(k for k in kids if PurePosixPath(k).name.lower() in MASK_DIRS)
        if len(imgs) == 1 and len(msks) == 1 and _under(files, imgs[0]) and _under(files, msks[0]):
            pairs.append((imgs[0], msks[0]))
    return pairs


def detect(root: Path, files: list[str]) -> str | None:
    pairs = find_pairs(files)
    if not pairs:
        return None
    desc = ", ".join(f"{i}/ + {m}/" for i, m in pairs)
    n = sum(len(_under(files, i)) for i, _ in pairs)
    return f"image folder + mask folder with matching file names ({desc}; {n} images)"


def _mask_base(stem: str, suffix: str) -> str:
    m = re.fullmatch(rf"(.*){re.escape(suffix)}(_\d+)?", stem) if suffix else None
    return m.group(1) if m else stem


def scan(root: Path, files: list[str], opts: Options) -> Scan:
    if opts.images_dir or opts.masks_dir:
        if not (opts.images_dir and opts.masks_dir):
            raise LayoutError("--images-dir and --masks-dir go together; give both")
        pairs = []
        for d in (opts.images_dir, opts.masks_dir):
            p = (root / d).resolve()
            if not p.is_dir():
                raise LayoutError(f"{p} is not a folder: --images-dir/--masks-dir are relative to INPUT ({root})")
            try:
                p.relative_to(root.resolve())
            except ValueError:
                raise LayoutError(f"{d} is outside INPUT ({root}); give folders inside it") from None
            pairs.append(p.relative_to(root.resolve()).as_posix())
        pairs = [tuple(pairs)]
    else:
        pairs = find_pairs(files)
        if not pairs:
            raise LayoutError(f"no image folder + mask folder pair found under {root} (looked for sibling folders "
                              f"named one of {sorted(IMAGE_DIRS)} and one of {sorted(MASK_DIRS)}); "
                              f"name them with --images-dir D --masks-dir D")
    parents = [PurePosixPath(i).parent.name.lower() for i, _ in pairs]
    given = len(pairs) > 1 and all(p in SPLIT_NAMES for p in parents)
    if len(pairs) > 1 and not given:
        raise LayoutError("several image/mask folder pairs found: "
                          + ", ".join(f"{i}/ + {m}/" for i, m in pairs)
                          + "; choose one with --images-dir D --masks-dir D")
    items, problems, used = [], [], set()
    for (idir, mdir), parent in zip(pairs, parents):
        masks: dict[str, list[str]] = {}
        for m in _under(files, mdir):
            p = PurePosixPath(m)
            masks.setdefault((p.parent / _mask_base(p.stem, opts.mask_suffix)).as_posix(), []).append(m)
        for img, found in claim_masks(_under(files, idir), masks,
                                      lambda i: PurePosixPath(i).with_suffix("").as_posix()):
            base = PurePosixPath(img).with_suffix("").as_posix()
            src = f"{idir}/{img}"
            used.add(src)
            if not found:
                problems.append(Problem(src, f"has no mask in {mdir}/ (looked for {base}.* there)",
                                        "add the mask or remove the image"))
                continue
            used.update(f"{mdir}/{m}" for m in found)
            items.append(Item("", src, [f"{mdir}/{m}" for m in found],
                              split=SPLIT_NAMES[parent] if given else None))
        for base, ms in sorted(masks.items()):
            for m in ms:
                used.add(f"{mdir}/{m}")
                problems.append(Problem(f"{mdir}/{m}", f"is a mask without an image in {idir}/ "
                                        f"(looked for {base}.*)", "add the image or remove the mask"))
    assign_keys(items)
    ignored = [f for f in files if f not in used]
    notes = [f"pairs: {i}/X + {m}/X (same relative path, any image extension)" for i, m in pairs]
    notes += assign_by_path(items, parse_classes(opts.classes))
    if given:
        notes.append("splits: given by the parent folders (" + ", ".join(sorted(set(parents))) + ")")
    return Scan(items, problems, ignored, notes, given_splits=given)
