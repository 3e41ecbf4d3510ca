"""Volumes -> 2D samples, shared by the `nnunet`, `nifti` and `dicom` formats.

The readers (NIfTI with nibabel, a DICOM series with pydicom, nnU-Net's 2D PNG/TIF cases with
the 2D reader every command uses), the reorientation to RAS, the choice of slices, the label
map and the intensities. Scanning only looks at names; `load_case` runs in the workers and
turns one case (one patient volume) into its 2D samples.

Why nibabel and not SimpleITK for NIfTI: it is pure Python (no 100 MB wheel), reads the header
without the data, and its `io_orientation`/`apply_orientation` are exactly what
`as_closest_canonical` does, applied here to our own array so that the voxel type is ours to
choose (int16 CT stays integer instead of becoming float64).
"""
from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ... import outputs
from ..shards import Sample, safe_key
from .common import Item, LayoutError, PackInputError, read_array

NIFTI_EXTS = (".nii.gz", ".nii")
DICOM_EXTS = {".dcm", ".dicom", ".ima"}
IMAGE2D_EXTS = (".png", ".bmp", ".tif", ".tiff")
# How `nifti` pairs volumes by name (and `dicom` finds SERIES_seg.nii.gz beside a series).
IMAGE_DIRS = ("images", "imagestr", "image", "imgs", "img", "volumes", "volume", "scans", "scan")
LABEL_DIRS = ("labels", "labelstr", "label", "masks", "mask", "seg", "segs", "segmentation", "segmentations",
              "gt", "ground_truth", "annotations")
LABEL_SUFFIXES = ("_seg", "_segmentation", "_label", "_labels", "_mask", "_gt")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}     # the axes of the RAS array
AXIS_NAMES = {v: k for k, v in AXES.items()}
AXIS_LETTER = {0: "x", 1: "y", 2: "z"}
AUTO_PERCENTILES = (0.5, 99.5)
SIGNED_OFFSET = 32768       # int16 (CT in HU) -> uint16, every value kept
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# DICOM objects that are not slices of an image series; the first two are labels in another form.
NOT_IMAGES = {"SEG": "a DICOM SEG (a segmentation)", "RTSTRUCT": "an RTSTRUCT (contours)",
              "RTDOSE": "an RTDOSE (a dose grid)", "RTPLAN": "an RTPLAN", "RTRECORD": "an RTRECORD",
              "SR": "a structured report", "PR": "a presentation state", "KO": "a key object selection",
              "REG": "a registration", "DOC": "an encapsulated document"}
LABEL_FIX = {
    "SEG": "DICOM SEG is not read by pack (highdicom is not a dependency); convert it to a NIfTI label "
           "volume on the series' grid (e.g. dcmqi `segimage2itkimage` or highdicom) and put it beside the "
           "series folder as CASE.nii.gz",
    "RTSTRUCT": "pack reads label volumes, not contours; rasterise the RTSTRUCT to a NIfTI label on the "
                "series' grid (e.g. dcmrtstruct2nii, platipy or 3D Slicer) and put it beside the series "
                "folder as CASE.nii.gz"}


def nifti_stem(name: str) -> str | None:
    """`x.nii.gz` -> `x`; None if the name is not NIfTI."""
    low = name.lower()
    for ext in NIFTI_EXTS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[:-len(ext)]
    return None


def is_dicom_name(root: Path, name: str) -> bool:
    """A DICOM file by extension, or an extensionless file with the `DICM` signature (what
    scanners and TCIA exports often write); no other content is read."""
    p = PurePosixPath(name)
    if p.suffix.lower() in DICOM_EXTS:
        return True
    if p.suffix or p.name.upper() == "DICOMDIR":
        return False
    try:
        with open(Path(root) / name, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


# ---------------------------------------------------------------- flags

def parse_slices(text: str) -> tuple[str, int]:
    """`all`, `lesion` or `lesion+N` -> (mode, N)."""
    t = text.strip().lower()
    if t in ("all", "lesion"):
        return t, 0
    m = re.fullmatch(r"lesion\+(\d+)", t)
    if not m:
        raise ValueError(f"--slices {text!r}: use all, lesion or lesion+N (e.g. lesion+2: every lesion slice "
                         f"and 2 random slices without one, per case)")
    return "lesion+", int(m.group(1))


def parse_window(text: str) -> tuple[float, float] | str:
    """`auto` or `LO,HI` (e.g. -1000,400 for lung CT)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--window {text!r}: use LO,HI in the image's units (e.g. -1000,400 for lung CT, "
                         f"-160,240 for abdomen) or auto") from None
    if not hi > lo:
        raise ValueError(f"--window {text!r}: HI must be above LO")
    return lo, hi


def parse_labels(text: str | None) -> list[tuple[str | None, int | None]]:
    """`tumour=2`, `1,2`, `liver=1,tumour=2` or (nnU-Net, names from dataset.json) `tumour`."""
    if text is None:
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        name, _, value = part.rpartition("=") if "=" in part else (None, "", part)
        if value.strip().lstrip("-").isdigit():
            v = int(value)
            if v == 0:
                raise ValueError(f"--labels {text!r}: 0 is the background, it cannot be tumour")
            out.append(((name or "").strip() or None, v))
        elif name is None and re.fullmatch(r"[A-Za-z_][\w\-]*", part):
            out.append((part, None))
        else:
            raise ValueError(f"--labels {text!r}: give label values (1,2), NAME=VALUE (tumour=2), or, for "
                             f"nnU-Net, label names from dataset.json (tumour)")
    return out


def resolve_labels(text: str | None, declared: dict[str, int] | None, where: str,
                   classes: str | None = None) -> dict:
    """The label map an item carries: {"foreground": [values] or None (any non-zero), "names": {..},
    "declared": [values] or None}. Names without a value are looked up in dataset.json. With
    `classes` (--classes VALUE=ID or NAME=ID), also "classes": {value: class id} and
    "class_names" (by id), and foreground is every value of a class other than 0."""
    if classes is not None:
        return _resolve_classes(text, declared, where, classes)
    entries = parse_labels(text)
    names, values = {}, []
    for name, v in entries:
        if v is None:
            if not declared or name not in declared:
                known = ", ".join(f"{k}={x}" for k, x in (declared or {}).items()) or "none"
                raise LayoutError(f"--labels {text}: {name!r} is not a label of {where} (it declares {known}); "
                                  f"give NAME=VALUE")
            v = declared[name]
        elif name and declared and name in declared and declared[name] != v:
            raise LayoutError(f"--labels {text}: {where} declares {name}={declared[name]}, not {v}; fix the value")
        elif declared and v not in declared.values():
            known = ", ".join(f"{k}={x}" for k, x in declared.items())
            raise LayoutError(f"--labels {text}: {where} declares no label {v} (it declares {known})")
        values.append(v)
        if name:
            names[name] = v
    return {"foreground": sorted(set(values)) or None, "names": names,
            "declared": sorted(set(declared.values())) if declared else None}


def _resolve_classes(text: str | None, declared: dict[str, int] | None, where: str, classes: str) -> dict:
    from .classes import parse_classes
    if text is not None:
        raise LayoutError(f"--labels {text} and --classes {classes} both map label values; give only "
                          f"--classes (VALUE=ID or, with dataset.json, NAME=ID)")
    spec = parse_classes(classes)
    value_of, names = {}, {}
    for key, cid in spec.entries:
        if key.lstrip("-").isdigit():
            v = int(key)
            if declared and v not in declared.values():
                known = ", ".join(f"{k}={x}" for k, x in declared.items())
                raise LayoutError(f"--classes {classes}: {where} declares no label {v} (it declares {known})")
            names[key] = next((k for k, x in (declared or {}).items() if x == v), f"label_{v}")
        elif declared and key in declared:
            v = declared[key]
            names[key] = key
        else:
            known = ", ".join(f"{k}={x}" for k, x in (declared or {}).items()) or "no names: give values"
            raise LayoutError(f"--classes {classes}: {key!r} is not a label value or a label name of {where} "
                              f"({known}); give VALUE=ID (e.g. 2=1)")
        value_of[str(v)] = cid
    fg = sorted(int(v) for v, cid in value_of.items() if cid)
    return {"foreground": fg, "names": {}, "declared": sorted(set(declared.values())) if declared else None,
            "classes": value_of, "class_names": spec.names(lambda k: names[k]), "total": spec.total}


def class_label_map(data: np.ndarray, labels: dict) -> np.ndarray:
    """A label volume's values -> class ids (uint8 for K > 2, else bool); values outside the
    map are background (the caller counts and reports them, as without --classes)."""
    out = np.zeros(data.shape, dtype=np.uint8)
    for v, cid in labels["classes"].items():
        if cid:
            out[data == int(v)] = cid
    return out if labels["total"] > 2 else out == 1


def case_keys(items: list[Item]) -> None:
    """Keys from the case name (samples add `_z0042`); two cases whose names clean to one key
    each get a short hash of their source, as 2D keys do."""
    base = [safe_key(it.volume["case"]) for it in items]
    count = Counter(base)
    for it, b in zip(items, base):
        it.key = b if count[b] == 1 else f"{b}-{hashlib.sha1(it.source.encode()).hexdigest()[:8]}"
    items.sort(key=lambda it: it.key)


# ---------------------------------------------------------------- reading

@dataclass
class Volume:
    """A case's voxels in RAS order (X×Y×Z, ×C for channels) with their geometry."""

    data: np.ndarray
    affine: np.ndarray | None        # voxel -> RAS mm; None for a 2D image (no geometry)
    slice_axis: int                  # the acquisition axis, in `data`'s axes
    source: str
    notes: list[str] = field(default_factory=list)
    native_affine: np.ndarray | None = None   # the file's own voxel order (before RAS): predict writes in it

    @property
    def zooms(self) -> np.ndarray | None:
        return None if self.affine is None else np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def _corrupt(source: str, e: Exception, what: str) -> PackInputError:
    return PackInputError(source, f"cannot be read as {what}: it is truncated or corrupt ({type(e).__name__}: {e})",
                          "re-copy it from the original data (a .nii.gz must hold its whole gzip stream) "
                          "or remove the case")


def _rescale(raw: np.ndarray, slope, inter) -> np.ndarray:
    """Apply a header's slope/intercept, staying integer when both are integers (CT: 1 and -1024),
    so that raw intensities are kept exactly."""
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if slope == 1 and inter == 0:
        return raw
    if raw.dtype.kind in "iu" and slope.is_integer() and inter.is_integer():
        return raw.astype(np.int32) * int(slope) + int(inter)
    return raw.astype(np.float32) * np.float32(slope) + np.float32(inter)


def read_nifti(path: Path, source: str, *, label: bool = False) -> Volume:
    import nibabel as nib
    try:
        img = nib.load(str(path))
    except FileNotFoundError as e:
        raise PackInputError(source, "does not exist", "check the path") from e
    except Exception as e:   # nibabel raises many types for a damaged header
        raise _corrupt(source, e, "NIfTI") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise PackInputError(source, f"is a {type(img).__name__}, not NIfTI", "convert it to .nii.gz")
    try:
        proxy = img.dataobj
        data = _rescale(np.asarray(proxy.get_unscaled()), proxy.slope, proxy.inter)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise _corrupt(source, e, "NIfTI") from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    flat = data.ndim == 2
    if flat:
        data = data[:, :, None]
    if data.ndim not in (3, 4) or (label and data.ndim != 3) or data.size == 0:
        raise PackInputError(source, f"has shape {data.shape}, not a 3D {'label ' if label else ''}volume",
                             "a label volume must be X×Y×Z; an image may add channels as a 4th axis")
    hdr = img.header
    zooms = [float(z) for z in hdr.get_zooms()[:3]] + [1.0] * (3 - len(hdr.get_zooms()[:3]))
    slice_dim = 2 if flat else hdr.get_dim_info()[2]     # a 2D file is one slice, whatever its spacing
    if slice_dim is None or slice_dim > 2:
        # No slice_dim in the header (the usual case): the through-plane axis is the one with the
        # largest spacing; ties (isotropic) go to the file's last axis, the one it was written along.
        top = max(zooms)
        slice_dim = max(i for i in range(3) if zooms[i] >= top * (1 - 1e-3))
    return _to_ras(data, np.asarray(img.affine, dtype=np.float64), slice_dim, source)


def _to_ras(data: np.ndarray, affine: np.ndarray, slice_axis: int, source: str) -> Volume:
    """The closest canonical (RAS+) orientation of the voxel array: what nibabel's
    `as_closest_canonical` does, on an array we already hold."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise PackInputError(source, "has a degenerate affine (zero or non-finite voxel axes)",
                             "fix the header's sform/qform (re-export the volume)")
    ornt = io_orientation(affine)
    out = apply_orientation(data, ornt)
    new_affine = affine @ inv_ornt_aff(ornt, data.shape[:3])
    return Volume(np.ascontiguousarray(out), new_affine, int(ornt[slice_axis, 0]), source, native_affine=affine)


def _dicom_value(ds, name, default=None):
    v = ds.get(name, default)
    return default if v is None or v == "" else v


def dcmread(path: Path, **kw):
    """pydicom's reader, also for files written without the 128-byte preamble and `DICM` (old
    exports, some RT files): read again with force=True, but only believed if it found a SOP
    class or pixel data, so that a file that is not DICOM at all stays an error."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        return pydicom.dcmread(str(path), **kw)
    except InvalidDicomError:
        ds = pydicom.dcmread(str(path), force=True, **kw)
        if "SOPClassUID" not in ds and "PixelData" not in ds:
            raise
        return ds


def dicom_kind(ds) -> str:
    """The Modality, with a SEG recognised by its SOP class too ("" if none)."""
    if str(_dicom_value(ds, "SOPClassUID", "")) == SEG_SOP_CLASS:
        return "SEG"
    return str(_dicom_value(ds, "Modality", ""))


def read_dicom_series(root: Path, files: list[str], folder: str) -> Volume:
    """One folder of one series -> a volume. Slices are sorted along the normal of their
    orientation (not by file name or InstanceNumber, which exports get wrong)."""
    slices = []
    for f in files:
        try:
            ds = dcmread(Path(root) / f)
        except Exception as e:   # pydicom raises many types for a damaged file
            raise PackInputError(f, f"is not a readable DICOM file ({type(e).__name__}: {e})",
                                 "re-copy it from the original export, or remove it from the series folder") from e
        kind = dicom_kind(ds)
        if kind in NOT_IMAGES:
            raise PackInputError(f, f"is {NOT_IMAGES[kind]}, not an image slice of the series",
                                 LABEL_FIX.get(kind, "move it out of the series folder"))
        if "PixelData" not in ds:
            raise PackInputError(f, f"holds no image (modality {_dicom_value(ds, 'Modality', '?')}, no pixel data)",
                                 "remove it from the series folder (keep only the image slices)")
        slices.append((f, ds))
    series = {str(_dicom_value(ds, "SeriesInstanceUID", "?")) for _, ds in slices}
    if len(series) > 1:
        raise PackInputError(folder, f"holds {len(series)} DICOM series, not one",
                             "put each series in its own folder with its own label volume")
    sizes: dict[tuple, list[str]] = {}
    for f, ds in slices:
        sizes.setdefault((int(_dicom_value(ds, "Rows", 0)), int(_dicom_value(ds, "Columns", 0))), []).append(f)
    if len(sizes) > 1:
        shown = ", ".join(f"{c}×{r} in {len(fs)} file(s) (e.g. {PurePosixPath(fs[0]).name})"
                          for (r, c), fs in sorted(sizes.items(), key=lambda kv: -len(kv[1])))
        raise PackInputError(folder, f"is a series with inconsistent slice sizes: {shown}",
                             "remove the files that are not slices of this series (a scout or localizer)")
    ds0 = slices[0][1]
    frames = int(_dicom_value(ds0, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise PackInputError(slices[0][0], f"is a multi-frame DICOM ({frames} frames); pack reads one slice per file",
                             "convert the series to NIfTI (e.g. dcm2niix) and use --format nifti")
    if int(_dicom_value(ds0, "SamplesPerPixel", 1)) != 1:
        raise PackInputError(slices[0][0], "is a colour DICOM image, not a CT/MR/PET slice",
                             "pack reads greyscale series only")
    iops = [np.asarray(_dicom_value(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
            for _, ds in slices]
    if any(not np.allclose(o, iops[0], atol=1e-4) for o in iops):
        raise PackInputError(folder, "its slices have different orientations (a radial or localizer series), "
                                     "so they do not form one volume",
                             "pack a series whose slices are parallel")
    spacings = {tuple(round(float(x), 6) for x in _dicom_value(ds, "PixelSpacing", [1, 1])) for _, ds in slices}
    if len(spacings) > 1:
        raise PackInputError(folder, f"its slices have different pixel spacings {sorted(spacings)}",
                             "remove the slices that do not belong to the series")
    row_dir, col_dir = iops[0][:3], iops[0][3:]
    normal = np.cross(row_dir, col_dir)
    # without positions (rare: secondary captures) InstanceNumber is the only order there is
    pos = [np.asarray(_dicom_value(ds, "ImagePositionPatient", None) or
                      [0, 0, float(_dicom_value(ds, "InstanceNumber", i))], dtype=float)
           for i, (_, ds) in enumerate(slices)]
    order = np.argsort([p @ normal for p in pos], kind="stable")
    slices = [slices[i] for i in order]
    pos = [pos[i] for i in order]
    depth = np.diff([p @ normal for p in pos])
    if len(slices) > 1:
        if np.any(depth < 1e-4):
            dup = slices[int(np.argmin(depth)) + 1][0]
            raise PackInputError(folder, f"has two slices at the same position (e.g. {dup})",
                                 "remove the duplicate files")
        gap = float(np.median(depth))
        if depth.max() - depth.min() > 0.01 * gap + 1e-3:
            raise PackInputError(folder, f"has uneven slice gaps ({depth.min():.3g} to {depth.max():.3g} mm): "
                                         f"slices are missing", "add the missing slices or convert the series "
                                                                "with a tool that resamples (dcm2niix)")
    else:
        gap = float(_dicom_value(ds0, "SpacingBetweenSlices", 0) or _dicom_value(ds0, "SliceThickness", 0) or 1.0)
    rows, cols = next(iter(sizes))
    planes = []
    for f, ds in slices:
        try:
            px = ds.pixel_array
        except Exception as e:   # a compressed syntax without its decoder, or damaged pixel data
            raise PackInputError(f, f"pixel data cannot be decoded ({type(e).__name__}: {e}): the file is "
                                    f"truncated, or compressed in a transfer syntax pydicom cannot decode here",
                                 "re-copy it from the original export; a compressed series: decompress it "
                                 "(`gdcmconv --raw`) or install pylibjpeg") from e
        if px.shape != (rows, cols):
            raise PackInputError(f, f"pixel data is {px.shape}, not {rows}×{cols} as its header says",
                                 "re-export the series")
        planes.append(_rescale(px, _dicom_value(ds, "RescaleSlope"), _dicom_value(ds, "RescaleIntercept")))
    kind = np.result_type(*[p.dtype for p in planes])
    # voxel (i, j, k) = (column, row, slice), so the affine's columns are row_dir, col_dir, normal
    data = np.stack([p.astype(kind, copy=False).T for p in planes], axis=2)
    dr, dc = (float(x) for x in _dicom_value(ds0, "PixelSpacing", [1, 1]))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, normal * gap, pos[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps     # DICOM is LPS+, NIfTI RAS+
    vol = _to_ras(data, ras, 2, folder)
    if _dicom_value(ds0, "PhotometricInterpretation") == "MONOCHROME1":
        vol.notes.append(f"{folder}: MONOCHROME1 (white is low); values kept as stored")
    return vol


def read_image2d(path: Path, source: str, *, label: bool = False) -> Volume:
    """nnU-Net's 2D variant: one PNG/BMP/TIF per channel, a 2D label image of label values.
    Stored as a one-slice volume whose only slice comes out as the file's own pixels."""
    arr = read_array(path, source, as_mask=label)
    if label and arr.ndim == 3:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[2])):
            raise PackInputError(source, "is a colour label image; nnU-Net labels are one channel of label values",
                                 "save the label as a greyscale image of values 0, 1, 2, ...")
        arr = arr[..., 0]
    data = np.flip(arr, (0, 1)).swapaxes(0, 1)[:, :, None, ...]    # undone by `plane`
    return Volume(np.ascontiguousarray(data), None, 2, source)


def read_volume(root: Path, reader: str, source: str, *, label: bool = False,
                files: list[str] | None = None) -> Volume:
    if reader == "dicom" and not label:
        return read_dicom_series(root, files or [], source)
    if reader == "image2d":
        return read_image2d(Path(root) / source, source, label=label)
    return read_nifti(Path(root) / source, source, label=label)


# ---------------------------------------------------------------- one case -> samples

def _same_geometry(img: Volume, lab: Volume, case: str) -> str | None:
    """Error (raised) for a shape or spacing mismatch; the text of a warning for an affine
    mismatch (same grid, other position or direction), which nnU-Net also only warns about."""
    if img.data.shape[:3] != lab.data.shape:
        raise PackInputError(lab.source, f"is {'×'.join(map(str, lab.data.shape))} voxels but image {img.source} is "
                                         f"{'×'.join(map(str, img.data.shape[:3]))} (after orientation to RAS)",
                             f"case {case}: the label must be on the image's voxel grid; re-export it from this "
                             f"image or resample it to the image (nearest neighbour)")
    if img.affine is None or lab.affine is None:
        return None
    zi, zl = img.zooms, lab.zooms
    if not np.allclose(zi, zl, rtol=1e-3, atol=1e-4):
        raise PackInputError(lab.source, f"has voxel spacing {_mm(zl)} mm but image {img.source} has {_mm(zi)} mm",
                             f"case {case}: the label must have the image's spacing; resample it to the image "
                             f"(nearest neighbour) or fix the header of the one that is wrong")
    dirs = np.allclose(img.affine[:3, :3] / zi, lab.affine[:3, :3] / zl, atol=1e-3)
    shift = float(np.linalg.norm(img.affine[:3, 3] - lab.affine[:3, 3]))
    if dirs and shift <= 1e-2 + 1e-3 * float(zi.max()):
        return None
    what = "directions differ" if not dirs else f"origins {shift:.3g} mm apart"
    return (f"{case}: the affines of {img.source} and {lab.source} differ ({what}); voxels were paired by index, "
            f"as nnU-Net does. Check that the label belongs to this image")


def _mm(z) -> str:
    return "×".join(f"{float(v):.4g}" for v in z)


def _label_mask(lab: Volume, labels: dict, policy: str, case: str) -> tuple[np.ndarray, dict[str, int]]:
    """The binary target and the voxel count of every non-zero value the map left out."""
    data = lab.data
    if data.dtype.kind == "f":
        if np.isnan(data).any():
            raise PackInputError(lab.source, f"has {int(np.isnan(data).sum())} NaN voxels in a label volume",
                                 f"case {case}: a label holds integer values; re-export it")
        if not np.array_equal(data, np.round(data)):
            raise PackInputError(lab.source, "has non-integer values, so it is not a label volume "
                                             "(an image in the label's place, or an interpolated resample?)",
                                 f"case {case}: give the label volume (values 0, 1, 2, ...)")
    if data.dtype.kind in "iub" and data.size and 0 <= data.min() and data.max() < 1 << 16:
        counts = np.bincount(data.ravel())      # a sort-free np.unique: a CT label has ~1e8 voxels
        values = [int(v) for v in np.flatnonzero(counts)]
        counts = counts[values]
    else:
        values, counts = np.unique(data, return_counts=True)
        values = [int(v) for v in values]
    declared = labels.get("declared")
    if declared is not None:
        unknown = [v for v in values if v != 0 and v not in declared]
        if unknown:
            raise PackInputError(lab.source, f"has label value(s) {unknown} that dataset.json does not declare "
                                             f"(it declares {declared})",
                                 f"case {case}: fix the label volume or add the label to dataset.json's labels")
    fg = labels.get("foreground")
    if fg is None:
        return data != 0, {}
    mapped = fg if "classes" not in labels else [int(v) for v in labels["classes"]]
    unmapped = {str(v): int(c) for v, c in zip(values, counts) if v != 0 and v not in mapped}
    if unmapped and policy == "error":
        raise PackInputError(lab.source, f"has label value(s) {', '.join(unmapped)} "
                                         f"({sum(unmapped.values())} voxels) outside --labels (tumour = {fg})",
                             f"case {case}: add them to --labels, or pass --unmapped-labels background "
                             f"to count them as background")
    if "classes" in labels:
        return class_label_map(data, labels), unmapped
    return np.isin(data, fg), unmapped


def _check_image(img: Volume, case: str) -> None:
    if img.data.dtype.kind == "f":
        n = int(np.isnan(img.data).sum())
        if n:
            raise PackInputError(img.source, f"has {n} NaN voxel(s)",
                                 f"case {case}: replace them (e.g. with the background value) in the volume, "
                                 f"or remove the case")
        if not np.all(np.isfinite(img.data)):
            raise PackInputError(img.source, "has infinite voxel values", f"case {case}: fix the volume")
    elif img.data.dtype.kind not in "iub":
        raise PackInputError(img.source, f"has voxel type {img.data.dtype}, not a scalar image",
                             f"case {case}: convert it to an integer or float volume")


def _intensity(img: Volume, intensity: str, window, case: str) -> tuple[dict, object]:
    """How this case's voxels become shard pixels: (record, function slice -> uint8/uint16)."""
    data = img.data
    if intensity == "raw":
        if data.dtype == np.uint8 or data.dtype == np.bool_:
            return {"mode": "raw", "bits": 8, "offset": 0}, lambda a: a.astype(np.uint8)
        offset = 0 if data.dtype.kind == "u" else SIGNED_OFFSET
        lo, hi = float(data.min()), float(data.max())
        if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
            raise PackInputError(img.source, f"has non-integer intensities ({data.dtype}), which --intensity raw "
                                             f"cannot keep exactly in 16 bits",
                                 f"case {case}: pass --window auto (or --window LO,HI) to store 8-bit windowed "
                                 f"slices")
        if lo + offset < 0 or hi + offset > 65535:
            raise PackInputError(img.source, f"has intensities from {lo:g} to {hi:g}, which do not fit 16 bits "
                                             f"(stored = value + {offset})",
                                 f"case {case}: pass --window LO,HI to store 8-bit windowed slices")
        return ({"mode": "raw", "bits": 16, "offset": offset},
                lambda a: (a.astype(np.int64) + offset).astype(np.uint16))
    chans = data.shape[3] if data.ndim == 4 else 1
    if window == "auto":
        flat = data.reshape(-1, chans)
        bounds = np.percentile(flat, AUTO_PERCENTILES, axis=0).T      # per channel
        bounds[:, 1] = np.maximum(bounds[:, 1], bounds[:, 0] + 1e-6)
    else:
        bounds = np.tile(np.asarray(window, dtype=np.float64), (chans, 1))
    lo, hi = bounds[:, 0], bounds[:, 1]

    def convert(a):
        x = (a.astype(np.float64) - lo) / (hi - lo) if a.ndim == 3 else (a.astype(np.float64) - lo[0]) / (hi[0] - lo[0])
        return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)

    shown = [[round(float(a), 4), round(float(b), 4)] for a, b in bounds]
    return {"mode": "window", "window": shown[0] if chans == 1 else shown}, convert


def case_seed(seed: int, key: str) -> np.random.Generator:
    """One generator per case, from --seed and the case's key only: the same negatives for any
    --workers, any order and any Slurm task split."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])


def choose_slices(lesion: np.ndarray, mode: str, extra: int, rng: np.random.Generator) -> list[int]:
    """Indices along the axis: every one, those with a lesion, or those plus `extra` negatives."""
    if mode == "all":
        return list(range(len(lesion)))
    pos = [int(i) for i in np.flatnonzero(lesion)]
    if mode == "lesion" or extra == 0:
        return pos
    neg = np.flatnonzero(~lesion)
    pick = rng.choice(neg, size=min(extra, len(neg)), replace=False) if len(neg) else []
    return sorted(pos + [int(i) for i in pick])


def plane(vol: np.ndarray, axis: int, k: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Slice k along `axis` as an image, and the two RAS axes that are its (rows, cols), in the
    radiological view a DICOM viewer shows: superior (axial: anterior) at the top, the patient's
    right (sagittal: anterior) on the left. A standard axial CT slice comes out as its DICOM
    pixel array."""
    a, b = [i for i in range(3) if i != axis]
    s = np.take(vol, k, axis=axis)
    return np.flip(s.swapaxes(0, 1), (0, 1)), (b, a)


def load_case(item: Item, root: Path, opts, seed: int, dataset: str) -> tuple[list[Sample], dict, list[str]]:
    """One case -> (its 2D samples in slice order, what the manifest records, warnings)."""
    v = item.volume or {}
    case = v.get("case", item.key)
    reader = v["reader"]
    chans = [read_volume(root, reader, src, files=v.get("files")) for src in v.get("channels", [item.source])]
    lab = read_volume(root, "nifti" if reader == "dicom" else reader, item.mask_sources[0], label=True)
    warnings = [n for c in chans for n in c.notes]
    img = chans[0]
    for c in chans[1:]:
        if c.data.shape[:3] != img.data.shape[:3]:
            raise PackInputError(c.source, f"is {'×'.join(map(str, c.data.shape[:3]))} voxels but channel "
                                           f"{img.source} is {'×'.join(map(str, img.data.shape[:3]))}",
                                 f"case {case}: every channel must be on one voxel grid")
    if len(chans) > 1:
        stack = [c.data if c.data.ndim == 4 else c.data[..., None] for c in chans]
        img = Volume(np.concatenate(stack, axis=3), img.affine, img.slice_axis, img.source)
    _check_image(img, case)
    w = _same_geometry(img, lab, case)
    if w:
        warnings.append(w)
    mask, unmapped = _label_mask(lab, v.get("labels") or {}, opts.unmapped_labels, case)
    axis = img.slice_axis if opts.axis == "auto" else AXES[opts.axis]
    if img.affine is None and axis != 2:
        raise PackInputError(img.source, f"is a 2D image: it has no {opts.axis} axis",
                             "use --axis auto for 2D nnU-Net datasets")
    mode, extra = parse_slices(opts.slices)
    lesion = mask.any(axis=tuple(i for i in range(3) if i != axis))
    keep = choose_slices(lesion, mode, extra, case_seed(seed, item.key))
    intensity = "window" if opts.intensity == "window" or (opts.intensity == "auto" and opts.window) else "raw"
    record, convert = _intensity(img, intensity, parse_window(opts.window or "auto") if intensity == "window"
                                 else None, case)
    zooms = img.zooms
    samples = []
    letter = AXIS_LETTER[axis]
    width = max(4, len(str(mask.shape[axis] - 1)))
    for k in keep:
        im, (r, c) = plane(img.data, axis, k)
        m, _ = plane(mask, axis, k)
        meta = {"case": case, "axis": AXIS_NAMES[axis], "slice": k, "slices": int(mask.shape[axis]),
                "spacing_mm": None if zooms is None else [round(float(zooms[r]), 6), round(float(zooms[c]), 6)],
                "intensity": record}
        if len(v.get("channels", [])) > 1:
            meta["channel_sources"] = list(v["channels"])
        samples.append(Sample(f"{item.key}_{letter}{k:0{width}d}", convert(im), m, item.source,
                              list(item.mask_sources), item.group, dataset, item.split, meta=meta,
                              labels=m.dtype == np.uint8))
    info = {"source": item.source, "label": item.mask_sources[0], "shape": list(img.data.shape[:3]),
            "spacing_mm": None if zooms is None else [round(float(z), 6) for z in zooms],
            "axis": AXIS_NAMES[axis], "slices": int(mask.shape[axis]), "lesion_slices": int(lesion.sum()),
            "kept": len(keep), "intensity": record, "unmapped_voxels": unmapped, "split": item.split}
    return samples, info, warnings


def summary(cases: dict[str, dict], opts: dict, seed: int, labels: dict | None, warnings: list[str]) -> dict:
    """manifest.json's `volumes`: the request (`opts`: the Options as a dict), what was mapped, and
    every case."""
    mode, extra = parse_slices(opts["slices"])
    win = opts.get("window")
    windowed = any(i["intensity"]["mode"] == "window" for i in cases.values())
    intensity = ({"mode": "window", "window": win or "auto",
                  **({"percentiles": list(AUTO_PERCENTILES), "per": "case and channel"}
                     if (win or "auto") == "auto" else {})} if windowed else
                 {"mode": "raw", "offsets": {},
                  "rule": f"stored = value + offset; offset {SIGNED_OFFSET} for signed or float voxels, 0 for "
                          f"unsigned; 8-bit sources stay 8-bit"})
    labels = labels or {}
    out = {
        "axis": opts["axis"], "slices": opts["slices"], "negatives_seed": seed if mode == "lesion+" and extra else None,
        "labels": {"foreground": labels.get("foreground") or "any non-zero value", "names": labels.get("names", {}),
                   "declared": labels.get("declared"), "other_nonzero": opts["unmapped_labels"]},
        "intensity": intensity, "orientation": "RAS (closest canonical)",
        "cases": dict(sorted(cases.items())), "warnings": list(warnings),
    }
    _totals(out)
    return out


def merge_summaries(parts: list[dict]) -> dict:
    """The `volumes` of a Slurm array pack: the parts' cases and warnings joined, totals recounted."""
    cases: dict[str, dict] = {}
    warnings: list[str] = []
    for p in parts:
        cases.update(p.get("cases", {}))
        warnings += p.get("warnings", [])
    out = {**parts[0], "cases": dict(sorted(cases.items())), "warnings": warnings}
    _totals(out)
    return out


def _totals(vol: dict) -> None:
    unmapped: dict[str, int] = {}
    offsets: dict[str, int] = {}
    for info in vol["cases"].values():
        for val, n in info.get("unmapped_voxels", {}).items():
            unmapped[val] = unmapped.get(val, 0) + n
        if info["intensity"]["mode"] == "raw":
            o = str(info["intensity"]["offset"])
            offsets[o] = offsets.get(o, 0) + 1
    vol["labels"]["unmapped_voxels"] = dict(sorted(unmapped.items(), key=lambda kv: int(kv[0])))
    vol["labels"]["cases_with_unmapped"] = sum(1 for i in vol["cases"].values() if i.get("unmapped_voxels"))
    if vol["intensity"]["mode"] == "raw":
        vol["intensity"]["offsets"] = offsets


# ---------------------------------------------------------------- predict: a volume in, its mask volume out

def read_for_prediction(path: Path) -> Volume:
    """A volume to predict, as pack reads it (in RAS): a NIfTI file, or a folder holding one
    DICOM series."""
    path = Path(path)
    if path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        files = [n for n in names if is_dicom_name(path, n)]
        if not files:
            raise PackInputError(str(path), "holds no DICOM files", "give a NIfTI file or a DICOM series folder")
        return read_dicom_series(path, files, str(path))
    return read_nifti(path, str(path))


def prediction_slices(vol: Volume, axis_option: str, intensity: dict | None) -> tuple[int, list[np.ndarray]]:
    """(the axis, its slices as [0, 1] float images) the way the training data was packed:
    the manifest's `volumes` axis and intensity rule (raw: value + offset in 16 bits; window:
    its fixed LO,HI or this volume's percentiles). Without one (a model trained on 2D images),
    the acquisition axis and an auto window."""
    _check_image(vol, vol.source)
    axis = vol.slice_axis if axis_option in (None, "auto") else AXES[axis_option]
    mode = (intensity or {}).get("mode", "window")
    window = (intensity or {}).get("window") or "auto"   # the flag as given ("-1000,400") or "auto"
    _, convert = _intensity(vol, mode, None if mode == "raw" else
                            (parse_window(window) if isinstance(window, str) else tuple(window)), vol.source)
    out = []
    for k in range(vol.data.shape[axis]):
        im = convert(plane(vol.data, axis, k)[0])
        out.append(im.astype(np.float32) / (65535.0 if im.dtype == np.uint16 else 255.0))
    return axis, out


def unplane(masks: list[np.ndarray], shape: tuple[int, int, int], axis: int) -> np.ndarray:
    """The inverse of `plane` for every slice: the 2D masks back into the RAS voxel array."""
    out = np.zeros(shape, np.uint8)
    for k, m in enumerate(masks):
        idx: list = [slice(None)] * 3
        idx[axis] = k
        out[tuple(idx)] = np.flip(np.asarray(m, np.uint8), (0, 1)).swapaxes(0, 1)
    return out


def save_mask_volume(mask_ras: np.ndarray, vol: Volume, source: Path, out: Path,
                     kept: str = "nothing was written") -> None:
    """The mask as NIfTI in the input's geometry: the RAS reorientation undone, so the voxels
    are in the input's own order with its affine (a NIfTI input: its header too; a DICOM
    series: (column, row, slice) with its patient geometry, as dcm2niix writes it).
    Written to a temporary name and renamed, so a partial file never has the final name; a
    failed write is an OutputError naming `out` and `kept` (what is still there)."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
    source = Path(source)
    native = vol.native_affine
    back = apply_orientation(mask_ras, ornt_transform(axcodes2ornt("RAS"), io_orientation(native)))
    back = np.ascontiguousarray(back, dtype=np.uint8)
    if source.is_dir():
        img = nib.Nifti1Image(back, native)
    else:
        orig = nib.load(str(source))
        if len(orig.shape) == 2:
            back = back[:, :, 0]
        img = nib.Nifti1Image(back, orig.affine, header=orig.header.copy())
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    img.header.set_xyzt_units("mm")
    with outputs.atomic(out, kept, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))
