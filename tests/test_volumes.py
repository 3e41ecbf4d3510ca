"""Medical volumes in: nnU-Net raw folders, NIfTI pairs and DICOM series become 2D slice samples.

Every case is built here with nibabel/pydicom (an ellipsoid tumour inside a larger "organ", CT-like
int16 intensities with negative HU, a known spacing and affine), packed with the options of
docs/pack.md, and read back from the shards. The expected slices are computed from nibabel's own
`as_closest_canonical`, not from the code under test. The last tests read the example files that
pydicom and nibabel ship in their wheels, which we did not write.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tumorseg_dist.data.shards import IndexedShards, read_manifest, read_sample, shard_paths
from tumorseg_dist.data.volume_phantoms import phantom as volume_phantom
from tumorseg_dist.pack import main as pack

SPACING = (0.8, 0.9, 2.5)


# ---------------------------------------------------------------- building cases

def phantom(shape=(40, 36, 12), seed=0, tumour_at=(0.55, 0.5, 0.5)):
    """(int16 HU image, uint8 label: 1 organ, 2 tumour). Air -1000 outside the body. The
    package's phantom (docs and benchmarks use it too), at this file's small default size."""
    return volume_phantom(shape, seed, tumour_at)


def affine_of(spacing=SPACING, origin=(-20.0, -15.0, 30.0), flip=(False, False, False)):
    a = np.diag([*spacing, 1.0]).astype(float)
    a[:3, 3] = origin
    for i, f in enumerate(flip):
        if f:
            a[:3, i] *= -1
    return a


def save_nii(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def nnunet_set(root: Path, n=4, labels=None, shape=(40, 36, 12), spacing=SPACING) -> Path:
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, lab = phantom(shape, seed=i, tumour_at=(0.55, 0.5, 0.3 + 0.1 * i))
        save_nii(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", img, affine_of(spacing))
        save_nii(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab, affine_of(spacing))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels or {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def run(*args) -> int:
    return pack([*map(str, args), "--no-progress"])


def canonical(path: Path) -> np.ndarray:
    """The reference: nibabel's own RAS reorientation of the file."""
    return np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


def view(vol: np.ndarray, axis: int, k: int) -> np.ndarray:
    """The documented 2D view of slice k (radiological: patient's right on the left)."""
    s = np.take(vol, k, axis=axis)
    return np.flip(s.swapaxes(0, 1), (0, 1))      # (rows, cols[, channels])


def read_all(out: Path) -> dict[str, dict]:
    """key -> {split, image (stored dtype), mask (bool), meta} for every sample in every split."""
    got = {}
    m = read_manifest(out)
    for sp in ("train", "val", "test"):
        if not m["splits"][sp]["samples"]:
            continue
        sh = IndexedShards(shard_paths(out, sp, m))
        for i in range(len(sh)):
            members = sh.read_member(i)
            s = read_sample(sh, i)
            ext = next(e for e in members if e.startswith("image."))
            if ext == "image.npy":
                img = np.load(io.BytesIO(members[ext]))
            else:
                img = np.asarray(Image.open(io.BytesIO(members[ext])))
            got[s.key] = {"split": sp, "image": img, "mask": s.mask[..., 0] > 0 if s.mask.ndim == 3 else s.mask > 0,
                          "meta": s.meta, "decoded": s.image}
    return got


# ---------------------------------------------------------------- nnU-Net raw, every slice

def test_nnunet_all_slices_raw_16bit_exact(tmp_path, capsys):
    root = nnunet_set(tmp_path / "Dataset001_Liver")
    out = tmp_path / "out"
    assert run(root, "--out", out) == 0
    log = capsys.readouterr().out
    assert "format: nnunet (dataset.json with imagesTr/" in log
    got = read_all(out)
    m = read_manifest(out)
    assert m["format"] == "nnunet"
    assert len(got) == 4 * 12 and set(m["volumes"]["cases"]) == {f"case_{i:03d}" for i in range(4)}
    assert m["volumes"]["intensity"]["offsets"] == {"32768": 4}
    for i in range(4):
        vol = canonical(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        lab = canonical(root / "labelsTr" / f"case_{i:03d}.nii.gz")
        assert vol.min() < -900                          # real negative HU went in
        for k in range(12):
            s = got[f"case_{i:03d}_z{k:04d}"]
            assert s["image"].dtype == np.uint16
            np.testing.assert_array_equal(s["image"].astype(np.int32) - 32768, view(vol, 2, k))
            np.testing.assert_array_equal(s["mask"], view(lab, 2, k) != 0)   # no --labels: any non-zero
            assert s["meta"]["spacing_mm"] == [0.9, 0.8]   # [row, col] = [y, x] for an axial slice
            assert s["meta"]["case"] == f"case_{i:03d}" and s["meta"]["axis"] == "axial"
            assert s["meta"]["intensity"] == {"mode": "raw", "bits": 16, "offset": 32768}
    # the float view the loaders see is the same 16 bits
    s = got["case_000_z0005"]
    np.testing.assert_array_equal(np.round(s["decoded"][..., 0] * 65535).astype(np.uint16), s["image"])


def test_slices_modes_and_seeded_negatives(tmp_path):
    root = nnunet_set(tmp_path / "ds")
    lesion = {}
    for i in range(4):
        lab = canonical(root / "labelsTr" / f"case_{i:03d}.nii.gz")
        lesion[f"case_{i:03d}"] = {k for k in range(12) if (lab[:, :, k] == 2).any()}
    assert all(0 < len(v) < 12 - 3 for v in lesion.values())

    assert run(root, "--out", tmp_path / "lesion", "--slices", "lesion", "--labels", "tumour=2") == 0
    got = read_all(tmp_path / "lesion")
    assert {k for k in got} == {f"{c}_z{k:04d}" for c, ks in lesion.items() for k in ks}
    assert all(s["mask"].any() for s in got.values())

    keys = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        assert run(root, "--out", tmp_path / name, "--slices", "lesion+3", "--labels", "tumour=2",
                   "--seed", seed) == 0
        keys.append(set(read_all(tmp_path / name)))
    assert keys[0] == keys[1]                             # seeded: the same negatives
    for c, ks in lesion.items():
        mine = {int(k.rsplit("_z", 1)[1]) for k in keys[0] if k.startswith(c + "_z")}
        assert ks <= mine and len(mine - ks) == 3
    neg = read_all(tmp_path / "a")
    assert sum(not s["mask"].any() for s in neg.values()) == 4 * 3
    m = read_manifest(tmp_path / "a")
    assert m["volumes"]["slices"] == "lesion+3" and m["volumes"]["negatives_seed"] == 0
    assert m["volumes"]["cases"]["case_000"]["kept"] == len(lesion["case_000"]) + 3


def test_label_map_and_what_was_mapped(tmp_path, capsys):
    root = nnunet_set(tmp_path / "ds", n=3)
    liver = sum(int((canonical(root / "labelsTr" / f"case_{i:03d}.nii.gz") == 1).sum()) for i in range(3))
    for spec, fg in (("tumour=2", [2]), ("tumour", [2]), ("1,2", [1, 2])):
        out = tmp_path / spec.replace(",", "_").replace("=", "_")
        assert run(root, "--out", out, "--labels", spec) == 0
        got = read_all(out)
        lab = canonical(root / "labelsTr" / "case_001.nii.gz")
        for k in (3, 6, 9):
            np.testing.assert_array_equal(got[f"case_001_z{k:04d}"]["mask"], np.isin(view(lab, 2, k), fg))
        labels = read_manifest(out)["volumes"]["labels"]
        assert labels["foreground"] == fg and labels["declared"] == [1, 2]
        if fg == [2]:
            assert labels["names"] == {"tumour": 2}
            assert labels["unmapped_voxels"] == {"1": liver} and labels["cases_with_unmapped"] == 3
            assert "outside --labels and were counted as background" in capsys.readouterr().out
        else:
            assert labels["unmapped_voxels"] == {}


def test_window_fixed_and_auto(tmp_path):
    root = nnunet_set(tmp_path / "ds", n=3)
    assert run(root, "--out", tmp_path / "lung", "--window", "-1000,400") == 0
    got = read_all(tmp_path / "lung")
    vol = canonical(root / "imagesTr" / "case_002_0000.nii.gz").astype(np.float64)
    s = got["case_002_z0004"]
    assert s["image"].dtype == np.uint8
    want = np.round(np.clip((view(vol, 2, 4) + 1000) / 1400, 0, 1) * 255)
    np.testing.assert_array_equal(s["image"], want)
    m = read_manifest(tmp_path / "lung")
    assert m["volumes"]["intensity"] == {"mode": "window", "window": "-1000,400"}
    assert s["meta"]["intensity"] == {"mode": "window", "window": [-1000.0, 400.0]}

    assert run(root, "--out", tmp_path / "auto", "--window", "auto") == 0
    m = read_manifest(tmp_path / "auto")
    assert m["volumes"]["intensity"]["percentiles"] == [0.5, 99.5]
    lo, hi = np.percentile(vol, [0.5, 99.5])
    assert m["volumes"]["cases"]["case_002"]["intensity"]["window"] == [round(lo, 4), round(hi, 4)]
    img = read_all(tmp_path / "auto")["case_002_z0004"]["image"]
    want = np.round(np.clip((view(vol, 2, 4) - lo) / (hi - lo), 0, 1) * 255)
    assert np.abs(img.astype(int) - want).max() <= 1
    assert img.min() == 0 and img.max() == 255


def test_axis_auto_is_acquisition_axis_and_spacing(tmp_path):
    """A sagittally acquired volume (thick slices along x) is cut along x by default; --axis picks
    another; spacing_mm is the in-plane [row, col] spacing of that cut."""
    img, lab = phantom((10, 30, 34))
    aff = affine_of((3.0, 0.7, 0.9))
    save_nii(tmp_path / "in" / "images" / "sag.nii.gz", img, aff)
    save_nii(tmp_path / "in" / "labels" / "sag.nii.gz", lab, aff)
    assert run(tmp_path / "in", "--out", tmp_path / "auto", "--format", "nifti") == 0
    got = read_all(tmp_path / "auto")
    assert sorted(got) == [f"sag_x{k:04d}" for k in range(10)]
    s = got["sag_x0004"]
    assert s["meta"]["axis"] == "sagittal" and s["meta"]["spacing_mm"] == [0.9, 0.7]
    assert s["image"].shape == (34, 30)
    np.testing.assert_array_equal(s["image"].astype(np.int32) - 32768, view(img, 0, 4))
    assert run(tmp_path / "in", "--out", tmp_path / "cor", "--format", "nifti", "--axis", "coronal") == 0
    got = read_all(tmp_path / "cor")
    assert len(got) == 30 and got["sag_y0007"]["meta"]["spacing_mm"] == [0.9, 3.0]
    np.testing.assert_array_equal(got["sag_y0007"]["image"].astype(np.int32) - 32768, view(img, 1, 7))


def test_ras_flipped_affine_gives_the_same_slices(tmp_path):
    """The same voxels stored mirrored (x and y reversed, as LPS-minded writers do) with the
    affine that says so are one and the same volume: every slice comes out identical."""
    img, lab = phantom()
    nx, ny = img.shape[:2]
    a = affine_of()
    flipped = a.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 1] *= -1
    flipped[:3, 3] = a[:3, 3] + a[:3, 0] * (nx - 1) + a[:3, 1] * (ny - 1)
    root = tmp_path / "in"
    save_nii(root / "plain.nii.gz", img, a)
    save_nii(root / "plain_seg.nii.gz", lab, a)
    save_nii(root / "mirror.nii.gz", img[::-1, ::-1], flipped)
    save_nii(root / "mirror_seg.nii.gz", lab[::-1, ::-1], flipped)
    assert np.allclose(nib.load(str(root / "mirror.nii.gz")).affine @ [nx - 1, ny - 1, 0, 1], a @ [0, 0, 0, 1])
    assert run(root, "--out", tmp_path / "out", "--split", "1,0,0") == 0
    got = read_all(tmp_path / "out")
    assert len(got) == 24
    for k in range(12):
        p, q = got[f"plain_z{k:04d}"], got[f"mirror_z{k:04d}"]
        np.testing.assert_array_equal(p["image"], q["image"])
        np.testing.assert_array_equal(p["mask"], q["mask"])
        assert p["meta"]["spacing_mm"] == q["meta"]["spacing_mm"]


def test_no_case_in_two_splits(tmp_path):
    root = nnunet_set(tmp_path / "ds", n=10, shape=(24, 24, 8))
    assert run(root, "--out", tmp_path / "out", "--split", "0.6,0.2,0.2") == 0
    got = read_all(tmp_path / "out")
    split_of = {}
    for s in got.values():
        split_of.setdefault(s["meta"]["case"], set()).add(s["split"])
    assert len(split_of) == 10 and all(len(v) == 1 for v in split_of.values())
    assert {next(iter(v)) for v in split_of.values()} == {"train", "val", "test"}
    m = read_manifest(tmp_path / "out")
    assert all(m["volumes"]["cases"][c]["split"] == next(iter(v)) for c, v in split_of.items())
    for s in got.values():
        assert s["meta"]["group"] == s["meta"]["case"]


# ---------------------------------------------------------------- DICOM series

def write_dicom_slice(path: Path, hu: np.ndarray, pos, spacing, *, series: str, iop=(1, 0, 0, 0, 1, 0),
                      number=1, modality="CT") -> Path:
    """One CT slice as scanners write it: stored = HU + 1024 (unsigned), RescaleIntercept -1024."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = modality, "P", "1.2.3", series
    ds.Rows, ds.Columns = hu.shape
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = float(spacing[2])
    ds.ImagePositionPatient = [float(x) for x in pos]
    ds.ImageOrientationPatient = [float(x) for x in iop]
    ds.InstanceNumber = number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    assert hu.min() >= -1024
    ds.PixelData = (hu.astype(np.int32) + 1024).astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def dicom_affine(spacing, origin) -> np.ndarray:
    """RAS affine of voxel (column, row, slice) of an axial series with IOP (1,0,0,0,1,0):
    DICOM is LPS, so x and y change sign (the standard rule; nothing from the code under test)."""
    dr, dc, dz = spacing
    lps = np.array([[dc, 0, 0, origin[0]], [0, dr, 0, origin[1]], [0, 0, dz, origin[2]], [0, 0, 0, 1.0]])
    return np.diag([-1.0, -1, 1, 1]) @ lps


def dicom_case(folder: Path, label_path: Path, seed=0, shape=(32, 30, 8), spacing=(0.7, 0.6, 3.0),
               origin=(-10.0, -12.0, 40.0)):
    """A series of `shape` = (rows, cols, slices) in `folder` (files named out of order), its label
    volume at `label_path`. Returns (per-slice HU pixel arrays, per-slice label arrays)."""
    hu, lab = phantom((shape[1], shape[0], shape[2]), seed=seed)        # (col, row, slice)
    uid = generate_uid()
    for k in range(shape[2]):
        pos = np.array(origin) + [0, 0, k * spacing[2]]
        name = f"IM{(k * 5) % shape[2]:03d}_{k}.dcm"                    # names do not sort by position
        write_dicom_slice(folder / name, hu[:, :, k].T, pos, spacing, series=uid, number=shape[2] - k)
    save_nii(label_path, lab, dicom_affine(spacing, origin))
    return [hu[:, :, k].T for k in range(shape[2])], [lab[:, :, k].T for k in range(shape[2])], hu, lab


def test_dicom_series_layouts_and_geometry(tmp_path, capsys):
    root = tmp_path / "in"
    pixels, labels, hu, lab = dicom_case(root / "P1" / "ct", root / "P1" / "label.nii.gz", seed=1)
    dicom_case(root / "P2", root / "P2" / "seg.nii.gz", seed=2)
    dicom_case(root / "cases" / "P3", root / "cases" / "P3.nii.gz", seed=3)
    assert run(root, "--out", tmp_path / "out", "--labels", "2", "--split", "1,0,0") == 0
    assert "format: dicom (folders of DICOM files with a NIfTI label beside them (3 series" in capsys.readouterr().out
    got = read_all(tmp_path / "out")
    m = read_manifest(tmp_path / "out")
    assert set(m["volumes"]["cases"]) == {"P1", "P2", "cases_P3"}
    assert len(got) == 3 * 8
    for k in range(8):
        s = got[f"P1_z{k:04d}"]
        # a standard axial slice comes out as its DICOM pixel array (radiological view), in HU
        np.testing.assert_array_equal(s["image"].astype(np.int32) - 32768, pixels[k])
        np.testing.assert_array_equal(s["mask"], labels[k] == 2)
        assert s["meta"]["spacing_mm"] == [0.7, 0.6] and s["meta"]["axis"] == "axial"
        assert s["meta"]["source"] == "P1/ct" and s["meta"]["mask_sources"] == ["P1/label.nii.gz"]
    # the same voxels as a NIfTI volume with the DICOM's geometry give the same samples
    save_nii(tmp_path / "nii" / "images" / "P1.nii.gz", hu, dicom_affine((0.7, 0.6, 3.0), (-10.0, -12.0, 40.0)))
    save_nii(tmp_path / "nii" / "labels" / "P1.nii.gz", lab, dicom_affine((0.7, 0.6, 3.0), (-10.0, -12.0, 40.0)))
    assert run(tmp_path / "nii", "--out", tmp_path / "nii_out", "--labels", "2", "--split", "1,0,0") == 0
    for k, s in read_all(tmp_path / "nii_out").items():
        np.testing.assert_array_equal(s["image"], got[k]["image"])
        np.testing.assert_array_equal(s["mask"], got[k]["mask"])


# ---------------------------------------------------------------- nnU-Net 2D, channels

def test_nnunet_2d_png_variant(tmp_path):
    root = tmp_path / "Dataset002_US"
    rng = np.random.default_rng(0)
    want = {}
    for i in range(5):
        img = rng.integers(0, 256, (40, 48), dtype=np.uint8)
        lab = np.zeros((40, 48), np.uint8)
        lab[5:15, 10:30] = 1
        lab[20:30, 5 + i:20 + i] = 2
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "imagesTr" / f"us_{i}_0000.png")
        Image.fromarray(lab).save(root / "labelsTr" / f"us_{i}.png")
        want[f"us_{i}"] = (img, lab)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "US"}, "file_ending": ".png",
                                                   "labels": {"background": 0, "cyst": 1, "tumour": 2}}))
    assert run(root, "--out", tmp_path / "out", "--labels", "tumour") == 0
    got = read_all(tmp_path / "out")
    assert sorted(got) == [f"us_{i}_z0000" for i in range(5)]
    for case, (img, lab) in want.items():
        s = got[f"{case}_z0000"]
        np.testing.assert_array_equal(s["image"], img)            # 8-bit source stays 8-bit, same pixels
        np.testing.assert_array_equal(s["mask"], lab == 2)
        assert s["meta"]["spacing_mm"] is None and s["meta"]["intensity"]["bits"] == 8


def test_nnunet_two_channels_raw_codec(tmp_path):
    root = nnunet_set(tmp_path / "ds", n=2)
    for i in range(2):
        img, _ = phantom(seed=10 + i)
        save_nii(root / "imagesTr" / f"case_{i:03d}_0001.nii.gz", (img // 2).astype(np.int16), affine_of())
    ds = json.loads((root / "dataset.json").read_text())
    ds["channel_names"] = {"0": "CT", "1": "CT2"}
    (root / "dataset.json").write_text(json.dumps(ds))
    assert run(root, "--out", tmp_path / "out", "--codec", "raw", "--split", "1,0,0") == 0
    s = read_all(tmp_path / "out")["case_001_z0003"]
    assert s["image"].shape == (36, 40, 2) and s["image"].dtype == np.uint16
    for c in range(2):
        vol = canonical(root / "imagesTr" / f"case_001_{c:04d}.nii.gz")
        np.testing.assert_array_equal(s["image"][..., c].astype(np.int32) - 32768, view(vol, 2, 3))
    assert s["meta"]["channel_sources"] == [f"imagesTr/case_001_{c:04d}.nii.gz" for c in range(2)]


# ---------------------------------------------------------------- auto-detection

def test_auto_detection_explains_each_volume_format(tmp_path, capsys):
    nnunet_set(tmp_path / "a", n=1)
    img, lab = phantom()
    save_nii(tmp_path / "b" / "x.nii.gz", img, affine_of())
    save_nii(tmp_path / "b" / "x_seg.nii.gz", lab, affine_of())
    dicom_case(tmp_path / "c" / "P1", tmp_path / "c" / "P1.nii.gz")
    for d, fmt, why in (("a", "nnunet", "dataset.json with imagesTr/"), ("b", "nifti", "NIfTI volume pairs by name"),
                        ("c", "dicom", "folders of DICOM files")):
        assert run(tmp_path / d, "--out", tmp_path / f"{d}_out", "--dry-run") == 0
        assert f"format: {fmt} ({why}" in capsys.readouterr().out
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("x")
    assert run(tmp_path / "e", "--out", tmp_path / "e_out") == 2
    assert "no dataset.json + imagesTr/ + labelsTr/ (nnunet)" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input

def nifti_set(root: Path, n=3) -> Path:
    for i in range(n):
        img, lab = phantom(seed=i)
        save_nii(root / "images" / f"c{i}.nii.gz", img, affine_of())
        save_nii(root / "labels" / f"c{i}.nii.gz", lab, affine_of())
    return root


def _break(root: Path, case: str) -> tuple[str, list[str], list[str]]:
    """Damage case c1 (or add a bad DICOM case): (source named, message parts, extra flags)."""
    img, lab = phantom(seed=1)
    if case == "shape":
        save_nii(root / "labels" / "c1.nii.gz", lab[:, :, :11], affine_of())
        return "labels/c1.nii.gz", ["is 40×36×11 voxels but image images/c1.nii.gz is 40×36×12", "case c1",
                                    "resample it to the image"], []
    if case == "spacing":
        save_nii(root / "labels" / "c1.nii.gz", lab, affine_of((0.8, 0.9, 3.0)))
        return "labels/c1.nii.gz", ["has voxel spacing 0.8×0.9×3 mm but image images/c1.nii.gz has 0.8×0.9×2.5 mm",
                                    "case c1"], []
    if case == "unmapped":
        lab[lab == 2] = 3
        save_nii(root / "labels" / "c1.nii.gz", lab, affine_of())
        return "labels/c1.nii.gz", ["has label value(s) 3", "outside --labels (tumour = [1, 2])",
                                    "--unmapped-labels background"], ["--labels", "1,2", "--unmapped-labels", "error"]
    if case == "nan":
        f = img.astype(np.float32)
        f[3, 4, 5] = np.nan
        save_nii(root / "images" / "c1.nii.gz", f, affine_of())
        return "images/c1.nii.gz", ["has 1 NaN voxel(s)", "case c1: replace them"], []
    if case == "truncated":
        p = root / "images" / "c1.nii.gz"
        data = p.read_bytes()
        p.write_bytes(data[:len(data) // 2])
        return "images/c1.nii.gz", ["cannot be read as NIfTI: it is truncated or corrupt", "re-copy it"], []
    if case == "raw_float":
        save_nii(root / "images" / "c1.nii.gz", img.astype(np.float32) + 0.25, affine_of())
        return "images/c1.nii.gz", ["non-integer intensities", "pass --window auto"], []
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["shape", "spacing", "unmapped", "nan", "truncated", "raw_float"])
def test_bad_volume_fails_then_skips(tmp_path, capsys, case):
    root = nifti_set(tmp_path / "in")
    source, needles, flags = _break(root, case)
    out = tmp_path / "out"
    assert run(root, "--out", out, *flags) == 2
    err = capsys.readouterr().err
    assert f"pack: error: {source}: " in err, err
    for n in needles:
        assert n in err, (n, err)
    assert "--on-error skip" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert run(root, "--out", out, *flags, "--on-error", "skip") == 0
    m = read_manifest(out)
    assert [s["source"] for s in m["skipped"]] == [source]
    assert set(m["volumes"]["cases"]) == {"c0", "c2"}
    assert {s["meta"]["case"] for s in read_all(out).values()} == {"c0", "c2"}


def test_affine_mismatch_is_a_warning(tmp_path, capsys):
    root = nifti_set(tmp_path / "in")
    _, lab = phantom(seed=1)
    save_nii(root / "labels" / "c1.nii.gz", lab, affine_of(origin=(-20.0, -10.0, 30.0)))
    assert run(root, "--out", tmp_path / "out") == 0
    log = capsys.readouterr().out
    assert "warning: c1: the affines of images/c1.nii.gz and labels/c1.nii.gz differ (origins 5 mm apart)" in log
    m = read_manifest(tmp_path / "out")
    assert len(m["volumes"]["warnings"]) == 1 and "c1" in m["volumes"]["warnings"][0]
    assert m["skipped"] == [] and len(m["volumes"]["cases"]) == 3


def test_undeclared_label_value_nnunet(tmp_path, capsys):
    root = nnunet_set(tmp_path / "ds", n=3)
    for flag, needle in (("tumor", "'tumor' is not a label of dataset.json (it declares liver=1, tumour=2)"),
                         ("tumour=1", "dataset.json declares tumour=2, not 1"),
                         ("5", "dataset.json declares no label 5")):
        assert run(root, "--out", tmp_path / "out", "--labels", flag) == 2
        assert needle in capsys.readouterr().err
    _, lab = phantom(seed=2)
    lab[0, 0, 0] = 7
    save_nii(root / "labelsTr" / "case_002.nii.gz", lab, affine_of())
    assert run(root, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "labelsTr/case_002.nii.gz: has label value(s) [7] that dataset.json does not declare" in err
    assert "case case_002" in err


def _dicom_bad(root: Path, case: str) -> tuple[str, list[str]]:
    if case == "unreadable":
        (root / "P2" / "IM_junk.dcm").write_bytes(b"not a dicom file at all" * 10)
        return "P2/IM_junk.dcm", ["is not a readable DICOM file", "remove it from the series folder"]
    if case == "sizes":
        f = sorted((root / "P2").glob("*.dcm"))[0]
        ds = pydicom.dcmread(str(f))
        write_dicom_slice(root / "P2" / "IM_scout.dcm", np.zeros((20, 20), np.int16), [0, 0, 999], (0.7, 0.6, 3.0),
                          series=ds.SeriesInstanceUID)
        return "P2", ["is a series with inconsistent slice sizes: 30×32 in 8 file(s)", "20×20 in 1 file(s) "
                      "(e.g. IM_scout.dcm)", "a scout or localizer"]
    if case == "seg":
        shutil.rmtree(root / "P2")
        dicom_case(root / "P2" / "ct", root / "elsewhere.nii.gz")
        (root / "elsewhere.nii.gz").unlink()
        seg = write_dicom_slice(root / "P2" / "seg" / "seg.dcm", np.zeros((4, 4), np.int16), [0, 0, 0],
                                (1, 1, 1), series=generate_uid(), modality="SEG")
        return "P2/seg/seg.dcm", ["is a DICOM SEG (a segmentation), the only label of series P2/ct/",
                                  "convert it to a NIfTI label"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unreadable", "sizes", "seg"])
def test_bad_dicom_fails_then_skips(tmp_path, capsys, case):
    root = tmp_path / "in"
    for i in range(3):
        dicom_case(root / f"P{i}", root / f"P{i}.nii.gz", seed=i)
    source, needles = _dicom_bad(root, case)
    out = tmp_path / "out"
    assert run(root, "--out", out, "--format", "dicom") == 2
    err = capsys.readouterr().err
    assert f"pack: error: {source}: " in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
    assert run(root, "--out", out, "--format", "dicom", "--on-error", "skip") == 0
    m = read_manifest(out)
    assert [s["source"] for s in m["skipped"]] == [source]
    assert set(m["volumes"]["cases"]) == {"P0", "P1"}


# ---------------------------------------------------------------- files we did not write

def test_pydicom_example_files(tmp_path):
    """pydicom's CT_small.dcm and MR_small.dcm (one axial slice each): the packed slice is the
    file's own pixel array, rescaled to HU, at its own spacing."""
    from pydicom.data import get_testdata_file
    root = tmp_path / "in"
    want = {}
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = Path(get_testdata_file(name))
        ds = pydicom.dcmread(str(path))
        hu = ds.pixel_array.astype(np.int32) * int(ds.get("RescaleSlope", 1)) + int(ds.get("RescaleIntercept", 0))
        case = root / name.split("_")[0]
        case.mkdir(parents=True)
        shutil.copy(path, case / name)
        dr, dc = (float(x) for x in ds.PixelSpacing)
        assert [float(x) for x in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        lab = (hu > np.median(hu)).astype(np.uint8)
        save_nii(case / "label.nii.gz", lab.T[:, :, None],
                 dicom_affine((dr, dc, float(ds.SliceThickness)), [float(x) for x in ds.ImagePositionPatient]))
        want[name.split("_")[0]] = (hu, lab, [round(dr, 6), round(dc, 6)])
    assert run(root, "--out", tmp_path / "out", "--split", "1,0,0") == 0
    got = read_all(tmp_path / "out")
    assert sorted(got) == ["CT_z0000", "MR_z0000"]
    for case, (hu, lab, spacing) in want.items():
        s = got[f"{case}_z0000"]
        np.testing.assert_array_equal(s["image"].astype(np.int32) - 32768, hu)
        np.testing.assert_array_equal(s["mask"], lab == 1)
        assert s["meta"]["spacing_mm"] == spacing
    assert got["CT_z0000"]["image"].astype(np.int32).min() - 32768 < 0      # real negative HU


def test_pydicom_example_series_that_are_not_volumes(tmp_path, capsys):
    """pydicom's dicomdirtests: MR700 is a radial series (one orientation per slice), MR1 holds
    three one-file series; extensionless files are found by their DICM signature."""
    from pydicom.data import get_testdata_file
    base = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892003"
    for name, needle in (("MR700", "its slices have different orientations (a radial or localizer series)"),
                         ("MR1", "holds 3 DICOM series, not one")):
        root = tmp_path / name
        shutil.copytree(base / name, root / "case")
        save_nii(root / "case.nii.gz", np.zeros((16, 16, 3), np.uint8), np.eye(4))
        assert run(root, "--out", tmp_path / f"{name}_out") == 2
        err = capsys.readouterr().err
        assert f"pack: error: case: {needle}" in err, err
    truncated = Path(get_testdata_file("MR_truncated.dcm"))
    root = tmp_path / "trunc"
    (root / "case").mkdir(parents=True)
    shutil.copy(truncated, root / "case" / truncated.name)
    save_nii(root / "case.nii.gz", np.zeros((64, 64, 1), np.uint8), np.eye(4))
    assert run(root, "--out", tmp_path / "trunc_out") == 2
    err = capsys.readouterr().err
    assert "case/MR_truncated.dcm: pixel data cannot be decoded" in err and "truncated" in err


def test_nibabel_example_volumes(tmp_path):
    """nibabel's anatomical.nii (LAS, big-endian int16) and example4d.nii.gz (2 volumes, slice_dim
    in its header): the reader gives nibabel's own canonical array, and a pack slices it."""
    from nibabel.testing import data_path

    from tumorseg_dist.data.formats.volumes import read_nifti
    anat = Path(data_path) / "anatomical.nii"
    vol = read_nifti(anat, "anatomical.nii")
    ref = nib.as_closest_canonical(nib.load(str(anat)))
    np.testing.assert_array_equal(vol.data, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(vol.affine, ref.affine)
    four = read_nifti(Path(data_path) / "example4d.nii.gz", "example4d.nii.gz")
    ref4 = nib.as_closest_canonical(nib.load(str(Path(data_path) / "example4d.nii.gz")))
    assert four.data.shape == ref4.shape and four.slice_axis == 2
    np.testing.assert_array_equal(four.data, np.asanyarray(ref4.dataobj))

    root = tmp_path / "in"
    (root / "images").mkdir(parents=True)
    shutil.copy(anat, root / "images" / "anatomical.nii")
    img = nib.load(str(anat))
    data = np.asanyarray(img.dataobj)
    save_nii(root / "labels" / "anatomical.nii.gz", (data > np.percentile(data, 90)).astype(np.uint8), img.affine)
    assert run(root, "--out", tmp_path / "out", "--split", "1,0,0") == 0
    got = read_all(tmp_path / "out")
    canon = np.asanyarray(ref.dataobj)
    assert len(got) == canon.shape[2]                       # isotropic: the file's own slice axis
    np.testing.assert_array_equal(got["anatomical_z0010"]["image"].astype(np.int32) - 32768, view(canon, 2, 10))
    assert got["anatomical_z0010"]["meta"]["spacing_mm"] == [2.0, 2.0]


# ---------------------------------------------------------------- workers, Slurm parts, DICOM axis

def test_workers_and_slurm_parts_give_the_same_dataset(tmp_path):
    root = nnunet_set(tmp_path / "ds", n=5, shape=(24, 24, 8))
    flags = ["--slices", "lesion+1", "--labels", "tumour"]
    one_dir, two_dir = tmp_path / "1" / "liver", tmp_path / "2" / "liver"   # one name: it is in every json
    assert run(root, "--out", one_dir, *flags) == 0
    assert run(root, "--out", two_dir, *flags, "--workers", "2") == 0
    one, two = read_manifest(one_dir), read_manifest(two_dir)
    sha = lambda m: [sh["sha256"] for sp in ("train", "val", "test") for sh in m["splits"][sp]["shards"]]
    assert sha(one) == sha(two) and one["volumes"]["cases"] == two["volumes"]["cases"]
    for i in range(2):
        assert run(root, "--out", tmp_path / "3" / "liver", *flags, "--task-index", i, "--num-tasks", 2) == 0
    assert run("--merge", "--out", tmp_path / "3" / "liver") == 0
    merged = read_manifest(tmp_path / "3" / "liver")
    assert merged["volumes"]["cases"] == one["volumes"]["cases"]
    assert merged["volumes"]["labels"]["unmapped_voxels"] == one["volumes"]["labels"]["unmapped_voxels"]
    assert sha(merged) and set(read_all(tmp_path / "3" / "liver")) == set(read_all(one_dir))


def test_dicom_coronal_series_is_cut_along_its_own_slice_axis(tmp_path):
    """A coronal acquisition (rows run head to foot): --axis auto follows the series' slice axis
    through the reorientation, and the slice is the DICOM pixel array again."""
    root = tmp_path / "in"
    hu, _ = phantom((30, 28, 6), seed=4)           # (col, row, slice)
    uid, iop, spacing = generate_uid(), (1, 0, 0, 0, 0, -1), (0.7, 0.6, 2.0)
    for k in range(6):
        write_dicom_slice(root / "P" / f"{k}.dcm", hu[:, :, k].T, (0, k * 2.0, 50), spacing, series=uid, iop=iop)
    # voxel (c, r, k) -> LPS (c*dc, k*dz, 50 - r*dr): the normal of IOP (1,0,0)x(0,0,-1) is +y (posterior)
    lps = np.array([[0.6, 0, 0, 0], [0, 0, 2.0, 0], [0, -0.7, 0, 50], [0, 0, 0, 1.0]])
    save_nii(root / "P.nii.gz", (hu > 50).astype(np.uint8), np.diag([-1.0, -1, 1, 1]) @ lps)
    assert run(root, "--out", tmp_path / "out", "--split", "1,0,0") == 0
    got = read_all(tmp_path / "out")
    assert sorted(got) == [f"P_y{k:04d}" for k in range(6)]
    # RAS y runs anterior, the series posterior: slice k of the case is the series' slice 5 - k
    for k in range(6):
        s = got[f"P_y{k:04d}"]
        assert s["meta"]["axis"] == "coronal" and s["meta"]["spacing_mm"] == [0.7, 0.6]
        np.testing.assert_array_equal(s["image"].astype(np.int32) - 32768, hu[:, :, 5 - k].T)
        np.testing.assert_array_equal(s["mask"], hu[:, :, 5 - k].T > 50)


def test_volume_flags_refused_for_2d_formats(tmp_path, capsys):
    for i in range(2):
        (tmp_path / "in" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / "images" / f"{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in" / "masks" / f"{i}.png")
    assert run(tmp_path / "in", "--out", tmp_path / "out", "--slices", "lesion") == 2
    assert "--slices is for volumes (--format nnunet, nifti, dicom)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:      # a flag combination that cannot work: a usage error
        run(tmp_path / "in", "--out", tmp_path / "out", "--window", "-1000,400", "--intensity", "raw")
    assert e.value.code == 2
    assert "--window goes with --intensity window" in capsys.readouterr().err


def test_msd_layout_is_nifti_with_4d_channels(tmp_path, capsys):
    """The Decathlon's own layout: dataset.json, imagesTr/X.nii.gz (4D: the MR sequences),
    labelsTr/X.nii.gz, imagesTs/ without labels."""
    root = tmp_path / "Task01_BrainTumour"
    for i in range(3):
        img, lab = phantom(seed=i)
        mr = np.stack([np.clip(img + 1024, 0, None), np.clip(img + 1024, 0, None) // 3], -1).astype(np.uint16)
        save_nii(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", mr, affine_of())
        save_nii(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", lab, affine_of())
    save_nii(root / "imagesTs" / "BRATS_900.nii.gz", mr, affine_of())
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w"},
                                                   "labels": {"0": "background", "1": "edema", "2": "tumour"}}))
    assert run(root, "--out", tmp_path / "out", "--codec", "raw", "--labels", "2", "--split", "1,0,0") == 0
    log = capsys.readouterr().out
    assert "format: nifti (NIfTI volume pairs by name" in log and "imagesTs/: 1 volume(s) without labels" in log
    got = read_all(tmp_path / "out")
    assert len(got) == 36
    s = got["BRATS_001_z0006"]
    assert s["image"].shape == (36, 40, 2) and s["meta"]["intensity"]["offset"] == 0   # unsigned MR: as stored
    np.testing.assert_array_equal(s["image"], view(canonical(root / "imagesTr" / "BRATS_001.nii.gz"), 2, 6))


def test_groups_csv_dry_run_and_fingerprint(tmp_path, capsys):
    root = nnunet_set(tmp_path / "ds", n=6, shape=(24, 24, 8))
    csv = tmp_path / "groups.csv"
    csv.write_text("source,group\n" + "".join(f"imagesTr/case_{i:03d}_0000.nii.gz,patient{i // 2}\n"
                                              for i in range(6)))
    assert run(root, "--out", tmp_path / "out", "--groups", csv, "--dry-run") == 0
    assert "dry run: 6 cases OK of 6, 48 slices (" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert run(root, "--out", tmp_path / "out", "--groups", csv) == 0
    split_of = {s["meta"]["case"]: s["split"] for s in read_all(tmp_path / "out").values()}
    for p in range(3):                                    # two cases of one patient: one split
        assert split_of[f"case_{2 * p:03d}"] == split_of[f"case_{2 * p + 1:03d}"]
    capsys.readouterr()
    assert run(root, "--out", tmp_path / "out", "--groups", csv) == 0
    assert "is up to date" in capsys.readouterr().out
    ds = json.loads((root / "dataset.json").read_text())
    ds["labels"]["metastasis"] = 3                        # dataset.json is an input: a new fingerprint
    (root / "dataset.json").write_text(json.dumps(ds))
    assert run(root, "--out", tmp_path / "out", "--groups", csv) == 2
    assert "already holds a packed dataset made from other inputs or options" in capsys.readouterr().err


@pytest.mark.parametrize("codec", ["png", "jp2", "raw"])
def test_raw_intensities_survive_every_lossless_codec(tmp_path, codec):
    root = nnunet_set(tmp_path / "ds", n=2)
    assert run(root, "--out", tmp_path / "out", "--codec", codec, "--split", "1,0,0") == 0
    got = read_all(tmp_path / "out")
    vol = canonical(root / "imagesTr" / "case_001_0000.nii.gz")
    for k in (0, 5, 11):
        s = got[f"case_001_z{k:04d}"]
        np.testing.assert_array_equal(s["image"].astype(np.int32) - 32768, view(vol, 2, k))
        np.testing.assert_array_equal(np.round(s["decoded"][..., 0] * 65535).astype(np.int32) - 32768, view(vol, 2, k))


def test_pydicom_rt_files_beside_a_series(tmp_path, capsys):
    """pydicom's rtstruct.dcm (written without the DICM preamble) and rtdose.dcm: folders of them
    are not image series; an RTSTRUCT as a case's only label is refused with how to convert it."""
    from pydicom.data import get_testdata_file
    root = tmp_path / "in"
    for i in range(2):
        dicom_case(root / f"P{i}" / "ct", root / f"P{i}" / "label.nii.gz", seed=i)
    for name in ("rtstruct.dcm", "rtdose.dcm"):
        (root / "P0" / name[:-4]).mkdir()
        shutil.copy(get_testdata_file(name), root / "P0" / name[:-4] / name)
    assert run(root, "--out", tmp_path / "out", "--split", "1,0,0") == 0
    log = capsys.readouterr().out
    assert "not image series, not read: P0/rtdose (RTDOSE), P0/rtstruct (RTSTRUCT)" in log
    assert len(read_all(tmp_path / "out")) == 16
    (root / "P1" / "label.nii.gz").unlink()
    (root / "P1" / "rt").mkdir()
    shutil.copy(get_testdata_file("rtstruct.dcm"), root / "P1" / "rt" / "rtstruct.dcm")
    assert run(root, "--out", tmp_path / "out2") == 2
    err = capsys.readouterr().err
    assert "P1/rt/rtstruct.dcm: is an RTSTRUCT (contours), the only label of series P1/ct/" in err
    assert "rasterise the RTSTRUCT to a NIfTI label" in err


def test_a_2d_nifti_is_one_slice(tmp_path):
    img, lab = phantom((30, 26, 1))
    a = affine_of((2.0, 2.0, 1.0))
    save_nii(tmp_path / "in" / "x.nii.gz", img[:, :, 0], a)
    save_nii(tmp_path / "in" / "x_seg.nii.gz", lab[:, :, 0], a)
    assert nib.load(str(tmp_path / "in" / "x.nii.gz")).ndim == 2
    assert run(tmp_path / "in", "--out", tmp_path / "out", "--split", "1,0,0") == 0
    got = read_all(tmp_path / "out")
    assert list(got) == ["x_z0000"] and got["x_z0000"]["image"].shape == (26, 30)
    np.testing.assert_array_equal(got["x_z0000"]["image"].astype(np.int32) - 32768, view(img, 2, 0))


def test_a_case_without_tumour_gives_no_lesion_slice(tmp_path, capsys):
    root = nnunet_set(tmp_path / "ds", n=3)
    _, lab = phantom(seed=1)
    lab[lab == 2] = 1
    save_nii(root / "labelsTr" / "case_001.nii.gz", lab, affine_of())
    assert run(root, "--out", tmp_path / "out", "--slices", "lesion", "--labels", "tumour") == 0
    assert "note: 1 case(s) gave no slice (--slices lesion: no tumour), e.g. case_001" in capsys.readouterr().out
    m = read_manifest(tmp_path / "out")
    assert m["volumes"]["cases"]["case_001"]["kept"] == 0 and m["volumes"]["cases"]["case_001"]["slices"] == 12
    assert {s["meta"]["case"] for s in read_all(tmp_path / "out").values()} == {"case_000", "case_002"}


def test_a_volume_linked_from_outside_input_is_refused_unless_followed(tmp_path, capsys):
    """Links out of INPUT are refused by the volume importers as by the 2D ones."""
    root = nnunet_set(tmp_path / "ds")
    outside = tmp_path / "outside"
    outside.mkdir()
    img = root / "imagesTr" / "case_000_0000.nii.gz"
    img.rename(outside / img.name)
    img.symlink_to(outside / img.name)
    assert run(root, "--out", tmp_path / "refused", "--split", "0.5,0.25,0.25") == 2
    err = capsys.readouterr().err
    assert "imagesTr/case_000_0000.nii.gz: leads through a link to" in err and "--follow-links" in err
    assert not (tmp_path / "refused").exists()
    assert run(root, "--out", tmp_path / "followed", "--split", "0.5,0.25,0.25", "--follow-links") == 0
    assert json.loads((tmp_path / "followed" / "manifest.json").read_text())["splits"]["train"]["samples"] > 0
