import json
import math

import pytest
import torch

from tumorseg_dist import tracking
from tumorseg_dist.log import RunLog, epoch_line
from tumorseg_dist.losses import reference_dice_bce
from tumorseg_dist.metrics import (N_COUNTS, MetricAccumulator, confusion, per_image_scores,
                                   summarize)

BIG = 20.0  # a logit whose sigmoid is 1 - 2e-9: a "certain" prediction


def test_confusion_counts_by_hand():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32).view(2, 1, 2, 2)
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float32).view(2, 1, 2, 2)
    logits = (pred * 2 - 1) * BIG
    c = confusion(logits, target)
    assert c.tolist() == [[1, 1, 1, 1], [0, 0, 0, 4]]
    dice, iou = per_image_scores(c)
    assert dice.tolist() == pytest.approx([0.5, 1.0])   # empty target + empty prediction = 1
    assert iou.tolist() == pytest.approx([1 / 3, 1.0])


def test_accumulator_ignores_padding_and_sums_dataset_level():
    target = torch.zeros(3, 1, 2, 2)
    target[0, 0, 0, 0] = 1
    logits = torch.full((3, 1, 2, 2), -BIG)
    logits[0, 0, 0, 0] = BIG   # TP
    logits[0, 0, 1, 1] = BIG   # FP
    logits[2] = BIG            # a padding sample full of FPs: must not count
    acc = MetricAccumulator(torch.device("cpu"), extra=2)
    acc.update(logits, target, torch.tensor([True, True, False]), extra=torch.tensor([2.0, 3.0]))
    acc.update(logits, target, torch.tensor([False, False, False]), extra=torch.tensor([1.0, 0.0]))
    m = acc.compute()
    assert m["samples"] == 2
    assert m["dice"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))
    assert m["iou"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(7 / 8)
    assert m["mean_image_dice"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert acc.reduce()[1] == [3.0, 3.0]   # the caller's sums ride along in the same reduce


def test_reference_loss_by_hand():
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    # p = 0.5 everywhere: BCE = ln 2; Dice = 2*0.5 / (2 + 1) = 1/3
    loss = reference_dice_bce(logits, target)
    assert loss.item() == pytest.approx(math.log(2) + (1 - 1 / 3), rel=1e-6)
    assert reference_dice_bce(logits, target, dice_weight=0).item() == pytest.approx(math.log(2))
    # batch reduction: no positive pixel anywhere -> Dice term 0 (smp semantics)
    assert reference_dice_bce(logits, torch.zeros_like(target), bce_weight=0).item() == 0.0


# ---------------------------------------------------------------- undefined is not perfect

def dataset_metrics(logits, target):
    acc = MetricAccumulator(torch.device("cpu"))
    acc.update(logits, target, torch.ones(len(logits), dtype=torch.bool))
    return acc.compute()


def test_a_model_that_predicts_nothing_has_no_precision():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2, :2] = 1
    m = dataset_metrics(torch.full_like(target, -BIG), target)
    assert math.isnan(m["precision"])                  # TP + FP = 0: undefined, not 1.0
    assert m["recall"] == m["dice"] == m["iou"] == 0.0
    assert m["mean_image_dice"] == pytest.approx(0.5)  # the rule: the empty image scores 1


def test_an_all_empty_split_has_no_dice_iou_precision_or_recall():
    target = torch.zeros(3, 1, 4, 4)
    m = dataset_metrics(torch.full_like(target, -BIG), target)
    for k in ("dice", "iou", "precision", "recall"):
        assert math.isnan(m[k]), k
    assert m["accuracy"] == 1.0
    assert m["mean_image_dice"] == m["mean_image_iou"] == 1.0  # per image, "both empty -> 1"
    # one false-positive pixel: Dice/IoU/precision are 0 (defined), recall stays undefined
    logits = torch.full_like(target, -BIG)
    logits[1, 0, 0, 0] = BIG
    m = dataset_metrics(logits, target)
    assert m["dice"] == m["iou"] == m["precision"] == 0.0 and math.isnan(m["recall"])


def test_no_images_at_all_is_undefined_everywhere():
    m = summarize([0.0] * N_COUNTS)
    assert m["samples"] == 0
    assert all(math.isnan(v) for k, v in m.items() if k != "samples")


def masks(g, *fractions):
    """0/1 masks of 3 images 8x8, each pixel on with the given probability (0: empty)."""
    return [torch.rand(3, 1, 8, 8, generator=g) < f for f in fractions]


def one_empty_target(g):
    pred, target = masks(g, 0.3, 0.3)
    target[1] = False
    return pred, target


CASES = {  # (prediction, target)
    "random": lambda g: masks(g, 0.3, 0.2),
    "predicts nothing": lambda g: masks(g, 0.0, 0.2),
    "all empty": lambda g: masks(g, 0.0, 0.0),
    "empty target, some prediction": lambda g: masks(g, 0.1, 0.0),
    "perfect": lambda g: masks(g, 0.3) * 2,
    "mixed, one empty target": one_empty_target,
}
MONAI_NAMES = {"precision": "precision", "recall": "recall", "dice": "f1 score",
               "iou": "threat score", "accuracy": "accuracy"}


@pytest.mark.parametrize("case", list(CASES))
def test_dataset_metrics_match_monai_and_are_nan_where_monai_is(case):
    from monai.metrics import ConfusionMatrixMetric, DiceMetric, MeanIoU
    pred, target = CASES[case](torch.Generator().manual_seed(7))
    pred, target = pred.float(), target.float()
    acc = MetricAccumulator(torch.device("cpu"))
    for i in range(3):  # one image per batch: the dataset level is the sum over batches
        acc.update((pred[i:i + 1] * 2 - 1) * BIG, target[i:i + 1], torch.tensor([True]))
    ours = acc.compute()
    cm = ConfusionMatrixMetric(metric_name=list(MONAI_NAMES.values()), compute_sample=False,
                               reduction="sum")
    cm(y_pred=pred, y=target)
    theirs = dict(zip(MONAI_NAMES, (t.item() for t in cm.aggregate())))
    dice = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
    iou = MeanIoU(include_background=True, reduction="mean", ignore_empty=False)
    dice(y_pred=pred, y=target), iou(y_pred=pred, y=target)
    theirs["mean_image_dice"] = dice.aggregate().item()
    theirs["mean_image_iou"] = iou.aggregate().item()
    for k, v in theirs.items():
        if math.isnan(v):
            assert math.isnan(ours[k]), (case, k, ours[k])
        else:
            assert ours[k] == pytest.approx(v, abs=1e-6), (case, k)


def test_undefined_is_null_in_json_and_n_a_in_the_epoch_line(tmp_path):
    record = {"epoch": 1, "step": 6, "train_loss": 0.5, "val_loss": 0.7, "val_dice": math.nan,
              "val_iou": math.nan, "val_precision": math.nan, "lr": 1e-3, "images_per_s": 10.0,
              "seconds": 2.0}
    line = epoch_line(record)
    assert "val_dice n/a" in line and "val_iou n/a" in line and "val_loss 0.7000" in line
    log = RunLog(tmp_path, enabled=True)
    log.append(record)
    log.write_json("test_metrics.json", {"precision": math.nan, "dice": 0.25})
    back = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=pytest.fail)
    assert back["val_dice"] is None and back["val_precision"] is None
    assert "val_dice n/a" in epoch_line(back)  # a record read back from metrics.jsonl prints too
    test = json.loads((tmp_path / "test_metrics.json").read_text(), parse_constant=pytest.fail)
    assert test == {"precision": None, "dice": 0.25}


def test_wandb_gets_no_undefined_point(tmp_path):
    class Run:
        logged, summary = [], {}

        def log(self, data, step):
            self.logged.append(data)

    run = Run()
    t = tracking.Tracker(run, tmp_path, "offline", print)
    t.log_epoch({"epoch": 1, "step": 4, "val_dice": math.nan, "val_recall": 0.5}, None)
    assert run.logged == [{"epoch": 1, "epoch/val_recall": 0.5}]
    t.summary({"test_precision": math.nan, "test_dice": 0.3})
    assert run.summary == {"test_dice": 0.3}


@pytest.mark.slow
def test_fit_never_picks_an_undefined_epoch_as_best(tmp_path, capsys):
    """A split with no tumour and a model that predicts nothing: val_dice is undefined every
    epoch, so no best.pt is written, early stopping says why, and the logs show n/a / null."""
    import dataclasses

    import numpy as np

    from inference_testing import tiny_config
    from tumorseg_dist.data.loader import build_loader
    from tumorseg_dist.data.shards import write_dataset
    from tumorseg_dist.data.synthetic import synthetic_samples
    from tumorseg_dist.dist import DistInfo
    from tumorseg_dist.engines import build_engine
    from tumorseg_dist.loop import TrainState, fit
    from tumorseg_dist.losses import DiceBCELoss
    from tumorseg_dist.models import build_model

    data = tmp_path / "no-tumour"
    no_tumour = (dataclasses.replace(s, mask=np.zeros_like(s.mask))
                 for s in synthetic_samples(10, 32, 0))
    write_dataset(no_tumour, data, fmt="synthetic", input_root="<test>")
    cfg = tiny_config(size=32, data=data)
    cfg.train.epochs, cfg.train.patience, cfg.train.monitor = 3, 1, "val_dice"
    cfg.optim.lr = 1e-6
    d = DistInfo(0, 0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg.model, 1)
    with torch.no_grad():
        model.segmentation_head[0].bias.fill_(-50.0)  # certain "no tumour" everywhere
    loss = DiceBCELoss()
    engine = build_engine(cfg, model, d, loss, 100)
    run = tmp_path / "run"
    log = RunLog(run, enabled=True)
    state, reason = fit(cfg, engine, build_loader(cfg, data, "train", d, training=True),
                        build_loader(cfg, data, "val", d, training=False), loss, TrainState(),
                        run, d, log)
    out = capsys.readouterr().out
    assert reason == "early_stop" and state.best is None
    assert (run / "checkpoints" / "last.pt").exists()
    assert not (run / "checkpoints" / "best.pt").exists()
    assert "no epoch had a defined val_dice" in out and "val_dice n/a" in out
    (record,) = log.records()
    assert record["val_dice"] is None and record["val_precision"] is None
    assert record["val_recall"] is None and record["val_accuracy"] == 1.0
