"""K-class metrics: per-class counts from one confusion matrix (checked against numpy and smp's
get_stats), the foreground mean, ignore_index and padding left out, and exactness across ranks
(one process and 2 real gloo ranks give the same numbers)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import REPO, TORCHRUN, run_cli
from inference_testing import tiny_config
from multiclass_testing import coco_phantoms, pack
from tumorseg_dist.data.loader import build_loader
from tumorseg_dist.dist import DistInfo
from tumorseg_dist.engines import build_engine
from tumorseg_dist.losses import MulticlassDiceCELoss
from tumorseg_dist.loop import evaluate
from tumorseg_dist.metrics import ClassMetricAccumulator, summarize_classes
from tumorseg_dist.models import build_model

NAMES = ["background", "cyst", "mass"]


def test_counts_match_numpy_and_smp():
    import segmentation_models_pytorch as smp
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 16, 16, generator=g)
    target = torch.randint(0, 3, (5, 1, 16, 16), generator=g).float()
    target[0, 0, :4] = 7            # ignored
    valid = torch.tensor([True, True, True, True, False])   # the last one is rank padding
    acc = ClassMetricAccumulator(torch.device("cpu"), 3, ignore_index=7)
    acc.update(logits, target, valid)
    got = summarize_classes(acc.reduce()[0], NAMES)
    pred, t = logits.argmax(1)[:4].numpy(), target[:4, 0].numpy().astype(int)
    keep = t != 7
    tp, fp, fn, tn = smp.metrics.get_stats(torch.from_numpy(np.where(keep, pred, 7)), torch.from_numpy(t),
                                           mode="multiclass", num_classes=3, ignore_index=7)
    for k, name in enumerate(NAMES[1:], 1):
        p, q = (pred == k) & keep, (t == k) & keep
        want = 2 * (p & q).sum() / (p.sum() + q.sum())
        assert got[f"dice/{name}"] == pytest.approx(want, abs=1e-12)
        a, b, c = tp[:, k].sum().item(), fp[:, k].sum().item(), fn[:, k].sum().item()
        assert got[f"dice/{name}"] == pytest.approx(2 * a / (2 * a + b + c), abs=1e-12)
        assert got[f"precision/{name}"] == pytest.approx(a / (a + b), abs=1e-12)
        assert got[f"recall/{name}"] == pytest.approx(a / (a + c), abs=1e-12)
        assert got[f"iou/{name}"] == pytest.approx(a / (a + b + c), abs=1e-12)
    assert got["dice"] == pytest.approx((got["dice/cyst"] + got["dice/mass"]) / 2)
    assert got["accuracy"] == pytest.approx(((pred == t) & keep).sum() / keep.sum())
    assert got["samples"] == 4


def test_a_class_absent_everywhere_is_left_out_of_the_mean():
    logits = torch.zeros(2, 3, 8, 8)
    logits[:, 1] = 1.0              # predicts cyst everywhere; the target is cyst everywhere
    target = torch.ones(2, 1, 8, 8)
    acc = ClassMetricAccumulator(torch.device("cpu"), 3)
    acc.update(logits, target, torch.tensor([True, True]))
    got = summarize_classes(acc.reduce()[0], NAMES)
    assert got["dice/cyst"] == 1.0 and math.isnan(got["dice/mass"]) and got["dice"] == 1.0
    assert got["mean_image_dice"] == 1.0   # an image with no mass and none predicted scores 1 for it


@pytest.fixture(scope="module")
def ph3(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    coco_phantoms(root / "coco", {"train": 4, "val": 6, "test": 2})
    assert pack(root / "coco", "--out", root / "k3", "--classes", "cyst=1,mass=2") == 0
    return root / "k3"


def setup(data, dist: DistInfo):
    cfg = tiny_config(size=32, data=data)
    cfg.model.classes, cfg.model.class_names = 3, tuple(NAMES)
    cfg.data.loader = "torch"
    cfg.train.batch_size = 2
    torch.manual_seed(3)
    model = build_model(cfg.model, cfg.data.in_channels)
    loss = MulticlassDiceCELoss(classes=3)
    engine = build_engine(cfg, model, dist, loss, 1)
    return engine, build_loader(cfg, data, "val", dist, training=False), loss


PROBE = """
import json, sys
from tumorseg_dist import dist as d
from tumorseg_dist.loop import evaluate
from test_multiclass_metrics import NAMES, setup
info = d.init("cpu")
out = evaluate(*setup(sys.argv[1], info), 0.5, classes=NAMES)
if info.is_main:
    json.dump(out, open(sys.argv[2], "w"))
d.cleanup()
"""


@pytest.mark.slow
def test_per_class_metrics_exact_on_2_ranks(tmp_path, ph3):
    one = evaluate(*setup(ph3, DistInfo(0, 0, 1, torch.device("cpu"))), 0.5, classes=NAMES)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "two.json"
    run_cli([TORCHRUN, "--nproc-per-node=2", "--standalone", str(probe), str(ph3), str(out)], cwd=tmp_path,
            env={"PYTHONPATH": str(REPO / "tests")})
    two = json.loads(out.read_text())
    assert one["samples"] == two["samples"] == 6
    assert one["confusion_matrix"] == two["confusion_matrix"]   # integer pixel counts: exact
    assert sum(map(sum, one["confusion_matrix"])) == 6 * 32 * 32
    for k in ("dice/cyst", "dice/mass", "iou/mass", "precision/cyst", "recall/mass", "dice", "accuracy"):
        assert one[k] == two[k] or (math.isnan(one[k]) and math.isnan(two[k])), k
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)
