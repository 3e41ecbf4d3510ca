"""Ensembles: evaluate/predict with several --checkpoint average the models' probabilities (flip
TTA inside each), in the one predictor; checkpoints that cannot be averaged are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import evaluate, predict
from tumorseg_dist.checkpoint import CheckpointError
from tumorseg_dist.inference import load_ensemble, load_model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, synthetic_shards):
    """Three fold-like runs with different weights and different normalisations."""
    root = tmp_path_factory.mktemp("ens")
    out = []
    for i, (mean, std) in enumerate([((0.3,), (0.2,)), ((0.45,), (0.25,)), ((0.3,), (0.2,))]):
        cfg = tiny_config(data=synthetic_shards, mean=mean, std=std)
        out.append(make_checkpoint(root / f"run-f{i}" / "checkpoints" / "best.pt", cfg, seed=i))
    return out


def _image(seed=0, h=70, w=90):
    return np.random.default_rng(seed).random((h, w), dtype=np.float32)


@pytest.mark.parametrize("tta", [False, True])
def test_ensemble_is_the_mean_of_its_models(ckpts, tta):
    img = _image()
    singles = [load_model(c) for c in ckpts]
    want = torch.stack([m.probabilities(m.preprocess(img)[None], tta) for m in singles]).mean(0)
    ens = load_ensemble(ckpts)
    assert ens.name == "ensemble of 3 (unet/resnet18)" and ens.sources == list(ckpts)
    got = ens.probabilities(ens.preprocess(img)[None], tta)   # one preprocessing, the first's
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    # the members differ, so the mean is not any one of them
    assert min(float((got - m.probabilities(m.preprocess(img)[None], tta)).abs().max()) for m in singles) > 1e-3
    # whole-image map at the image's size and the sliding window: the same averaging
    maps = [m.probability_map(img, tta, "sliding", 0.5, 4) for m in singles]
    torch.testing.assert_close(ens.probability_map(img, tta, "sliding", 0.5, 4), torch.stack(maps).mean(0),
                               atol=2e-6, rtol=0)


def test_a_single_checkpoint_is_the_plain_predictor(ckpts):
    one = load_ensemble(ckpts[:1])
    assert one.members == () and one.name == "unet/resnet18"


@pytest.mark.parametrize("change,what", [({"size": 96}, "input size 96 vs 64"),
                                         ({"in_channels": 3}, "input channels 3 vs 1")])
def test_incompatible_checkpoints_name_both_files(ckpts, tmp_path, change, what):
    cfg = tiny_config(**change)
    odd = make_checkpoint(tmp_path / "odd.pt", cfg)
    with pytest.raises(CheckpointError) as e:
        load_ensemble([ckpts[0], odd])
    assert str(odd) in str(e.value) and str(ckpts[0]) in str(e.value) and what in str(e.value)


def test_different_thresholds_need_the_flag(ckpts, tmp_path):
    cfg = tiny_config()
    cfg.train.threshold = 0.3
    odd = make_checkpoint(tmp_path / "t.pt", cfg)
    with pytest.raises(CheckpointError, match="pass --threshold"):
        load_ensemble([ckpts[0], odd])
    assert load_ensemble([ckpts[0], odd], threshold=0.5).members


def test_evaluate_ensemble(ckpts, synthetic_shards, tmp_path):
    args = ["--split", "test", "--device", "cpu", "--workers", "0", "--cases", "0"]
    assert evaluate.main(["--checkpoint", str(ckpts[0]), "--out", str(tmp_path / "one"), *args]) == 0
    # the same model twice is that model: the averaging itself changes nothing
    assert evaluate.main(["--checkpoint", str(ckpts[0]), "--checkpoint", str(ckpts[0]),
                          "--out", str(tmp_path / "twice"), *args]) == 0
    one, twice = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "twice"))
    for k in ("dice", "iou", "mean_image_dice", "hd95_mean", "samples"):
        assert one[k] == pytest.approx(twice[k], abs=1e-9), k
    assert one["ensemble"] == 1 and twice["ensemble"] == 2 and isinstance(twice["checkpoint"], list)
    # three checkpoints, TTA on, default output folder beside the runs
    assert evaluate.main([*sum((["--checkpoint", str(c)] for c in ckpts), []), "--tta", *args]) == 0
    out = ckpts[0].parents[2] / "ensemble-run-f0+run-f1+run-f2" / "eval-test-tta"
    m = json.loads((out / "metrics.json").read_text())
    assert m["ensemble"] == 3 and m["tta"] and m["checkpoint"] == [str(c) for c in ckpts]


def test_evaluate_refuses_val_of_several_folds(ckpts, synthetic_shards, tmp_path, capsys):
    folds = []
    for k in range(2):
        cfg = tiny_config(data=synthetic_shards)
        cfg.data.fold = k
        folds.append(make_checkpoint(tmp_path / f"f{k}.pt", cfg, seed=k))
    rc = evaluate.main(["--checkpoint", str(folds[0]), "--checkpoint", str(folds[1]), "--split", "val",
                        "--device", "cpu", "--workers", "0"])
    assert rc == 2 and "different folds (0, 1)" in capsys.readouterr().err


def test_predict_ensemble_writes_the_averaged_mask(ckpts, tmp_path):
    img = (_image(3) * 255).astype(np.uint8)
    src = tmp_path / "in.png"
    Image.fromarray(img).save(src)
    out = tmp_path / "out"
    assert predict.main([str(src), *sum((["--checkpoint", str(c)] for c in ckpts), []), "--out", str(out),
                         "--device", "cpu", "--workers", "0", "--tta"]) == 0
    singles = [load_model(c) for c in ckpts]
    x = img.astype(np.float32) / 255
    probs = torch.stack([m.probability_map(x, True) for m in singles]).mean(0)
    want = (probs > singles[0].threshold).numpy()
    got = np.asarray(Image.open(out / "masks" / "in.png")) > 0
    assert got.shape == want.shape and (got == want).mean() > 0.999   # bilinear resize ties aside


def test_a_k_class_checkpoint_cannot_join_a_binary_ensemble(ckpts, tmp_path):
    cfg = tiny_config()
    cfg.model.classes = 3
    odd = make_checkpoint(tmp_path / "k3.pt", cfg)
    with pytest.raises(CheckpointError) as e:
        load_ensemble([ckpts[0], odd])
    assert "output classes 3 vs 1" in str(e.value) and str(odd) in str(e.value) and str(ckpts[0]) in str(e.value)
