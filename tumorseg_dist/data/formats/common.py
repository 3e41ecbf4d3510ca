"""What every format shares: the work item, the input error, the file walk, image/mask reading.

A format's `scan()` only looks at names (cheap, main process) and returns `Item`s: the paths of
one image and its mask source(s). Decoding happens later, in `load_item`, in worker processes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from ... import imageio
from ...imageio import IMAGE_EXTS, JPEG_EXTS, TIFF_EXTS  # noqa: F401 - the formats' names
from ..shards import safe_key


class PackInputError(ValueError):
    """A problem with one input file or pair: names the file, says what is wrong and the fix."""

    def __init__(self, source: str, reason: str, fix: str = ""):
        self.source, self.reason, self.fix = source, reason, fix
        super().__init__(f"{source}: {reason}" + (f"; {fix}" if fix else ""))


class LayoutError(ValueError):
    """The input as a whole does not fit the format (or no format): not skippable."""


@dataclass
class Problem:
    """A scan-time problem (image without mask, ...): fatal with --on-error fail, else skipped."""

    source: str
    reason: str
    fix: str = ""

    def error(self) -> PackInputError:
        return PackInputError(self.source, self.reason, self.fix)


@dataclass
class Item:
    """One sample to pack, before decoding. Paths are POSIX, relative to the input root."""

    key: str
    source: str                          # the image
    mask_sources: list[str]              # mask files (union / fused), or the COCO json
    group: str | None = None
    split: str | None = None             # given split (COCO) or assigned later
    fusion: str = "any"                  # any | majority | reader:K (over mask_sources)
    coco: dict | None = None             # {"height", "width", "segmentations": [...]}
    volume: dict | None = None           # a volume case: {"reader", "case", "channels", "files", "labels"}
    classes: list[int] | None = None     # --classes: the class id of each mask source (COCO: per annotation)


@dataclass
class Scan:
    """What a format found: items, problems, files it ignored, and the reason for each choice."""

    items: list[Item]
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)     # non-image files, left out
    notes: list[str] = field(default_factory=list)       # printed: how pairs/groups were decided
    given_splits: bool = False
    extra_files: list[str] = field(default_factory=list)  # inputs that are not images (COCO json)
    class_names: list[str] | None = None                  # --classes: names by id (None: the KEYs)


def rel(path: Path, root: Path) -> str:
    return PurePosixPath(Path(path).relative_to(root)).as_posix()


def resolved_inside(root: Path, path: Path) -> str | None:
    """`path` with every link resolved, relative to `root`, or None if that lies outside root:
    the one check that keeps every importer from reading outside INPUT through a link."""
    try:
        return PurePosixPath(Path(path).resolve().relative_to(Path(root).resolve())).as_posix()
    except ValueError:
        return None


def _dir_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def walk(root: Path) -> list[str]:
    """Every regular file under root (hidden files and folders left out), sorted, relative.

    A linked folder is entered only when it leads outside root, so that its files are seen and
    then refused (or read, with --follow-links: `links_outside`) instead of silently missing; one
    that leads inside root is not entered, its files are listed where they really are."""
    root = Path(root)
    out = []
    entered = {_dir_id(root)}   # a cycle of links outside root must not loop forever
    for d, dirs, files in os.walk(root, followlinks=True):
        base = Path(d)
        keep = []
        for x in sorted(dirs):
            p = base / x
            if x.startswith(".") or (p.is_symlink() and resolved_inside(root, p) is not None):
                continue
            try:
                ident = _dir_id(p)
            except OSError:
                continue   # a dangling folder link: nothing to list
            if ident not in entered:
                entered.add(ident)
                keep.append(x)
        dirs[:] = keep
        for f in files:
            if not f.startswith("."):
                out.append(rel(base / f, root))
    return sorted(out)


def links_outside(root: Path, scan: Scan) -> None:
    """Move the items that read a file outside root through a link into `scan.problems`."""
    kept = []
    for it in scan.items:
        names = [it.source, *it.mask_sources, *(it.volume or {}).get("channels", []), *(it.volume or {}).get("files", [])]
        outside = [p for p in names if "#" not in p and resolved_inside(root, root / p) is None]
        if not outside:
            kept.append(it)
            continue
        p = outside[0]
        scan.problems.append(Problem(p, f"leads through a link to {(root / p).resolve()}, outside INPUT {root}",
                                     "copy the file into INPUT, or pass --follow-links to read linked files "
                                     "wherever they are"))
    scan.items = kept


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTS


def claim_masks(images: list[str], masks: dict[str, list[str]], base_of) -> list[tuple[str, list[str]]]:
    """Pair images with the masks filed under their base name (popped from `masks`). When two
    images share a base (`x.png`, `x.tif`), each takes only the masks with its own extension."""
    by_base: dict[str, list[str]] = {}
    for img in images:
        by_base.setdefault(base_of(img), []).append(img)
    out = []
    for base, imgs in by_base.items():
        found = masks.pop(base, [])
        if len(imgs) > 1:
            for img in imgs:
                ext = PurePosixPath(img).suffix.lower()
                mine = [m for m in found if PurePosixPath(m).suffix.lower() == ext]
                out.append((img, mine))
            left = [m for m in found if not any(m in ms for _, ms in out[-len(imgs):])]
            if left:
                masks[base] = left
        else:
            out.append((imgs[0], found))
    return [(img, sorted(ms, key=lambda m: (len(m), m))) for img, ms in out]


def assign_keys(items: list[Item]) -> None:
    """Keys from the source path (safe ASCII); names that collide after cleaning (`a b.png`,
    `a_b.png`, `x.png`+`x.tif`) each get a short hash of their full path, so keys stay unique
    and do not depend on the order of the items."""
    base = [safe_key(str(PurePosixPath(it.source).with_suffix(""))) for it in items]
    count: dict[str, int] = {}
    for b in base:
        count[b] = count.get(b, 0) + 1
    for it, b in zip(items, base):
        it.key = b if count[b] == 1 else f"{b}-{hashlib.sha1(it.source.encode()).hexdigest()[:8]}"
    items.sort(key=lambda it: it.key)


# ---------------------------------------------------------------- decoding

def read_array(path: Path, source: str, *, as_mask: bool = False) -> np.ndarray:
    """Decode an image file with the one reader every command uses (`tumorseg_dist.imageio`);
    its error becomes this sample's PackInputError, so pack skips the file and says why."""
    try:
        return imageio.read_array(path, source, as_mask=as_mask)
    except imageio.ImageFileError as e:
        raise PackInputError(e.source, e.reason, e.fix) from e


def read_mask(path: Path, source: str) -> tuple[np.ndarray, bool]:
    """A mask file -> (bool H×W, values were already binary). Any non-zero pixel in any colour
    channel is tumour: 1-bit, L, RGB, 0/1, 0/255 and 16-bit masks all work. A mask with more
    than two values (or two values without 0) is binarised the same way; the caller reports it."""
    arr = read_array(path, source, as_mask=True)
    hi = arr.max()
    binary = bool(np.all((arr == 0) | (arr == hi)))
    return (arr.any(axis=2) if arr.ndim == 3 else arr != 0), binary


def fuse(masks: list[np.ndarray], rule: str) -> np.ndarray:
    """Combine several masks of one image: `any` (union: BUSI `_mask_1`, any LIDC reader) or
    `majority` (marked by more than half of the masks: 3 of 4 LIDC readers, 2 of 3)."""
    if rule == "majority":
        return np.sum(masks, axis=0) * 2 > len(masks)
    return np.logical_or.reduce(masks)


def rasterize(segmentations: list, h: int, w: int, source: str) -> np.ndarray:
    """Union of COCO annotations as bool H×W, the same pixels as pycocotools `COCO.annToMask`.
    Here rather than in `coco` so that `load_item` never imports a format."""
    out = np.zeros((h, w), dtype=bool)
    for ann_id, segm in segmentations:
        out |= rasterize_one(ann_id, segm, h, w, source)
    return out


def rasterize_one(ann_id, segm, h: int, w: int, source: str) -> np.ndarray:
    """One COCO annotation as bool H×W (polygons, multi-polygons, uncompressed and compressed RLE)."""
    from pycocotools import mask as mask_utils
    try:
        if isinstance(segm, list):
            if not segm:
                raise ValueError("empty polygon list")
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, h, w)
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
            rle = dict(segm)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode()
        else:
            raise ValueError(f"unknown segmentation type {type(segm).__name__}")
        if list(rle.get("size", [h, w])) != [h, w]:
            raise ValueError(f"RLE size {rle.get('size')} is not the image's {h}x{w}")
        return mask_utils.decode(rle).astype(bool)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise PackInputError(source, f"annotation {ann_id} cannot be rasterised ({e})",
                             "fix its segmentation in the annotation file") from e


def load_item(item: Item, root: Path, total: int = 0,
              overlap: str = "last") -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Decode one item: (image, mask, mask sources that were not binary, pixels two classes
    claimed). Without --classes (`item.classes` None) the mask is the bool union (or fusion);
    with it, each source is drawn with its class id (`classes.paint`): a uint8 label map when
    `total` > 2 classes, else bool."""
    image = read_array(root / item.source, item.source)
    h, w = image.shape[:2]
    nonbinary = []
    if item.coco is not None:
        ch, cw = item.coco["height"], item.coco["width"]
        if (ch, cw) != (h, w):
            raise PackInputError(item.source, f"is {w}×{h} but {item.mask_sources[0]} says {cw}×{ch}",
                                 "fix width/height in the annotation file or re-export the image")
        if item.classes is None:
            return image, rasterize(item.coco["segmentations"], h, w, item.source), nonbinary, 0
        layers = [rasterize_one(a, sg, h, w, item.source) for a, sg in item.coco["segmentations"]]
    else:
        layers = []
        for ms in item.mask_sources:
            m, binary = read_mask(root / ms, ms)
            if m.shape != (h, w):
                raise PackInputError(ms, f"is {m.shape[1]}×{m.shape[0]} but image {item.source} is {w}×{h}",
                                     "fix or remove this pair")
            if not binary:
                nonbinary.append(ms)
            layers.append(m)
        if item.classes is None:
            return image, fuse(layers, item.fusion), nonbinary, 0
    from .classes import paint
    mask, conflicts = paint(list(zip(item.classes, layers)), total, overlap, item.source)
    if not layers:
        mask = np.zeros((h, w), dtype=np.uint8 if total > 2 else bool)
    return image, mask, nonbinary, conflicts


@dataclass
class Options:
    """How INPUT's files are laid out (each format reads the options named after it)."""

    images_dir: str | None = None
    """folders: the images folder, relative to INPUT (None: found by name)."""
    masks_dir: str | None = None
    """folders: the masks folder, relative to INPUT (None: found by name)."""
    mask_suffix: str = "_mask"
    """suffix: X.ext pairs with X<SUFFIX>.ext."""
    mask_fusion: str = "any"
    """lidc: `any`, `majority` (more than half of the readers) or `reader:K`."""
    categories: str | None = None
    """coco: comma-separated category names, or id:N (None: all)."""
    axis: Literal["auto", "axial", "coronal", "sagittal"] = "auto"
    """volumes: the axis slices are cut along (after orientation to RAS); `auto` is the acquisition
    axis: the header's slice axis, else the one with the largest voxel spacing (a DICOM series: its
    slice axis)."""
    slices: str = "all"
    """volumes: `all`, `lesion` (only slices with tumour) or `lesion+N` (those plus N random slices
    without, per case, seeded by --seed)."""
    labels: str | None = None
    """volumes: the label values that are tumour, e.g. `tumour=2` (MSD liver), `1,2` or, for nnunet,
    names from dataset.json (None: any non-zero value)."""
    unmapped_labels: Literal["background", "error"] = "background"
    """volumes: what a non-zero label value outside --labels is: background (counted in
    manifest.json) or an error."""
    intensity: Literal["auto", "raw", "window"] = "auto"
    """volumes: `raw` keeps intensities (16-bit, signed values shifted by 32768, in the manifest),
    `window` maps --window to 8 bits; `auto`: window if --window is given, else raw."""
    window: str | None = None
    """volumes: LO,HI (e.g. -1000,400 for lung CT) or auto (the 0.5/99.5 percentiles per case)."""
    classes: str | None = None
    """More than one class: KEY=ID,... (ID 0 = background), e.g. `benign=1,malignant=2`. KEY is a
    folder or file-name start (folders, suffix), a category name or id:N (coco), a label value or
    dataset.json name (volumes). K > 2 classes in total: masks are 8-bit label PNGs (None: binary)."""
    overlap: Literal["last", "first", "error"] = "last"
    """--classes: a pixel two classes claim goes to the one drawn last (later mask file or
    annotation), the first, or is an error."""

    def __post_init__(self) -> None:
        f = self.mask_fusion
        if not (f in ("any", "majority") or (f.startswith("reader:") and f[7:].isdigit())):
            raise ValueError(f"--mask-fusion {f!r}: use any, majority or reader:K (e.g. reader:0)")


VOLUME_OPTIONS = ("axis", "slices", "labels", "unmapped_labels", "intensity", "window")


SPLIT_NAMES = {"train": "train", "training": "train", "valid": "val", "val": "val",
               "validation": "val", "test": "test", "testing": "test"}
