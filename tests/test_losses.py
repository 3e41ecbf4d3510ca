"""The reference Dice+BCE loss (the spec) against segmentation-models-pytorch and MONAI.

Where the definitions coincide (binary targets; one channel for MONAI's per-channel Dice):
* dice_reduction="batch" == smp DiceLoss("binary", from_logits=True) + nn.BCEWithLogitsLoss()
  (smp computes Σp·t as (Σp + Σt - Σ|p - t|)/2, equal to Σp·t only for 0/1 targets);
* dice_reduction="image" == MONAI DiceCELoss(sigmoid=True) (per-image Dice, smooth 1e-5, mean).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from monai.losses import DiceCELoss, DiceLoss as MonaiDiceLoss
from segmentation_models_pytorch.losses import DiceLoss as SmpDiceLoss

from tumorseg_dist.losses import (DiceBCELoss, dice_bce_loss, dice_from_sums, dice_sums,
                                  loss_weights, reference_dice_bce)


def batch(shape=(4, 1, 24, 20), seed=0, p_pos=0.3, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scale
    t = (torch.rand(shape, generator=gen) < p_pos).float()
    return x, t


def smp_loss(x, t, pos_weight=None):
    pw = None if pos_weight is None else torch.tensor(pos_weight)
    return (SmpDiceLoss("binary", from_logits=True)(x, t)
            + nn.BCEWithLogitsLoss(pos_weight=pw)(x, t))


@pytest.mark.parametrize("p_pos", [0.3, 0.0, 1.0, 0.002], ids=["random", "empty", "full", "sparse"])
@pytest.mark.parametrize("pos_weight", [None, 2.5])
def test_batch_reduction_matches_smp(p_pos, pos_weight):
    x, t = batch(p_pos=p_pos)
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = reference_dice_bce(xr, t, dice_reduction="batch", pos_weight=pos_weight)
    theirs = smp_loss(xs, t, pos_weight)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(xr.grad, xs.grad, rtol=1e-4, atol=1e-8)


def test_batch_reduction_with_no_positive_is_bce_only():
    x, t = batch(p_pos=0.0)
    assert t.sum() == 0
    full = reference_dice_bce(x, t, dice_reduction="batch")
    bce = nn.BCEWithLogitsLoss()(x, t)
    torch.testing.assert_close(full, bce)           # smp: the Dice term is 0, not 1


@pytest.mark.parametrize("p_pos", [0.3, 0.0, 1.0], ids=["random", "empty", "full"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 0.7)])
def test_image_reduction_matches_monai(p_pos, weights):
    bce_w, dice_w = weights
    x, t = batch(shape=(3, 1, 17, 23), seed=1, p_pos=p_pos)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = reference_dice_bce(xr, t, bce_weight=bce_w, dice_weight=dice_w, dice_reduction="image")
    theirs = DiceCELoss(sigmoid=True, lambda_ce=bce_w, lambda_dice=dice_w)(xm, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(xr.grad, xm.grad, rtol=1e-4, atol=1e-8)


def test_image_reduction_dice_term_matches_monai_dice():
    x, t = batch(shape=(5, 1, 9, 31), seed=2)
    t[1] = 0                                          # one image without tumour
    ours = dice_from_sums(*dice_sums(x, t), "image")
    torch.testing.assert_close(ours, MonaiDiceLoss(sigmoid=True)(x, t), rtol=1e-5, atol=1e-7)


def test_reductions_differ_when_images_differ():
    # guards against "image" silently falling back to "batch" (or the reverse)
    x, t = batch(shape=(2, 1, 16, 16), seed=3)
    t[0] = 0
    b = reference_dice_bce(x, t, bce_weight=0.0, dice_reduction="batch")
    i = reference_dice_bce(x, t, bce_weight=0.0, dice_reduction="image")
    assert abs(b.item() - i.item()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_sum_in_fp32(dtype):
    # 2 × 1 × 200 × 200 = 80000 positive pixels: more than fp16 can hold (65504)
    x = torch.full((2, 1, 200, 200), 6.0, dtype=dtype)
    t = torch.ones_like(x, dtype=torch.uint8)
    inter, psum, tsum = dice_sums(x, t)
    assert tsum.dtype == torch.float32 and tsum.sum().item() == 80000.0
    loss = reference_dice_bce(x, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, reference_dice_bce(x.float(), t.float()))


def test_target_dtypes_agree():
    x, t = batch(seed=4)
    ref = reference_dice_bce(x, t)
    for tt in (t.bool(), t.to(torch.uint8), t.half()):
        torch.testing.assert_close(reference_dice_bce(x, tt), ref)


def test_public_entry_point_cpu_defaults_to_reference():
    x, t = batch(seed=5)
    for fused in ("auto", "off"):
        torch.testing.assert_close(
            dice_bce_loss(x, t, bce_weight=0.4, dice_weight=0.6, dice_reduction="image",
                          pos_weight=2.0, fused=fused),
            reference_dice_bce(x, t, bce_weight=0.4, dice_weight=0.6, dice_reduction="image",
                               pos_weight=2.0))


def test_public_entry_point_rejects_bad_options():
    x, t = batch(seed=6)
    with pytest.raises(ValueError, match="fused"):
        dice_bce_loss(x, t, fused="yes")
    with pytest.raises(ValueError, match="dice_reduction"):
        dice_bce_loss(x, t, dice_reduction="mean")
    with pytest.raises(ValueError, match="dice_reduction"):
        dice_bce_loss(x, t, dice_weight=0.0, dice_reduction="mean")


def test_on_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, t = batch(seed=7)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dice_bce_loss(x, t, fused="on")


def test_loss_weights():
    assert loss_weights("dice_bce", 0.5, 2.0) == (0.5, 2.0)
    assert loss_weights("bce", 0.5, 2.0) == (0.5, 0.0)
    assert loss_weights("dice", 0.5, 2.0) == (0.0, 2.0)
    x, t = batch(seed=8)
    bce_w, dice_w = loss_weights("bce", 1.0, 1.0)
    torch.testing.assert_close(reference_dice_bce(x, t, bce_weight=bce_w, dice_weight=dice_w),
                               nn.BCEWithLogitsLoss()(x, t))


@pytest.mark.slow
def test_compiled_reference_matches_eager():
    x, t = batch(shape=(2, 1, 32, 32), seed=9)
    compiled = torch.compile(reference_dice_bce)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = reference_dice_bce(xe, t, dice_reduction="image")
    comp = compiled(xc, t, dice_reduction="image")
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-7)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- the loss of a whole split

def split_into(x, t, sizes):
    """Consecutive chunks of the given sizes (a partition into rank-batches, empty ones too)."""
    out, i = [], 0
    for k in sizes:
        out.append((x[i:i + k], t[i:i + k]))
        i += k
    assert i == len(x)
    return out


@pytest.mark.parametrize("reduction", ["batch", "image"])
@pytest.mark.parametrize("pos_weight", [None, 2.5])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_summed_parts_give_the_loss_of_the_whole_split(reduction, pos_weight, weights):
    """Summing `parts` over any partition into batches gives the loss of all samples as one
    batch (what val_loss is), whereas averaging per-batch losses does not under "batch"."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 1, 16, 12, generator=gen) * 3 - 2
    area = torch.rand(11, 1, 1, 1, generator=gen)  # images with very different tumour areas
    t = (torch.rand(x.shape, generator=gen) < area * 0.4).float()
    t[3] = 0  # an empty image
    loss = DiceBCELoss(*weights, dice_reduction=reduction, pos_weight=pos_weight)
    whole = reference_dice_bce(x, t, bce_weight=weights[0], dice_weight=weights[1],
                               dice_reduction=reduction, pos_weight=pos_weight).item()
    assert loss(x, t).item() == pytest.approx(whole, rel=1e-6)  # called: the training loss
    for sizes in ([11], [4, 4, 3], [1] * 11, [0, 5, 0, 6]):
        parts = sum(loss.parts(a, b) for a, b in split_into(x, t, sizes))
        assert parts.dtype == torch.float64
        assert loss.from_parts(parts) == pytest.approx(whole, rel=1e-6), sizes
    if reduction == "batch" and weights[1]:
        per_batch = [loss(a, b).item() * len(a) for a, b in split_into(x, t, [4, 4, 3])]
        assert sum(per_batch) / 11 != pytest.approx(whole, rel=1e-3)


def test_split_loss_of_no_sample_is_undefined_and_empty_targets_follow_smp():
    loss = DiceBCELoss()
    empty = loss.parts(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4))
    assert empty.tolist() == [0.0] * DiceBCELoss.N_PARTS
    assert math.isnan(loss.from_parts(empty))
    # no positive pixel in the whole split: the Dice term is 0 (smp semantics), BCE remains
    x, t = batch(p_pos=0.0)
    assert loss.from_parts(loss.parts(x, t)) == pytest.approx(reference_dice_bce(x, t).item(), rel=1e-6)


def test_loss_object_rejects_bad_options():
    with pytest.raises(ValueError, match="dice_reduction"):
        DiceBCELoss(dice_reduction="pixel")
    with pytest.raises(ValueError, match="fused"):
        DiceBCELoss(fused="yes")
