import math

import pytest
import torch

from tumorseg_dist.losses import reference_dice_bce
from tumorseg_dist.metrics import MetricAccumulator, confusion, per_image_scores

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
    acc = MetricAccumulator(torch.device("cpu"))
    acc.update(logits, target, torch.tensor([True, True, False]), loss=torch.tensor(2.0))
    m = acc.compute()
    assert m["samples"] == 2
    assert m["dice"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))
    assert m["iou"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(7 / 8)
    assert m["mean_image_dice"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["loss"] == pytest.approx(2.0)


def test_reference_loss_by_hand():
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    # p = 0.5 everywhere: BCE = ln 2; Dice = 2*0.5 / (2 + 1) = 1/3
    loss = reference_dice_bce(logits, target)
    assert loss.item() == pytest.approx(math.log(2) + (1 - 1 / 3), rel=1e-6)
    assert reference_dice_bce(logits, target, dice_weight=0).item() == pytest.approx(math.log(2))
    # batch reduction: no positive pixel anywhere -> Dice term 0 (smp semantics)
    assert reference_dice_bce(logits, torch.zeros_like(target), bce_weight=0).item() == 0.0
