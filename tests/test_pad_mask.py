"""The pad mask (issue 15, `Batch.pad`: 1 = real pixel, 0 = geometry padding) in the loss and
the metrics: a letterboxed image (the original plus a border of padding) scores as the original.

The letterboxed logits hold large random values in the border, so a loss or a metric that looked
at the border would differ (each equivalence test also checks that ignoring the mask changes the
number). The fused kernels (Triton interpreter, TRITON_INTERPRET=1 per test as in
tests/test_kernel.py) are checked against the reference with a mask, in the dtypes and layouts
the kernel tests cover. The "image" Dice term is compared with MONAI's MaskedDiceLoss, the one
MONAI loss that takes a mask (MONAI's DiceMetric and ConfusionMatrixMetric take none).
"""
from __future__ import annotations

import pytest
import torch

from tumorseg_dist.data.batch import Batch
from tumorseg_dist.loop import evaluate
from tumorseg_dist.losses import (DiceBCELoss, MulticlassDiceCELoss, dice_bce_loss, dice_ce_loss,
                                  fused_dice_bce, fused_dice_ce, reference_dice_bce,
                                  reference_dice_ce)
from tumorseg_dist.metrics import ClassMetricAccumulator, MetricAccumulator

H, W, SIDE, TOP, LEFT = 20, 28, 32, 6, 2      # a 20×28 image placed in a 32×32 letterbox


def letterbox(x: torch.Tensor, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, C, H, W] inside `fill` [N, C, SIDE, SIDE] at (TOP, LEFT), and the pad mask."""
    out = fill.clone()
    out[:, :, TOP:TOP + H, LEFT:LEFT + W] = x
    pad = torch.zeros(x.shape[0], 1, SIDE, SIDE)
    pad[:, :, TOP:TOP + H, LEFT:LEFT + W] = 1
    return out, pad


def binary_case(n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 1, H, W, generator=g) * 3).to(dtype)
    t = (torch.rand(n, 1, H, W, generator=g) > 0.7).float()
    t[-1] = 0                                            # one image without lesion
    junk = (torch.randn(n, 1, SIDE, SIDE, generator=g) * 8).to(dtype)
    xp, pad = letterbox(x, junk)
    tp, _ = letterbox(t, torch.zeros(n, 1, SIDE, SIDE))
    return x, t, xp, tp, pad


def loss_and_grad(fn, x, *args, **kw):
    xx = x.detach().clone().requires_grad_()
    loss = fn(xx, *args, **kw)
    loss.backward()
    return loss.detach(), xx.grad


def inner(g: torch.Tensor) -> torch.Tensor:
    return g[:, :, TOP:TOP + H, LEFT:LEFT + W]


def border_only(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g[:, :, TOP:TOP + H, LEFT:LEFT + W] = 0
    return g


@pytest.mark.parametrize("reduction", ["batch", "image"])
@pytest.mark.parametrize("pos_weight", [None, 2.5])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)])
def test_binary_letterbox_has_the_loss_and_gradient_of_the_original(reduction, pos_weight, weights):
    x, t, xp, tp, pad = binary_case()
    kw = dict(bce_weight=weights[0], dice_weight=weights[1], dice_reduction=reduction,
              pos_weight=pos_weight)
    lo, go = loss_and_grad(reference_dice_bce, x, t, **kw)
    lp, gp = loss_and_grad(reference_dice_bce, xp, tp, pad=pad, **kw)
    torch.testing.assert_close(lp, lo, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(inner(gp), go, rtol=1e-5, atol=1e-9)
    assert border_only(gp).abs().max() == 0
    ignored = reference_dice_bce(xp, tp, **kw)          # the mask matters
    assert abs(ignored.item() - lo.item()) > 1e-3


@pytest.mark.parametrize("reduction", ["batch", "image"])
def test_binary_parts_of_a_letterboxed_split_give_the_original_loss(reduction):
    x, t, xp, tp, pad = binary_case(n=4, seed=1)
    fn = DiceBCELoss(dice_reduction=reduction, pos_weight=1.5, fused="off")
    whole = fn(x, t).item()
    halves = fn.parts(xp[:2], tp[:2], pad[:2]) + fn.parts(xp[2:], tp[2:], pad[2:])
    assert fn.from_parts(halves) == pytest.approx(whole, rel=1e-6)
    assert fn(xp, tp, pad).item() == pytest.approx(whole, rel=1e-6)
    assert fn.from_parts(fn.parts(xp, tp)) != pytest.approx(whole, rel=1e-3)


def test_no_pad_is_the_unpadded_arithmetic_bit_for_bit():
    x, t, *_ = binary_case(seed=2)
    for reduction in ("batch", "image"):
        fn = DiceBCELoss(dice_reduction=reduction, fused="off")
        assert torch.equal(fn(x, t, None), fn(x, t))
        assert torch.equal(fn.parts(x, t, None), fn.parts(x, t))
    # an all-ones mask is the same loss, up to rounding (the mean is then Σ/count, not mean())
    ones = torch.ones_like(x)
    assert reference_dice_bce(x, t, pad=ones).item() == pytest.approx(reference_dice_bce(x, t).item(), rel=1e-6)


def test_all_padding_gives_zero_bce_not_nan():
    x, t, *_ = binary_case()
    loss = reference_dice_bce(x, t, pad=torch.zeros_like(x), dice_weight=0.0)
    assert loss.item() == 0.0


def test_pad_of_the_wrong_shape_is_refused():
    x, t, xp, tp, pad = binary_case()
    with pytest.raises(ValueError, match="pad mask shape"):
        reference_dice_bce(x, t, pad=pad)


def test_image_dice_matches_monai_masked_dice_loss():
    _, _, xp, tp, pad = binary_case(n=4, seed=3)
    ours = loss_and_grad(reference_dice_bce, xp, tp, bce_weight=0.0, dice_reduction="image", pad=pad)
    from monai.losses import MaskedDiceLoss   # here: the GPU check's machine may lack MONAI
    monai = MaskedDiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    theirs = loss_and_grad(lambda xx: monai(xx, tp, mask=pad), xp)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------- K classes

K = 3


def class_case(n=3, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, K, H, W, generator=g) * 2
    t = torch.randint(0, K, (n, H, W), generator=g)
    if ignore is not None:
        t[torch.rand(n, H, W, generator=g) < 0.2] = ignore
    junk = torch.randn(n, K, SIDE, SIDE, generator=g) * 8
    xp, pad = letterbox(x, junk)
    tp = letterbox(t[:, None].float(), torch.zeros(n, 1, SIDE, SIDE))[0][:, 0].long()
    return x, t, xp, tp, pad


@pytest.mark.parametrize("reduction", ["batch", "image"])
@pytest.mark.parametrize("ignore", [None, 255])
@pytest.mark.parametrize("bg", [False, True])
def test_k_class_letterbox_has_the_loss_and_gradient_of_the_original(reduction, ignore, bg):
    x, t, xp, tp, pad = class_case(seed=4, ignore=ignore)
    kw = dict(dice_reduction=reduction, ignore_index=ignore, include_background=bg,
              class_weights=[0.5, 1.0, 2.0])
    lo, go = loss_and_grad(reference_dice_ce, x, t, **kw)
    lp, gp = loss_and_grad(reference_dice_ce, xp, tp, pad=pad, **kw)
    torch.testing.assert_close(lp, lo, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(inner(gp), go, rtol=1e-5, atol=1e-9)
    assert border_only(gp).abs().max() == 0
    assert abs(reference_dice_ce(xp, tp, **kw).item() - lo.item()) > 1e-3
    fn = MulticlassDiceCELoss(classes=K, fused="off", **kw)
    parts = fn.parts(xp[:1], tp[:1], pad[:1]) + fn.parts(xp[1:], tp[1:], pad[1:])
    assert fn.from_parts(parts) == pytest.approx(lo.item(), rel=1e-6)


def test_k_class_image_dice_matches_monai_masked_dice_loss():
    _, _, xp, tp, pad = class_case(seed=5)
    ours = reference_dice_ce(xp, tp, ce_weight=0.0, dice_reduction="image", pad=pad)
    from monai.losses import MaskedDiceLoss
    monai = MaskedDiceLoss(softmax=True, to_onehot_y=True, include_background=False)
    assert ours.item() == pytest.approx(monai(xp, tp[:, None], mask=pad).item(), rel=1e-5)


# ---------------------------------------------------------------- the fused kernels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_TOL = {torch.float32: (1e-5, 1e-9), torch.float16: (2 ** -10, 1e-7),
            torch.bfloat16: (2 ** -7, 1e-7)}


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reduction", ["batch", "image"])
@pytest.mark.parametrize("pos_weight", [None, 3.0])
def test_binary_kernel_matches_reference_with_a_pad(dtype, layout, reduction, pos_weight):
    dt = DTYPES[dtype]
    _, _, xp, tp, pad = binary_case(seed=6, dtype=dt)
    if layout == "channels_last":
        xp = xp.to(memory_format=torch.channels_last)
        pad = pad.to(memory_format=torch.channels_last)
    kw = dict(dice_reduction=reduction, pos_weight=pos_weight, pad=pad)
    lk, gk = loss_and_grad(fused_dice_bce, xp, tp, **kw)
    lr, gr = loss_and_grad(reference_dice_bce, xp, tp, **kw)
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=0)
    assert gk.dtype == dt
    rtol, atol = GRAD_TOL[dt]
    torch.testing.assert_close(gk, gr, rtol=rtol, atol=atol)
    assert border_only(gk).abs().max() == 0
    unmasked = fused_dice_bce(xp, tp, dice_reduction=reduction, pos_weight=pos_weight)
    assert abs(unmasked.item() - lk.item()) > 1e-3     # the kernel reads the mask


@pytest.mark.usefixtures("interpret")
def test_binary_kernel_through_the_loss_object_and_bool_pad():
    x, t, xp, tp, pad = binary_case(seed=7)
    fused = DiceBCELoss(fused="on")
    assert fused(xp, tp, pad.bool()).item() == pytest.approx(dice_bce_loss(x, t, fused="off").item(), rel=1e-5)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reduction", ["batch", "image"])
@pytest.mark.parametrize("ignore", [None, 255])
def test_k_class_kernel_matches_reference_with_a_pad(layout, reduction, ignore):
    _, _, xp, tp, pad = class_case(seed=8, ignore=ignore)
    if layout == "channels_last":
        xp = xp.to(memory_format=torch.channels_last)
    kw = dict(dice_reduction=reduction, ignore_index=ignore, pad=pad)
    lk, gk = loss_and_grad(fused_dice_ce, xp, tp, **kw)
    lr, gr = loss_and_grad(reference_dice_ce, xp, tp, **kw)
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=0)
    torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-8)
    assert border_only(gk).abs().max() == 0
    assert abs(dice_ce_loss(xp, tp, fused="on", dice_reduction=reduction, ignore_index=ignore).item()
               - lk.item()) > 1e-3


@pytest.mark.usefixtures("interpret")
def test_k_class_kernel_still_refuses_a_bad_label_in_a_real_pixel():
    _, _, xp, tp, pad = class_case(seed=9)
    tp[0, TOP, LEFT] = 7
    with pytest.raises(Exception, match="labels must be in"):
        fused_dice_ce(xp, tp, pad=pad)
    tp[0, TOP, LEFT] = 0
    tp[0, 0, 0] = 7                                       # in the border: padding, not checked
    fused_dice_ce(xp, tp, pad=pad)


# ---------------------------------------------------------------- metrics and the loop


def test_binary_metrics_of_a_letterbox_are_the_original_metrics():
    x, t, xp, tp, pad = binary_case(n=4, seed=10)
    valid = torch.tensor([True, True, False, True])
    orig, padded, ignored = (MetricAccumulator(torch.device("cpu")) for _ in range(3))
    orig.update(x, t, valid)
    padded.update(xp, tp, valid, pad=pad)
    ignored.update(xp, tp, valid)
    assert padded.reduce()[0] == orig.reduce()[0]
    assert ignored.reduce()[0] != orig.reduce()[0]


def test_k_class_metrics_of_a_letterbox_are_the_original_metrics():
    x, t, xp, tp, pad = class_case(n=3, seed=11, ignore=255)
    valid = torch.tensor([True, False, True])
    accs = [ClassMetricAccumulator(torch.device("cpu"), K, ignore_index=255) for _ in range(3)]
    accs[0].update(x, t, valid)
    accs[1].update(xp, tp, valid, pad=pad)
    accs[2].update(xp, tp, valid)
    assert accs[1].reduce()[0] == accs[0].reduce()[0]
    assert accs[2].reduce()[0] != accs[0].reduce()[0]


class _Replay:
    """An engine whose eval logits are given: loop.evaluate's counting, without a model."""

    device = torch.device("cpu")

    def __init__(self, logits):
        self.logits = list(logits)

    def eval(self):
        pass

    def eval_logits(self, image):
        return self.logits.pop(0)


@pytest.mark.parametrize("k", [1, K])
def test_loop_evaluate_of_letterboxed_batches_is_the_original(k):
    if k == 1:
        x, t, xp, tp, pad = binary_case(n=4, seed=12)
        t, tp = t.float(), tp.float()
        loss_fn, opts = DiceBCELoss(fused="off"), {}
    else:
        x, t, xp, tp, pad = class_case(n=4, seed=12)
        t, tp = t[:, None].float(), tp[:, None].float()
        loss_fn, opts = MulticlassDiceCELoss(classes=K, fused="off"), {"classes": ["bg", "a", "b"]}
    valid = torch.ones(2, dtype=torch.bool)

    def batches(xs, ts, pads):
        return [Batch(image=torch.zeros(2, 1, *ts.shape[-2:]), mask=ts[i:i + 2], valid=valid,
                      keys=["a", "b"], pad=None if pads is None else pads[i:i + 2]) for i in (0, 2)]

    orig, shown = evaluate(_Replay([x[:2], x[2:]]), batches(x, t, None), loss_fn, 0.5, keep=4, **opts)
    boxed, shown_boxed = evaluate(_Replay([xp[:2], xp[2:]]), batches(xp, tp, pad), loss_fn, 0.5,
                                  keep=4, **opts)
    assert shown_boxed.dice == shown.dice                  # the overlay figure's per-image Dice
    for key, value in orig.items():
        if key == "loss":
            assert boxed[key] == pytest.approx(value, rel=1e-6)
        else:
            assert boxed[key] == value, key


def test_the_engine_step_gets_the_pad_through_loop_train_step():
    """loop.train_step hands Batch.pad to the DDP engine's loss: the step's loss is the masked
    loss of the model's logits (computed on a copy first), not the unmasked one."""
    import copy

    from inference_testing import tiny_config
    from tumorseg_dist.dist import DistInfo
    from tumorseg_dist.engines import build_engine
    from tumorseg_dist.loop import train_step
    from tumorseg_dist.models import build_model

    cfg = tiny_config(size=32)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1)
    before = copy.deepcopy(model).train()
    loss_fn = DiceBCELoss(fused="off")
    engine = build_engine(cfg, model, DistInfo(0, 0, 1, torch.device("cpu")), loss_fn, 1)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 1, 32, 32, generator=g)
    mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.7).float()
    pad = torch.zeros(2, 1, 32, 32)
    pad[:, :, 4:28] = 1
    mask *= pad
    with torch.no_grad():
        logits = before(image).float()
    loss = train_step(engine, Batch(image=image, mask=mask, valid=torch.ones(2, dtype=torch.bool),
                                    keys=["a", "b"], pad=pad))
    assert loss.item() == pytest.approx(loss_fn(logits, mask, pad).item(), rel=1e-5)
    assert loss.item() != pytest.approx(loss_fn(logits, mask).item(), rel=1e-3)


# ---------------------------------------------------------------- the compiled kernels on a GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_gpu_binary_kernel_with_a_pad_matches_reference(dtype):
    """The compiled (not interpreted) binary kernel with a pad mask, channels-last, on CUDA."""
    dt = DTYPES[dtype]
    _, _, xp, tp, pad = binary_case(seed=10, dtype=dt)
    xp, tp, pad = (v.cuda().to(memory_format=torch.channels_last) for v in (xp, tp, pad))
    lk, gk = loss_and_grad(fused_dice_bce, xp, tp, pad=pad)
    lr, gr = loss_and_grad(reference_dice_bce, xp, tp, pad=pad)
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=0)
    torch.testing.assert_close(gk, gr, rtol=GRAD_TOL[dt][0], atol=GRAD_TOL[dt][1])
    assert border_only(gk).abs().max() == 0


@gpu
def test_gpu_k_class_kernel_with_a_pad_matches_reference():
    _, _, xp, tp, pad = class_case(seed=11, ignore=255)
    xp, tp, pad = xp.cuda(), tp.cuda(), pad.cuda()
    lk, gk = loss_and_grad(fused_dice_ce, xp, tp, ignore_index=255, pad=pad)
    lr, gr = loss_and_grad(reference_dice_ce, xp, tp, ignore_index=255, pad=pad)
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=0)
    torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-8)
    assert border_only(gk).abs().max() == 0
