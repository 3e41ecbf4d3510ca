"""pack --classes: K-class label masks per format (folders/suffix by folder, COCO by category,
volumes by label value), the manifest's per-class counts, --overlap, and the one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from multiclass_testing import BUSI, BUSI_CLASSES, all_masks, coco_phantoms, pack
from tumorseg_dist.data.formats.classes import parse_classes


@pytest.fixture(scope="module")
def busi3(tmp_path_factory):
    if not BUSI.is_dir():
        pytest.skip(f"real BUSI subset not found at {BUSI}")
    out = tmp_path_factory.mktemp("busi") / "busi3"
    assert pack(BUSI, "--out", out, "--classes", BUSI_CLASSES) == 0
    return out


def test_busi_label_masks_and_counts(busi3):
    m = json.loads((busi3 / "manifest.json").read_text())
    c = m["classes"]
    assert c["names"] == ["background", "benign", "malignant"] and c["mask"] == "label"
    assert c["ids"] == {"background": 0, "benign": 1, "malignant": 2} and c["mapping"] == BUSI_CLASSES
    for split in ("train", "val", "test"):
        masks = all_masks(busi3, split)
        pixels = np.zeros(3, int)
        images = np.zeros(3, int)
        for key, mask in masks.items():
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2}
            want = 1 if "benign" in key else 2 if "malignant" in key else None
            # an image holds only its folder's class; normal images are all background
            assert set(np.unique(mask)) <= {0} | ({want} if want else set()), key
            bc = np.bincount(mask.ravel(), minlength=3)
            pixels += bc
            images += bc > 0
        assert c["pixels"][split] == pixels.tolist() and c["images"][split] == images.tolist()
        assert sum(c["images"][split][1:]) > 0 or split == "test"
    # the source's own masks, read independently: benign (25) has a second mask, united
    every = {k: v for sp in ("train", "val", "test") for k, v in all_masks(busi3, sp).items()}
    a = np.asarray(Image.open(BUSI / "dataset/benign/benign (25)_mask.png")) != 0
    b = np.asarray(Image.open(BUSI / "dataset/benign/benign (25)_mask_1.png")) != 0
    np.testing.assert_array_equal(every["dataset_benign_benign_25"], (a | b).astype(np.uint8))
    mal = np.asarray(Image.open(BUSI / "dataset/malignant/malignant (3)_mask.png")) != 0
    np.testing.assert_array_equal(every["dataset_malignant_malignant_3"], mal.astype(np.uint8) * 2)


def test_one_class_stays_binary(tmp_path):
    if not BUSI.is_dir():
        pytest.skip("no BUSI")
    out = tmp_path / "mal"
    assert pack(BUSI, "--out", out, "--classes", "malignant=1,benign=0,normal=0") == 0
    c = json.loads((out / "manifest.json").read_text())["classes"]
    assert c["mask"] == "binary" and c["names"] == ["background", "malignant"]
    for split in ("train", "val"):
        for key, mask in all_masks(out, split).items():
            assert set(np.unique(mask)) <= ({0, 255} if "malignant" in key else {0}), key


@pytest.mark.parametrize("classes, says", [
    ("benign=1,malignant=2", "normal (1)_mask.png: matches no class of --classes benign=1,malignant=2"),
    ("benin=1,malignant=2,normal=0", "'benin' matches no mask under INPUT"),
    ("benign=1,malignant=3", "class ids must be 1..2 without gaps"),
    ("benign,malignant=2", "is not KEY=ID"),
])
def test_bad_classes_are_one_line_errors(tmp_path, capsys, classes, says):
    if not BUSI.is_dir():
        pytest.skip("no BUSI")
    try:
        rc = pack(BUSI, "--out", tmp_path / "x", "--classes", classes, "--dry-run")
    except SystemExit as e:   # a flag that does not parse exits as argparse does
        rc = e.code
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and len([line for line in err if line.startswith("pack: error")]) == 1
    assert not (tmp_path / "x").exists()


def test_lidc_stays_binary(tmp_path, capsys):
    lidc = BUSI.parent / "lung_nodule_ct_slices"
    if not lidc.is_dir():
        pytest.skip("no LIDC subset")
    assert pack(lidc, "--out", tmp_path / "x", "--classes", "nodule=1", "--dry-run") != 0
    assert "LIDC masks are one class" in capsys.readouterr().err


def test_coco_by_category_and_overlap(tmp_path, capsys):
    root = coco_phantoms(tmp_path / "coco", {"train": 8, "val": 4, "test": 4})
    want_overlap = {}
    outs = {}
    for rule in ("last", "first"):
        outs[rule] = tmp_path / rule
        assert pack(root, "--out", outs[rule], "--classes", "cyst=1,id:2=2", "--overlap", rule) == 0
        c = json.loads((outs[rule] / "manifest.json").read_text())["classes"]
        assert c["names"] == ["background", "cyst", "mass"] and c["overlap"] == rule
        want_overlap[rule] = c["overlap_pixels"]
    assert want_overlap["last"] == want_overlap["first"] > 0
    last, first = all_masks(outs["last"], "train"), all_masks(outs["first"], "train")
    overlapped = last["train_train_000"] != first["train_train_000"]
    # the square is drawn after the disk: last gives its pixels to mass, first to cyst
    assert overlapped.any() and (last["train_train_000"][overlapped] == 2).all() and (first["train_train_000"][overlapped] == 1).all()
    assert all(set(np.unique(v)) <= {0, 1, 2} for v in last.values())
    assert pack(root, "--out", tmp_path / "err", "--classes", "cyst=1,mass=2", "--overlap", "error") != 0
    err = capsys.readouterr().err
    assert "test/test_000.png: 86 pixel(s)" in err and "claimed by classes 1 and 2" in err and "--overlap last|first" in err
    assert pack(root, "--out", tmp_path / "bad", "--classes", "tumour=1") != 0
    assert "--classes 'tumour' matches no category" in capsys.readouterr().err


def test_volume_classes_by_label_value(tmp_path):
    from test_volumes import canonical, nnunet_set, view
    root = nnunet_set(tmp_path / "ds", n=3)
    for spec in ("1=1,2=2", "liver=1,tumour=2"):
        out = tmp_path / spec.replace(",", "_").replace("=", "-")
        assert pack(root, "--out", out, "--classes", spec) == 0
        m = json.loads((out / "manifest.json").read_text())
        assert m["classes"]["names"] == ["background", "liver", "tumour"] and m["classes"]["mask"] == "label"
        lab = canonical(root / "labelsTr" / "case_001.nii.gz")
        split = next(sp for sp in ("train", "val", "test") if "case_001_z0006" in all_masks(out, sp))
        np.testing.assert_array_equal(all_masks(out, split)["case_001_z0006"], view(lab, 2, 6))
    assert pack(root, "--out", tmp_path / "both", "--classes", "1=1", "--labels", "2") != 0


def test_no_classes_is_unchanged_binary(tmp_path):
    root = coco_phantoms(tmp_path / "coco", {"train": 4, "val": 2, "test": 2})
    assert pack(root, "--out", tmp_path / "bin") == 0
    m = json.loads((tmp_path / "bin" / "manifest.json").read_text())
    assert "classes" not in m
    assert all(set(np.unique(v)) <= {0, 255} for v in all_masks(tmp_path / "bin", "train").values())
    assert parse_classes(None) is None


def test_slurm_merge_sums_the_class_counts(tmp_path):
    root = coco_phantoms(tmp_path / "coco", {"train": 6, "val": 3, "test": 3})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    opts = ["--classes", "cyst=1,mass=2"]
    assert pack(root, "--out", whole, *opts) == 0
    for i in range(3):
        assert pack(root, "--out", parts, "--task-index", i, "--num-tasks", 3, *opts) == 0
    assert pack("--merge", "--out", parts) == 0
    a = json.loads((whole / "manifest.json").read_text())["classes"]
    b = json.loads((parts / "manifest.json").read_text())["classes"]
    assert a == b and sum(a["pixels"]["train"]) == 6 * 64 * 64 and a["overlap_pixels"] > 0
