"""predict: original sizes and names (BUSI), unreadable inputs, shards with ground truth,
flip-TTA, image modes, and checkpoints from other versions."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import SHARED_DATA
from inference_testing import (TIFF_BAD, TIFF_CASES, TIFF_H, TIFF_W, make_checkpoint, tiff_folder,
                               tiny_config, write_tiff)
from tumorseg_dist import imageio, predict
from tumorseg_dist.checkpoint import CheckpointError
from tumorseg_dist.data.shards import IndexedShards, decode_mask
from tumorseg_dist.data.shards import shard_paths
from tumorseg_dist.inference import flip_tta_probs, load_model

BUSI = SHARED_DATA / "busi" / "dataset"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synthetic_shards) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(d / "best.pt", tiny_config(size=64, in_channels=3, data=synthetic_shards))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(not BUSI.is_dir(), reason="shared/data/busi not present")
def test_busi_folder_round_trips_original_sizes_and_names(tmp_path, ckpt):
    """Odd sizes, spaces and parentheses; mask files in the folder are not predicted; an
    unreadable file and a missing input are reported and skipped, the rest written."""
    src = tmp_path / "in"
    shutil.copytree(BUSI / "malignant", src / "malignant")
    (src / "malignant" / "broken (1).png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    images = sorted(p for p in (src / "malignant").glob("*.png")
                    if "_mask" not in p.name and not p.name.startswith("broken"))
    out = tmp_path / "out"
    rc = predict.main(["--checkpoint", str(ckpt), str(src), str(tmp_path / "missing.png"),
                       "--out", str(out), "--workers", "0", "--batch-size", "7", "--overlay"])
    assert rc == 1  # some inputs skipped, the rest written
    written = sorted((out / "masks" / "malignant").glob("*.png"))
    assert [p.name for p in written] == [p.name for p in images]  # "malignant (1).png" ...
    sizes = set()
    for img in images:
        mask = Image.open(out / "masks" / "malignant" / img.name)
        overlay = Image.open(out / "overlays" / "malignant" / img.name)
        original = Image.open(img).size
        assert mask.size == original and overlay.size == original and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        sizes.add(original)
    assert len(sizes) > 10  # BUSI's many different sizes really were exercised
    rows = read_csv(out / "areas.csv")
    assert len(rows) == len(images)
    for r in rows:
        m = np.asarray(Image.open(out / r["mask"]))
        assert int(r["lesion_pixels"]) == int((m > 0).sum())
        assert (int(r["width"]), int(r["height"])) == Image.open(r["input"]).size
    skipped = read_csv(out / "skipped.csv")
    assert {Path(s["input"]).name for s in skipped} == {"broken (1).png", "missing.png"}


def test_shard_input_writes_source_names_and_ground_truth(tmp_path, ckpt, synthetic_shards):
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(ckpt), str(synthetic_shards), "--split", "test",
                         "--out", str(out), "--workers", "0", "--overlay", "--tta"]) == 0
    ds = IndexedShards(shard_paths(synthetic_shards, "test"))
    rows = {r["mask"]: r for r in read_csv(out / "areas.csv")}
    assert len(rows) == len(ds) == 4
    for i in range(len(ds)):
        m = ds.read_member(i)
        meta = json.loads(m["json"])
        r = rows[f"masks/{Path(meta['source']).with_suffix('.png')}"]
        assert int(r["gt_pixels"]) == int(decode_mask(m["mask.png"]).sum())
        assert (int(r["height"]), int(r["width"])) == (meta["height"], meta["width"])
    assert len(list((out / "overlays").rglob("*.png"))) == 4
    assert not (out / "skipped.csv").exists()


class Pointwise(nn.Module):
    """A 1x1 conv then a centre-symmetric 3x3 conv: commutes with both flips."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 1, 3, padding=1)
        with torch.no_grad():
            w = self.b.weight
            w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_flip_tta_of_an_equivariant_model_equals_no_tta():
    torch.manual_seed(0)
    model, x = Pointwise().eval(), torch.randn(2, 3, 16, 16)
    assert torch.allclose(flip_tta_probs(model, x, True), flip_tta_probs(model, x, False), atol=1e-6)


def test_flip_tta_averages_un_flipped_probabilities():
    torch.manual_seed(0)
    model, x = nn.Conv2d(3, 1, 3, padding=1).eval(), torch.randn(2, 3, 16, 16)
    plain, tta = flip_tta_probs(model, x, False), flip_tta_probs(model, x, True)
    assert not torch.allclose(plain, tta, atol=1e-4)  # this model is not flip-equivariant
    want = sum(torch.sigmoid(model(x.flip(d))).flip(d) if d else torch.sigmoid(model(x))
               for d in [(), (-1,), (-2,), (-2, -1)]) / 4
    assert torch.allclose(tta, want, atol=1e-6)
    # the averaged prediction itself is flip-equivariant
    assert torch.allclose(flip_tta_probs(model, x.flip(-1), True), tta.flip(-1), atol=1e-6)


@pytest.mark.parametrize("mode,array,expect", [
    ("1", np.array([[0, 1], [1, 0]], bool), np.array([[0, 1], [1, 0]], np.float32)),
    ("L", np.array([[0, 255], [51, 0]], np.uint8), np.array([[0, 1], [0.2, 0]], np.float32)),
    ("I;16", np.array([[0, 65535], [13107, 0]], np.uint16), np.array([[0, 1], [0.2, 0]], np.float32)),
])
def test_read_image_scales_modes_to_unit_range(tmp_path, mode, array, expect):
    p = tmp_path / "x.png"
    Image.fromarray(array).convert(mode).save(p) if mode == "1" else Image.fromarray(array).save(p)
    got = imageio.read_image(p)
    np.testing.assert_allclose(got, expect, atol=1e-6)


def test_read_image_tiff_rgb_and_palette(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.tif", compression="tiff_lzw")
    np.testing.assert_allclose(imageio.read_image(tmp_path / "a.tif"), rgb / 255.0, atol=1e-6)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert imageio.read_image(tmp_path / "p.png").shape == (9, 7, 3)
    with pytest.raises(imageio.ImageFileError, match="cannot be decoded as an image"):
        (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
        imageio.read_image(tmp_path / "bad.tif")


# ---------------------------------------------------------------- checkpoints from other versions

def edited(src: Path, dst: Path, edit) -> Path:
    ck = torch.load(src, weights_only=True)
    edit(ck)
    torch.save(ck, dst)
    return dst


def test_older_checkpoint_without_config_is_a_clear_error(tmp_path, ckpt):
    p = edited(ckpt, tmp_path / "old.pt", lambda c: c.pop("config"))
    with pytest.raises(CheckpointError, match="no training config"):
        load_model(p)
    assert predict.main(["--checkpoint", str(p), str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_checkpoint_with_unknown_keys_and_no_normalization_record_loads(tmp_path, ckpt):
    def edit(c):
        c["config"]["data"]["renamed_in_some_version"] = 1
        c["config"]["legacy_section"] = {"x": 1}
        c.pop("normalization")  # older: only config data.mean/std
    m = load_model(edited(ckpt, tmp_path / "v0.pt", edit))
    assert m.mean == (0.3, 0.3, 0.3) and m.size == 64 and m.in_channels == 3


def test_ema_weights_are_preferred(tmp_path, ckpt):
    def edit(c):
        c["ema"] = {k: (v + 1 if v.is_floating_point() else v) for k, v in c["model"].items()}
    m = load_model(edited(ckpt, tmp_path / "ema.pt", edit))
    plain = torch.load(ckpt, weights_only=True)["model"]
    k = next(k for k, v in plain.items() if v.is_floating_point())
    assert torch.equal(m.model.state_dict()[k], plain[k] + 1)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(format_version=99), "newer than this"),
    (lambda c: c["config"]["model"].update(arch="segformer"), "architecture 'segformer' is unknown"),
    (lambda c: c["config"]["data"].pop("size"), "lacks data.size"),
    (lambda c: (c["config"]["data"].update(in_channels=1),
                c.update(normalization={"mean": [0.3], "std": [0.2]})), "weights do not fit"),
    (lambda c: (c.pop("normalization"), c["config"]["data"].update(mean=[])), "no input normalisation"),
])
def test_incompatible_checkpoints_name_the_problem(tmp_path, ckpt, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(edited(ckpt, tmp_path / "x.pt", edit))


# ---------------------------------------------------------------- multi-channel and stacked TIFFs

@pytest.mark.parametrize("name,shape,kwargs,expect", TIFF_CASES, ids=[c[0] for c in TIFF_CASES])
def test_one_reader_rule_for_tiffs(tmp_path, name, shape, kwargs, expect):
    """Channels-last, planar and stacked TIFFs: read as the file's tags say, or refused with
    the file, its shape and what is supported."""
    want = write_tiff(tmp_path / f"{name}.tif", shape, kwargs)
    if isinstance(expect, tuple):
        got = imageio.read_array(tmp_path / f"{name}.tif", name)
        assert got.shape == expect and np.array_equal(got, want)
    else:
        with pytest.raises(imageio.ImageFileError) as e:
            imageio.read_array(tmp_path / f"{name}.tif", f"{name}.tif")
        msg = str(e.value)
        assert msg.startswith(f"{name}.tif: {expect}") and str(shape) in msg and "supported:" in msg


def frames_png(path: Path, n: int, fmt: str = "PNG") -> None:
    """An animated PNG (or, fmt="GIF", a GIF named .png) of n different frames."""
    rng = np.random.default_rng(n)
    frames = [Image.fromarray(rng.integers(0, 255, (24, 30), dtype=np.uint8)) for _ in range(n)]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_a_file_of_several_frames_is_a_stack_in_any_format(tmp_path, fmt):
    """The TIFF rule for every format: several frames are a stack, refused by name and count;
    one frame of the same format reads as usual."""
    frames_png(tmp_path / "anim.png", 3, fmt)
    with pytest.raises(imageio.ImageFileError) as e:
        imageio.read_array(tmp_path / "anim.png", "anim.png")
    assert str(e.value).startswith(f"anim.png: is a stack of 3 frames ({fmt}, each 30x24)"), str(e.value)
    frames_png(tmp_path / "one.png", 1, fmt)
    assert imageio.read_array(tmp_path / "one.png", "one.png").shape[:2] == (24, 30)   # a GIF: palette -> RGB


def test_a_multi_picture_jpeg_is_its_first_picture(tmp_path):
    """MPO (a JPEG carrying previews or a depth map of the same photo) is one image: the first."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
    photo.save(tmp_path / "p.jpg", "MPO", save_all=True, append_images=[photo.resize((20, 16))])
    with Image.open(tmp_path / "p.jpg") as im:
        assert (im.format, im.n_frames) == ("MPO", 2)
        first = np.asarray(im.convert("RGB"))
    got = imageio.read_array(tmp_path / "p.jpg", "p.jpg")
    assert got.shape == (32, 40, 3) and np.array_equal(got, first)


def test_predict_writes_image_sized_masks_for_tiffs_and_refuses_stacks(tmp_path, ckpt):
    want = tiff_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(ckpt), str(tmp_path / "in"), "--out", str(out),
                         "--workers", "0", "--overlay"]) == 1  # the refused ones are skipped
    for name in want:
        for d in ("masks", "overlays"):
            assert Image.open(out / d / f"{name}.png").size == (TIFF_W, TIFF_H), (d, name)
    skipped = {Path(r["input"]).stem: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert set(skipped) == {c[0] for c in TIFF_BAD}
    for name, shape, _, expect in TIFF_BAD:
        assert expect in skipped[name] and str(shape) in skipped[name] and f"{name}.tif" in skipped[name]
