"""Dataset importers, one module per on-disk format.

Each real format has `detect(root, files) -> reason | None` (structure only, no decoding) and
`scan(root, files, options) -> Scan`. `synthetic` (generated phantoms, no INPUT) is packed by
`tumorseg_dist.data.synthetic`.
"""
from __future__ import annotations

from pathlib import Path

from . import coco, dicom, folders, lidc, nifti, nnunet, suffix
from .common import Item, LayoutError, Options, PackInputError, Problem, Scan, walk

FORMATS = {"folders": folders, "suffix": suffix, "coco": coco, "lidc": lidc,
           "nnunet": nnunet, "nifti": nifti, "dicom": dicom}
VOLUME_FORMATS = ("nnunet", "nifti", "dicom")
ALL_FORMATS = ("auto", *FORMATS, "synthetic")


def detect(root: Path, files: list[str], opts: Options | None = None) -> tuple[str, str]:
    """(format, why) from the structure alone; an error lists every candidate if it is not exactly one."""
    opts = opts or Options()
    found = {}
    for name, mod in FORMATS.items():
        why = mod.detect(root, files, opts.mask_suffix) if name == "suffix" else mod.detect(root, files)
        if why:
            found[name] = why
    if len(found) == 1:
        (name, why), = found.items()
        return name, why
    if not found:
        n_img = sum(1 for f in files if Path(f).suffix.lower() in {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
        raise LayoutError(
            f"cannot tell the format of {root} ({len(files)} files, {n_img} images): found no COCO json, "
            f"no images/ + mask-R/ (lidc), no X + X{opts.mask_suffix} pairs (suffix), no image/mask "
            f"folder pair (folders), no dataset.json + imagesTr/ + labelsTr/ (nnunet), no NIfTI image/label "
            f"pairs (nifti) and no DICOM series folder with a NIfTI label (dicom). Pass --format, and "
            f"--images-dir/--masks-dir or --mask-suffix if your names differ")
    lines = "\n".join(f"  --format {n}: {w}" for n, w in found.items())
    raise LayoutError(f"{root} fits several formats; choose one:\n{lines}")


__all__ = ["FORMATS", "VOLUME_FORMATS", "ALL_FORMATS", "detect", "walk", "Item", "Scan", "Options", "Problem",
           "LayoutError", "PackInputError"]
