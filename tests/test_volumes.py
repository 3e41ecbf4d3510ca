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
from tumorseg_dist.pack import main as pack

SPACING = (0.8, 0.9, 2.5)


# ---------------------------------------------------------------- building cases

def phantom(shape=(40, 36, 12), seed=0, tumour_at=(0.55, 0.5, 0.5)):
    """(int16 HU image, uint8 label: 1 organ, 2 tumour). Air -1000 outside the body."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"), -1)
    body = (((grid - 0.5) / [0.45, 0.42, 2.0]) ** 2).sum(-1) < 1
    organ = (((grid - [0.45, 0.5, 0.5]) / [0.25, 0.22, 0.38]) ** 2).sum(-1) < 1
    tumour = (((grid - tumour_at) / [0.1, 0.12, 0.2]) ** 2).sum(-1) < 1
    img = np.full(shape, -1000, np.int16)
    img[body] = 20
    img[organ] = 60
    img[tumour] = 110
    img = (img + rng.integers(-30, 31, shape)).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[organ] = 1
    lab[tumour & organ] = 2
    return img, lab


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
    return np.flip(s.T, (0, 1))


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
