"""Training's end-of-run test evaluation is `evaluate`'s: test_metrics.json equals `evaluate` on
the checkpoint training tested (each image through the predictor, at its original size), with
one process and EMA weights, with two DeepSpeed ranks, and for K classes. The data are stored
at 80 px and trained at 64 px, so a test metric counted at the training size would differ."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import PY, TEST_EVAL, TINY, TORCHRUN, run_cli
from multiclass_testing import coco_phantoms, pack
from tumorseg_dist import evaluate

STORED = 80   # TINY trains at 64
RATIOS = ("dice", "iou", "precision", "recall", "accuracy", "mean_image_dice", "mean_image_iou")
DS_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def shards80(tmp_path_factory) -> Path:
    from tumorseg_dist.data.synthetic import pack_synthetic
    out = tmp_path_factory.mktemp("shards") / "synthetic80"
    pack_synthetic(out, n=61, size=STORED, seed=1)   # test: 5 images (groups of 4)
    return out


def train(cmd: list, data: Path, run: Path, *extra) -> dict:
    run_cli([*cmd, "-m", "tumorseg_dist.train", *TINY, "--data", str(data), "--out", str(run),
             "--batch-size", "4", "--resume", "never", *TEST_EVAL, *extra], cwd=run.parent, env=DS_ENV)
    return json.loads((run / "test_metrics.json").read_text())


def evaluated(run: Path, *extra) -> dict:
    out = run / f"eval{'-'.join(extra)}"
    assert evaluate.main(["--checkpoint", str(run / "checkpoints" / "best.pt"), "--out", str(out),
                          "--workers", "0", "--cases", "0", "--device", "cpu", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def assert_same(test: dict, ev: dict, keys=RATIOS) -> None:
    assert test["samples"] == ev["samples"] > 0
    for k in keys:
        assert test[k] == pytest.approx(ev[k], rel=1e-9, abs=1e-12), k


def test_one_process_with_ema_equals_evaluate_on_best(tmp_path, shards80):
    run = tmp_path / "run"
    test = train([PY], shards80, run, "--epochs", "1", "--ema-decay", "0.5")
    ev = evaluated(run)
    assert ev["resolution"] == "original" and ev["inference"] == "whole" and not ev["tta"]
    assert_same(test, ev)
    assert test["resolution"] == "original" and test["inference"] == "whole"
    assert {"best_epoch", "stopped", "loss"} <= test.keys() and test["loss"] == test["loss"]
    assert (run / "overlays.png").stat().st_size > 0
    assert "test (5 images at their original size" in (run / "train.log").read_text()
    # The data are not stored at the training size: counted there, the metrics differ.
    at_model = evaluated(run, "--resolution", "model")
    assert at_model["accuracy"] != pytest.approx(test["accuracy"], rel=1e-9, abs=1e-12)


@pytest.mark.slow  # two torchrun ranks with DeepSpeed on gloo: ~40 s on 2 cores
def test_two_deepspeed_ranks_equal_evaluate_on_best(tmp_path, shards80):
    """Each rank scores its half of the test split (5 images: ranks of 3 and 2, no padding
    counted); the reduced numbers equal one process evaluating the saved checkpoint."""
    run = tmp_path / "run"
    test = train([TORCHRUN, "--nproc-per-node", "2", "--standalone"], shards80, run, "--epochs", "1",
                 "--engine", "deepspeed", "--zero-stage", "2")
    assert_same(test, evaluated(run))


def test_k_classes_equal_evaluate_on_best(tmp_path):
    root = tmp_path / "ph"
    coco_phantoms(root / "coco", {"train": 8, "val": 4, "test": 4}, size=STORED)
    assert pack(root / "coco", "--out", root / "k3", "--classes", "cyst=1,mass=2") == 0
    run = tmp_path / "run"
    test = train([PY], root / "k3", run, "--epochs", "1", "--loader", "torch")
    ev = evaluated(run)
    assert_same(test, ev, RATIOS + ("dice/cyst", "dice/mass", "iou/mass", "recall/cyst"))
    assert test["confusion_matrix"] == ev["confusion_matrix"]
    assert sum(map(sum, test["confusion_matrix"])) == 4 * STORED * STORED   # every original pixel
