"""Training with K classes end to end on phantoms with two lesion types: K from manifest.json,
softmax Dice + cross-entropy, per-class validation metrics, --monitor val_dice/NAME, the
K-class settings checked against the dataset."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import PY, TEST_EVAL, TINY, run_cli
from multiclass_testing import coco_phantoms, pack
from tumorseg_dist import checkpoint
from tumorseg_dist.config import Config, ConfigError, check_classes, parse
from tumorseg_dist.losses import DiceBCELoss, MulticlassDiceCELoss, build_multiclass_loss_fn
from tumorseg_dist.models import ModelError, build_model

NAMES = ["background", "cyst", "mass"]


@pytest.fixture(scope="module")
def ph3(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ph")
    coco_phantoms(root / "coco", {"train": 8, "val": 4, "test": 4})
    assert pack(root / "coco", "--out", root / "k3", "--classes", "cyst=1,mass=2") == 0
    return root / "k3"


@pytest.fixture(scope="module")
def run3(ph3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "k3"
    run_cli([PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(ph3), "--out", str(out), "--epochs", "1",
             "--batch-size", "4", "--loader", "torch", "--monitor", "val_dice/mass", "--class-weights", "0.5",
             "1", "2", "--resume", "never", *TEST_EVAL], cwd=ph3.parent)
    return out


def test_k_classes_from_the_manifest(run3):
    toml = (run3 / "config.toml").read_text()
    assert "classes = 3" in toml and '"cyst"' in toml and "class_weights = [" in toml
    ckpt = checkpoint.load(run3 / "checkpoints" / "best.pt", "cpu")
    head = ckpt["model"]["segmentation_head.0.weight"]
    assert head.shape[0] == 3
    rec = json.loads((run3 / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_dice/cyst", "val_dice/mass", "val_iou/mass", "val_recall/cyst"} <= rec.keys()
    assert rec["val_dice"] == pytest.approx(
        (rec["val_dice/cyst"] + rec["val_dice/mass"]) / 2) or rec["val_dice"] != rec["val_dice"]
    test = json.loads((run3 / "test_metrics.json").read_text())
    assert sum(map(sum, test["confusion_matrix"])) == 4 * 64 * 64
    assert "test dice per class: cyst" in (run3 / "train.log").read_text()
    assert (run3 / "overlays.png").stat().st_size > 0   # the test images, classes filled by colour


def test_binary_loss_is_the_binary_loss():
    cfg = Config()
    assert isinstance(build_multiclass_loss_fn(cfg.loss, 1), DiceBCELoss)
    assert build_multiclass_loss_fn(cfg.loss, 1) == DiceBCELoss()
    k3 = build_multiclass_loss_fn(cfg.loss, 3, (0.5, 1.0, 2.0), 255)
    assert isinstance(k3, MulticlassDiceCELoss) and k3.ignore_index == 255
    # the loaders' masks are float class ids: the loss object takes them as labels
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    mask = torch.randint(0, 3, (2, 1, 8, 8))
    assert k3(logits, mask.float()).item() == pytest.approx(k3(logits, mask).item())


def test_model_outputs():
    cfg = Config().model
    cfg.encoder, cfg.encoder_weights = "resnet18", "none"
    x = torch.zeros(1, 1, 64, 64)
    assert build_model(cfg, 1)(x).shape[1] == 1
    cfg.classes = 3
    assert build_model(cfg, 1)(x).shape[1] == 3
    cfg.arch = "unet-classic"
    assert build_model(cfg, 1).head.out_channels == 3
    cfg.classes = 2
    with pytest.raises(ModelError, match="binary case"):
        build_model(cfg, 1)


@pytest.mark.parametrize("flags, says", [
    (["--monitor", "val_dice/tumour"], "no foreground class 'tumour' (its classes: cyst, mass)"),
    (["--class-weights", "1", "2"], "--class-weights has 2 values for 3 classes"),
    (["--classes", "4"], "--classes 4: the dataset"),
])
def test_k_class_settings_checked(ph3, flags, says):
    cfg, _ = parse(["--data", str(ph3), *flags])
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        check_classes(cfg, NAMES)


def test_binary_dataset_refuses_k_class_settings(tmp_path):
    cfg, _ = parse(["--data", str(tmp_path), "--ignore-index", "255"])
    with pytest.raises(ConfigError, match="are for K classes"):
        check_classes(cfg, None)
    cfg, _ = parse(["--data", str(tmp_path), "--monitor", "val_dice/x"])
    with pytest.raises(ConfigError, match="its masks are binary"):
        check_classes(cfg, None)
    with pytest.raises(ConfigError, match="--monitor 'dice'"):
        parse(["--data", str(tmp_path), "--monitor", "dice"])


def test_training_loss_fused_path_matches_reference(monkeypatch):
    """--fused-loss on with K classes: the loss object the engines call runs the Triton kernel
    (here under the interpreter) on the loaders' float masks, same value and gradient."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = Config()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 16, 16, generator=g)
    mask = torch.randint(0, 3, (2, 1, 16, 16), generator=g).float()
    mask[0, 0, 0] = 255.0
    out = {}
    for fused in ("on", "off"):
        cfg.loss.fused_loss = fused
        fn = build_multiclass_loss_fn(cfg.loss, 3, (0.5, 1.0, 2.0), 255)
        x = logits.clone().requires_grad_(True)
        loss = fn(x, mask)
        loss.backward()
        out[fused] = (loss.item(), x.grad)
    assert out["on"][0] == pytest.approx(out["off"][0], rel=1e-5)
    torch.testing.assert_close(out["on"][1], out["off"][1], rtol=1e-5, atol=1e-9)
