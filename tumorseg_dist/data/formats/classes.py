"""`pack --classes`: what the source says -> class ids, and how overlapping classes combine.

`--classes KEY=ID,...` (ID 0 = background, foreground ids 1..K-1 without gaps). What KEY means
depends on the format:

* folders / suffix: a folder name on the mask's (or its image's) path, else the start of its
  file name (`benign=1,malignant=2` for BUSI's `benign/benign (3)_mask.png`); a KEY with
  `*`, `?` or `[` is a glob on the path relative to INPUT;
* coco: a category name, or `id:N` for a category id;
* volumes (nnunet, nifti, dicom): a label value, or (nnunet) a label name from dataset.json.

With K = 2 classes in total (one foreground class) the mask stays binary (0/255); with K > 2 it
is an 8-bit label PNG holding the class ids. Where two classes claim a pixel, `--overlap`
decides: `last` (the one drawn last: later mask file / annotation wins), `first`, or `error`.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from .common import LayoutError, PackInputError

BACKGROUND = "background"
OVERLAPS = ("last", "first", "error")
MAX_ID = 254   # ids fit a uint8 label PNG; 255 is left free for an ignore label


@dataclass(frozen=True)
class ClassSpec:
    """A parsed `--classes`: (KEY, ID) pairs in the order given."""

    text: str
    entries: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        """K: the classes including background."""
        return max(i for _, i in self.entries) + 1

    @property
    def labels(self) -> bool:
        """Whether the mask member holds class ids (K > 2) rather than 0/255."""
        return self.total > 2

    def names(self, name_of=lambda key: key) -> list[str]:
        """Class names by id: background, then each id's KEY names joined by '+'."""
        out = [BACKGROUND] + [""] * (self.total - 1)
        for key, i in self.entries:
            if i:
                out[i] = f"{out[i]}+{name_of(key)}" if out[i] else name_of(key)
        return out


def parse_classes(text: str | None) -> ClassSpec | None:
    """`benign=1,malignant=2`; None stays None (binary masks, the default)."""
    if text is None:
        return None
    entries, seen = [], set()
    for part in (p.strip() for p in text.split(",")):
        key, eq, value = part.rpartition("=")
        key = key.strip()
        if not eq or not key or not value.strip().isdigit():
            raise ValueError(f"--classes {text!r}: {part!r} is not KEY=ID; give e.g. benign=1,malignant=2 "
                             f"(ID 0 = background)")
        if key in seen:
            raise ValueError(f"--classes {text!r}: {key!r} is given twice; give each KEY once")
        if int(value) > MAX_ID:
            raise ValueError(f"--classes {text!r}: class id {value} is above {MAX_ID} (ids are 8-bit)")
        seen.add(key)
        entries.append((key, int(value)))
    ids = sorted({i for _, i in entries if i})
    if not ids:
        raise ValueError(f"--classes {text!r}: no foreground class (every id is 0); give ids 1, 2, ...")
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"--classes {text!r}: class ids must be 1..{len(ids)} without gaps (got {ids}); "
                         f"renumber them")
    return ClassSpec(text, tuple(entries))


def check_options(spec: ClassSpec | None, overlap: str) -> None:
    if overlap not in OVERLAPS:
        raise ValueError(f"--overlap {overlap!r}: use one of {', '.join(OVERLAPS)}")


# ---------------------------------------------------------------- folders / suffix: by path

def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def _matches(key: str, path: str) -> tuple[int, bool]:
    """(strength, matched): a glob or a folder on the path (2) beats a file-name prefix (1)."""
    p = PurePosixPath(path)
    if _is_glob(key):
        return 2, fnmatch.fnmatchcase(path, key) or fnmatch.fnmatchcase(p.name, key)
    k = key.lower()
    if any(part.lower() == k for part in p.parent.parts):
        return 2, True
    name = p.name.lower()
    return 1, name.startswith(k) and (len(name) == len(k) or not name[len(k)].isalnum())


def class_of_path(spec: ClassSpec, path: str) -> int | None:
    """The class id of a mask file from its path; None if no KEY matches. Two KEYs of different
    ids matching equally well is bad input (named, with the fix)."""
    best: dict[int, set[int]] = {}
    for key, i in spec.entries:
        strength, ok = _matches(key, path)
        if ok:
            best.setdefault(strength, set()).add(i)
    if not best:
        return None
    ids = best[max(best)]
    if len(ids) > 1:
        keys = [k for k, i in spec.entries if i in ids and _matches(k, path)[1]]
        raise LayoutError(f"{path}: matches several classes of --classes {spec.text} ({', '.join(keys)}); "
                          f"make the KEYs name distinct folders or file-name starts, or use globs")
    return ids.pop()


def assign_by_path(items, spec: ClassSpec | None) -> list[str]:
    """Set `item.classes` (one id per mask source) for a folders/suffix scan; returns notes.
    A mask that no KEY matches, or a KEY that matches nothing, is a LayoutError naming it."""
    if spec is None:
        return []
    used: dict[str, int] = {k: 0 for k, _ in spec.entries}
    unmatched = None
    for it in items:
        ids = []
        for m in it.mask_sources:
            i = class_of_path(spec, m)
            if i is None:
                i = class_of_path(spec, it.source)
            if i is None:
                unmatched = unmatched or m
                continue
            ids.append(i)
            for k, j in spec.entries:
                if j == i and (_matches(k, m)[1] or _matches(k, it.source)[1]):
                    used[k] += 1
        it.classes = ids
    unused = [k for k, n in used.items() if n == 0]
    if unused:   # first: a misspelt KEY also leaves its masks unmatched
        raise LayoutError(f"--classes {spec.text}: {unused[0]!r} matches no mask under INPUT (neither a "
                          f"folder on a mask's path nor the start of a file name); fix the name or leave it out")
    if unmatched is not None:
        folder = PurePosixPath(unmatched).parent.as_posix()
        raise LayoutError(f"{unmatched}: matches no class of --classes {spec.text} (by folder {folder!r} or "
                          f"file name); add a KEY for it (e.g. {PurePosixPath(folder).name or 'NAME'}=0 for "
                          f"background) or remove the folder from INPUT")
    names = spec.names()
    return [f"classes: {', '.join(f'{i}={n}' for i, n in enumerate(names))} (by folder or file name; "
            f"{'label PNG masks' if spec.labels else 'binary masks'})"]


# ---------------------------------------------------------------- combining per-class masks

def paint(layers: list[tuple[int, np.ndarray]], total: int, overlap: str, source: str) -> tuple[np.ndarray, int]:
    """Per-source (class id, bool mask) layers, in drawing order -> (the mask, conflicting pixels).

    K > 2: a uint8 label map; K = 2: a bool mask of class 1. A pixel claimed by two different
    foreground classes is a conflict: `last` keeps the later layer, `first` the earlier,
    `error` refuses the sample. Background layers (id 0) claim nothing."""
    shape = layers[0][1].shape if layers else (0, 0)
    out = np.zeros(shape, dtype=np.uint8)
    conflicts = 0
    for cid, m in layers:
        if cid == 0:
            continue
        clash = m & (out != 0) & (out != cid)
        n = int(clash.sum())
        if n and overlap == "error":
            a, b = sorted({int(v) for v in np.unique(out[clash])} | {cid})[:2]
            raise PackInputError(source, f"{n} pixel(s) are claimed by classes {a} and {b}",
                                 "fix the overlapping masks/annotations or pass --overlap last|first")
        conflicts += n
        out[m & ((out == 0) if overlap == "first" else True)] = cid
    if total <= 2:
        return out == 1, conflicts
    return out, conflicts


def counts(mask: np.ndarray, total: int) -> list[int]:
    """Pixels per class id of a packed mask (bool: [background, class 1])."""
    m = np.asarray(mask)
    m = m.astype(np.uint8) if m.dtype == bool else m
    return [int(v) for v in np.bincount(m.ravel(), minlength=total)[:total]]


class ClassCounts:
    """manifest.json's per-split pixel and image counts per class (images: those with at least
    one pixel of the class), summed as samples are written."""

    def __init__(self, total: int, splits):
        self.total = total
        self.pixels = {sp: [0] * total for sp in splits}
        self.images = {sp: [0] * total for sp in splits}
        self.conflicts = 0

    def add(self, split: str, pixels: list[int], conflicts: int = 0) -> None:
        for i, n in enumerate(pixels):
            self.pixels[split][i] += n
            self.images[split][i] += int(n > 0)
        self.conflicts += conflicts

    def record(self, spec: ClassSpec, names: list[str], overlap: str) -> dict:
        return {"names": names, "ids": {n: i for i, n in enumerate(names)}, "mapping": spec.text,
                "mask": "label" if spec.labels else "binary", "overlap": overlap,
                "overlap_pixels": self.conflicts, "pixels": self.pixels, "images": self.images}


def merge_records(records: list[dict]) -> dict:
    """The `classes` record of a Slurm merge: the parts' counts summed."""
    out = {**records[0], "overlap_pixels": sum(r["overlap_pixels"] for r in records)}
    for key in ("pixels", "images"):
        out[key] = {sp: [sum(v) for v in zip(*(r[key][sp] for r in records))] for sp in records[0][key]}
    return out
