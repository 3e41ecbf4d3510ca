"""Whole-image inference of a `--geometry letterbox` checkpoint (issue 15): the predictor feeds
the letterboxed image as the torch loader's evaluation places it, maps the probabilities back
without the border, and `export --graph full` / `predict --onnx` do the same in the graph.

A letterbox checkpoint is made by writing data.geometry = "letterbox" into a tiny checkpoint's
config (what training with the loaders' flag records); an old checkpoint without the key is
squash."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import checkpoint, export
from tumorseg_dist.checkpoint import CheckpointError
from tumorseg_dist.data.torch_loader import _place
from tumorseg_dist.inference import Predictor, letterbox_box, load_model, preprocess
from tumorseg_dist.onnx_predictor import load_onnx

MEAN, STD = 0.3, 0.2


def with_geometry(path: Path, geometry: str | None) -> Path:
    ckpt = checkpoint.load(path, "cpu")
    if geometry is None:
        ckpt["config"]["data"].pop("geometry", None)
    else:
        ckpt["config"]["data"]["geometry"] = geometry
    checkpoint.atomic_save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def letterbox_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lb")
    return with_geometry(make_checkpoint(d / "lb.pt", tiny_config(size=64)), "letterbox")


def rand_image(h, w, seed=0):
    return np.random.default_rng(seed).random((h, w), dtype=np.float32)


@pytest.mark.parametrize("hw", [(120, 200), (200, 90), (50, 30), (64, 64), (7, 300)])
def test_the_box_is_the_loaders_placement(hw):
    """Same numbers as data/geometry.place: the loader's pad mask is 1 exactly on the box."""
    h, w = hw
    top, left, ly, lx = letterbox_box(h, w, 64)
    _, _, pad = _place(np.zeros((h, w), np.float32), np.zeros((h, w), np.float32), 64, "letterbox", "resize", None)
    expect = np.zeros((64, 64), np.float32)
    expect[top:top + ly, left:left + lx] = 1
    np.testing.assert_array_equal(pad, expect)
    assert max(ly, lx) == 64


@pytest.mark.parametrize("hw", [(120, 200), (200, 90), (130, 64)])
def test_preprocess_is_the_loaders_letterbox_when_shrinking(hw):
    """The torch loader's evaluation path (_place, then (x - mean) / std) for an image larger
    than the output: antialiased shrink, raw 0 around it. (Enlarging, the loader warps with
    OpenCV's fixed-point bilinear, ~1e-2 from torch's; only the placement is compared there.)"""
    img = rand_image(*hw, seed=1)
    x, _, _ = _place(img, np.zeros(hw, np.float32), 64, "letterbox", "resize", None)
    ours = preprocess(img, 1, 64, (MEAN,), (STD,), "letterbox")[0].numpy()
    np.testing.assert_allclose(ours, (x - MEAN) / STD, atol=1e-5)


class Identity(nn.Module):
    """The logit is the normalised input: what the model sees, made visible."""

    def forward(self, x):
        return x[:, :1]


def identity_predictor(geometry: str) -> Predictor:
    return Predictor(model=Identity(), arch="unet", encoder="test", in_channels=1, size=64,
                     mean=(MEAN,), std=(STD,), threshold=0.5, device=torch.device("cpu"),
                     config={"data": {"geometry": geometry}})


@pytest.mark.parametrize("hw", [(90, 200), (200, 45), (30, 50)])
def test_a_constant_image_maps_back_without_the_border(hw):
    """A constant image letterboxed: the box holds the constant, the border the pad value.
    Mapped back, every pixel is the constant's probability: none of the border came back."""
    img = np.full(hw, 0.9, np.float32)
    pred = identity_predictor("letterbox")
    fed = pred.preprocess(img)[0]
    top, left, ly, lx = letterbox_box(*hw, 64)
    assert float(fed[top:top + ly, left:left + lx].min()) == pytest.approx((0.9 - MEAN) / STD, abs=1e-5)
    assert float(fed[0, 0] if top or left else fed[-1, -1]) == pytest.approx((0 - MEAN) / STD)
    p = pred.probability_map(img)
    assert p.shape == hw
    want = float(torch.sigmoid(torch.tensor((0.9 - MEAN) / STD)))
    assert float(p.min()) == pytest.approx(want, abs=1e-5) and float(p.max()) == pytest.approx(want, abs=1e-5)
    mask = pred.predict_image(img)
    assert mask.shape == hw and mask.all()
    # squash would have fed the constant everywhere: the geometry changes the model's input
    assert not torch.allclose(identity_predictor("squash").preprocess(img), fed)


def test_geometry_comes_from_the_checkpoint(tmp_path, letterbox_ckpt):
    assert load_model(letterbox_ckpt).geometry == "letterbox"
    old = with_geometry(make_checkpoint(tmp_path / "old.pt", tiny_config(size=64)), None)
    assert load_model(old).geometry == "squash"
    crop = with_geometry(make_checkpoint(tmp_path / "crop.pt", tiny_config(size=64)), "crop")
    assert load_model(crop).geometry == "letterbox"          # crop evaluates as letterbox
    bad = with_geometry(make_checkpoint(tmp_path / "bad.pt", tiny_config(size=64)), "fisheye")
    with pytest.raises(CheckpointError, match="bad.pt: .*geometry 'fisheye'"):
        load_model(bad)


def test_onnx_full_graph_letterboxes_as_the_predictor(tmp_path, letterbox_ckpt):
    """export's own check compares the graph with the predictor (it fails the export if they
    disagree); here, on other non-square images, the masks of `predict --onnx`'s predictor
    equal the PyTorch predictor's, and the probabilities agree to 1e-5."""
    onnx_path = tmp_path / "lb.onnx"
    assert export.main(["--checkpoint", str(letterbox_ckpt), "--onnx", str(onnx_path)]) == 0
    torch_pred, onnx_pred = load_model(letterbox_ckpt), load_onnx(onnx_path)
    for hw, seed in (((90, 170), 3), ((151, 64), 4), ((40, 33), 5)):
        img = np.round(rand_image(*hw, seed=seed) * 255) / 255       # 8-bit pixels, exactly
        pt = torch_pred.probability_map(img).numpy()
        po = onnx_pred.probability_map(img)
        assert po.shape == hw
        np.testing.assert_allclose(po, pt, atol=1e-5)
        t = float(np.median(pt))                                      # a threshold that splits
        np.testing.assert_array_equal(onnx_pred.predict_image(img, threshold=t),
                                      torch_pred.predict_image(img, threshold=t))
        squash = load_model(letterbox_ckpt)
        squash.config = {**squash.config, "data": {**squash.config["data"], "geometry": "squash"}}
        assert np.abs(squash.probability_map(img).numpy() - po).max() > 1e-3   # the graph letterboxes


def test_evaluate_scoring_undoes_the_letterbox():
    """scoring.score (evaluate's and training's test scoring) with the predictor's geometry: a
    letterbox map that is 1 on the image's box and 0 on the border is all tumour at the image's
    size; read as squash, the border would come back as background along two sides."""
    from tumorseg_dist.scoring import class_score, score
    h, w = 50, 120
    top, left, ly, lx = letterbox_box(h, w, 64)
    prob = torch.zeros(1, 64, 64)
    prob[:, top:top + ly, left:left + lx] = 1
    mask = np.ones((h, w), bool)
    pred, _, counts = score(prob, mask, 0.5, "original", 64, "letterbox")
    assert pred.all() and counts.tolist() == [h * w, 0, 0, 0]
    assert not score(prob, mask, 0.5, "original", 64)[0].all()
    k_prob = torch.stack([1 - prob[0], prob[0]])
    labels, _ = class_score(k_prob, mask.astype(np.uint8), "original", 64, "letterbox")
    assert (labels == 1).all()


def test_model_resolution_counts_only_the_letterbox_box():
    """`--resolution model` compares where training's metrics compare: for a letterbox model only
    the image's box in the letterbox (Batch.pad's real pixels), against the mask resized to that
    box. Counting the border would add its pixels as false positives (map 1 there) here."""
    from tumorseg_dist.scoring import class_score, score
    h, w = 50, 120
    top, left, ly, lx = letterbox_box(h, w, 64)
    prob = torch.ones(1, 64, 64)   # tumour everywhere, border included
    mask = np.ones((h, w), bool)
    pred, target, counts = score(prob, mask, 0.5, "model", 64, "letterbox")
    assert pred.shape == target.shape == (ly, lx) and counts.tolist() == [ly * lx, 0, 0, 0]
    _, _, squashed = score(prob, mask, 0.5, "model", 64)
    assert squashed.tolist() == [64 * 64, 0, 0, 0]   # squash: the whole square is the image
    k_prob = torch.stack([1 - prob[0], prob[0]])
    labels, k_target = class_score(k_prob, mask.astype(np.uint8), "model", 64, "letterbox")
    assert labels.shape == k_target.shape == (ly, lx) and (labels == 1).all() and (k_target == 1).all()
