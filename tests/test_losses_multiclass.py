"""The K-class softmax Dice + cross-entropy loss: the reference (the spec) against MONAI, smp and
the binary loss, and the fused Triton kernel (kernels/dice_ce.py) against the reference on CPU
under the Triton interpreter (TRITON_INTERPRET=1 per test, as in tests/test_kernel.py).

Where the reference and the libraries coincide:
* dice_reduction="image" == MONAI DiceCELoss(softmax=True, to_onehot_y=True, batch=False,
  smooth_nr=smooth_dr=1e-5 (its defaults), include_background=ours, lambda_ce=ce_weight,
  lambda_dice=dice_weight). With class weights: MONAI multiplies the per-class Dice by w and
  then takes a plain mean, ours divides by Σw, so they coincide when the weights of the classes
  in the Dice mean average 1 (MONAI's CE is nn.CrossEntropyLoss(weight), like ours). MONAI's
  DiceCELoss has no ignore_index: with one, its DiceLoss(ignore_index) +
  nn.CrossEntropyLoss(ignore_index) is the match.
* dice_reduction="batch" == smp DiceLoss("multiclass", from_logits=True, classes=[1..K-1]
  without background / None with it, ignore_index) + nn.CrossEntropyLoss(ignore_index): smooth
  0, eps 1e-7, a class with no pixel in the batch contributes 0 (smp has no class weights).
* K = 2 without background == the binary dice_bce on the logit difference x1 - x0, both
  reductions (softmax over two logits is the sigmoid of their difference).

Kernel tolerances (also in docs/loss.md):
* loss: 1e-5 relative for any logits dtype (both paths upcast the same inputs and sum in fp32).
* gradient, fp32: 1e-5 relative + 1e-9 absolute.
* gradient, fp16/bf16: one unit in the last place of the dtype (2^-10 / 2^-7 relative, +1e-7
  absolute): both compute in fp32 and round once to the logits' dtype.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import triton
from monai.losses import DiceCELoss, DiceLoss as MonaiDiceLoss
from scipy import ndimage
from segmentation_models_pytorch.losses import DiceLoss as SmpDiceLoss

from tumorseg_dist.config import LossConfig
from tumorseg_dist.data.phantoms import phantom
from tumorseg_dist.kernels import dice_ce as kmod
from tumorseg_dist.kernels.dice_ce import fused_multiclass_sums
from tumorseg_dist.losses import (DiceBCELoss, MulticlassDiceCELoss, build_loss_fn,
                                  build_multiclass_loss_fn, dice_ce_loss, fused_dice_ce,
                                  multiclass_sums, reference_dice_bce, reference_dice_ce)

KS = [2, 3, 5]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_TOL = {torch.float32: (1e-5, 1e-9), torch.float16: (2 ** -10, 1e-7),
            torch.bfloat16: (2 ** -7, 1e-7)}
IGNORE = 255


# ---------------------------------------------------------------- inputs

def random_batch(k, shape=(3, 17, 23), seed=0, scale=3.0, ignore_frac=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((shape[0], k, *shape[1:]), generator=gen) * scale
    t = torch.randint(0, k, shape, generator=gen)
    if ignore_frac:
        t[torch.rand(shape, generator=gen) < ignore_frac] = IGNORE
    return x, t


def phantom_labels(k, n=3, size=40, seed=0):
    """Label maps like the issue's data: phantom lesions, each connected lesion given one of the
    foreground classes 1..K-1 in turn (two lesion types for K = 3), background 0."""
    maps = []
    for i in range(n):
        _, mask = phantom(i + 4 * seed, size=size, seed=seed)
        comp, count = ndimage.label(mask)
        lab = np.zeros(mask.shape, np.int64)
        for c in range(1, count + 1):
            lab[comp == c] = 1 + (c - 1 + i) % (k - 1)
        maps.append(lab)
    return torch.from_numpy(np.stack(maps))


def phantom_batch(k, n=3, size=40, seed=0):
    """Label maps plus logits of a half-trained model: the right class favoured, noisily."""
    t = phantom_labels(k, n, size, seed)
    gen = torch.Generator().manual_seed(seed)
    onehot = torch.nn.functional.one_hot(t, k).permute(0, 3, 1, 2).float()
    x = 2.5 * onehot + torch.randn(onehot.shape, generator=gen) * 1.5
    return x, t


def grads(fn, x, *args, **kw):
    xx = x.detach().clone().requires_grad_()
    loss = fn(xx, *args, **kw)
    loss.backward()
    return loss.detach(), xx.grad


def assert_same(a, b, rtol=1e-5, atol=1e-7, grad_rtol=1e-4, grad_atol=1e-8):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[1], b[1], rtol=grad_rtol, atol=grad_atol)


def sel_classes(k, bg):
    return None if bg else list(range(1, k))


def test_phantom_label_maps_have_every_class_and_empty_images():
    t = phantom_labels(3, n=8, size=40)
    assert set(t.unique().tolist()) == {0, 1, 2}
    per_image = [set(m.unique().tolist()) for m in t]
    assert any(s == {0} for s in per_image)            # an image with no lesion at all
    assert any(len(s) == 2 for s in per_image)         # one with a single lesion type


# ---------------------------------------------------------------- the reference vs MONAI / smp

@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("bg", [False, True], ids=["no-bg", "bg"])
@pytest.mark.parametrize("data", ["random", "phantom"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 1.7)])
def test_image_reduction_matches_monai(k, bg, data, weights):
    ce_w, dice_w = weights
    x, t = random_batch(k, seed=k) if data == "random" else phantom_batch(k, seed=k)
    ours = grads(reference_dice_ce, x, t, ce_weight=ce_w, dice_weight=dice_w,
                 dice_reduction="image", include_background=bg)
    monai = DiceCELoss(softmax=True, to_onehot_y=True, include_background=bg, batch=False,
                       smooth_nr=1e-5, smooth_dr=1e-5, lambda_ce=ce_w, lambda_dice=dice_w)
    assert_same(ours, grads(monai, x, t[:, None]))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("bg", [False, True], ids=["no-bg", "bg"])
def test_class_weights_match_monai_when_the_dice_weights_average_one(k, bg):
    x, t = phantom_batch(k, seed=10 + k)
    w = torch.linspace(0.4, 2.0, k)
    dice_sel = slice(0 if bg else 1, k)
    w = w / w[dice_sel].mean()                          # where MONAI's plain mean equals ours
    ours = grads(reference_dice_ce, x, t, dice_reduction="image", include_background=bg,
                 class_weights=w.tolist())
    monai = DiceCELoss(softmax=True, to_onehot_y=True, include_background=bg, weight=w)
    assert_same(ours, grads(monai, x, t[:, None]))
    # and the weights really act: uniform weights give another value
    plain = reference_dice_ce(x, t, dice_reduction="image", include_background=bg)
    assert abs(plain.item() - ours[0].item()) > 1e-3


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("bg", [False, True], ids=["no-bg", "bg"])
def test_ignore_index_matches_monai_dice_plus_torch_ce(k, bg):
    x, t = random_batch(k, seed=20 + k, ignore_frac=0.25)
    ours = grads(reference_dice_ce, x, t, dice_reduction="image", include_background=bg,
                 ignore_index=IGNORE)
    dice = MonaiDiceLoss(softmax=True, to_onehot_y=True, include_background=bg,
                         ignore_index=IGNORE)
    ce = nn.CrossEntropyLoss(ignore_index=IGNORE)
    assert_same(ours, grads(lambda xx, tt: dice(xx, tt[:, None]) + ce(xx, tt), x, t))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("bg", [False, True], ids=["no-bg", "bg"])
@pytest.mark.parametrize("data", ["random", "phantom", "ignore"])
def test_batch_reduction_matches_smp(k, bg, data):
    if data == "phantom":
        x, t = phantom_batch(k, seed=30 + k)
    else:
        x, t = random_batch(k, seed=30 + k, ignore_frac=0.2 if data == "ignore" else 0.0)
    ignore = IGNORE if data == "ignore" else None
    ours = grads(reference_dice_ce, x, t, dice_reduction="batch", include_background=bg,
                 ignore_index=ignore)
    dice = SmpDiceLoss("multiclass", from_logits=True, classes=sel_classes(k, bg),
                       ignore_index=ignore)
    ce = nn.CrossEntropyLoss(ignore_index=IGNORE if ignore is not None else -100)
    assert_same(ours, grads(lambda xx, tt: dice(xx, tt) + ce(xx, tt), x, t))


def test_batch_reduction_class_absent_from_the_batch_contributes_zero():
    x, t = random_batch(4, seed=40)
    t[t == 3] = 2                                       # class 3 in no image
    full = reference_dice_ce(x, t, ce_weight=0.0)
    inter, psum, tsum, _, _ = multiclass_sums(x, t)
    inter, psum, tsum = inter.sum(0), psum.sum(0), tsum.sum(0)
    d = 1 - 2 * inter / (psum + tsum)
    assert tsum[3] == 0
    torch.testing.assert_close(full, (d[1] + d[2] + 0.0) / 3)


@pytest.mark.parametrize("reduction", ["batch", "image"])
def test_two_classes_without_background_is_the_binary_loss_of_the_logit_difference(reduction):
    x, t = phantom_batch(2, n=4, seed=50)
    t[1] = 0                                            # an image without tumour
    ours = grads(reference_dice_ce, x, t, ce_weight=0.6, dice_weight=1.4,
                 dice_reduction=reduction)
    d = x[:, 1] - x[:, 0]
    binary = grads(reference_dice_bce, d, t, bce_weight=0.6, dice_weight=1.4,
                   dice_reduction=reduction)
    torch.testing.assert_close(ours[0], binary[0], rtol=1e-5, atol=1e-7)
    # d(x1 - x0)/dx1 = 1, /dx0 = -1
    torch.testing.assert_close(ours[1][:, 1], binary[1], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(ours[1][:, 0], -binary[1], rtol=1e-4, atol=1e-9)


def test_ignored_pixels_count_in_neither_term():
    x, t = random_batch(3, seed=60, ignore_frac=0.3)
    base = reference_dice_ce(x, t, ignore_index=IGNORE, dice_reduction="image")
    x2 = x.clone()
    x2[(t == IGNORE)[:, None].expand_as(x2)] = 37.0     # anything at ignored pixels
    xg = x2.clone().requires_grad_()
    again = reference_dice_ce(xg, t, ignore_index=IGNORE, dice_reduction="image")
    again.backward()
    assert again.item() == pytest.approx(base.item(), rel=1e-6)
    assert (xg.grad[(t == IGNORE)[:, None].expand_as(xg)] == 0).all()
    # ignore_index can be a class id: those pixels drop out of every class, class 0's T is 0
    _, _, tsum, _, w_sum = multiclass_sums(x, t.clamp_max(2), ignore_index=0)
    assert (tsum[:, 0] == 0).all() and w_sum.sum() == (t.clamp_max(2) != 0).sum()


def test_all_pixels_ignored_gives_zero_ce_not_nan():
    x, _ = random_batch(3, seed=61)
    t = torch.full((3, 17, 23), IGNORE)
    xx = x.clone().requires_grad_()
    loss = reference_dice_ce(xx, t, ignore_index=IGNORE, dice_weight=0.0)
    loss.backward()
    assert loss.item() == 0.0 and (xx.grad == 0).all()
    assert math.isnan(nn.CrossEntropyLoss(ignore_index=IGNORE)(x, t).item())  # torch's choice


def test_label_layouts_and_dtypes_agree():
    x, t = random_batch(3, seed=62)
    ref = reference_dice_ce(x, t)
    for tt in (t.to(torch.uint8), t.int(), t[:, None], t.short()):
        assert torch.equal(reference_dice_ce(x, tt), ref)


def test_bad_labels_and_options_are_refused():
    x, t = random_batch(3, seed=63)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        reference_dice_ce(x, torch.where(t == 2, 3, t))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        reference_dice_ce(x, torch.where(t == 2, IGNORE, t))   # 255 is not ignored here
    with pytest.raises(TypeError, match="integer labels"):
        reference_dice_ce(x, t.float())
    with pytest.raises(ValueError, match="shape"):
        reference_dice_ce(x, t[:, :5])
    with pytest.raises(ValueError, match="3 classes"):
        reference_dice_ce(x, t, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="≥ 0"):
        reference_dice_ce(x, t, class_weights=[1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="every class in the Dice mean"):
        reference_dice_ce(x, t, class_weights=[1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="classes ≥ 2"):
        reference_dice_ce(x[:, :1], t.clamp_max(0))
    with pytest.raises(ValueError, match="N×K×spatial"):
        reference_dice_ce(x[:, :, 0, 0], t[:, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        reference_dice_ce(x, t, class_weights=[1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="dice_reduction"):
        reference_dice_ce(x, t, dice_reduction="mean")
    with pytest.raises(ValueError, match="fused"):
        dice_ce_loss(x, t, fused="yes")


def test_half_logits_sum_in_fp32():
    # 2 × 200 × 200 = 80000 pixels of class 1: more than fp16 can hold (65504)
    x = torch.zeros(2, 2, 200, 200, dtype=torch.float16)
    x[:, 1] = 6.0
    t = torch.ones(2, 200, 200, dtype=torch.uint8)
    inter, psum, tsum, ce_sum, w_sum = multiclass_sums(x, t)
    assert tsum.dtype == torch.float32 and tsum[:, 1].sum().item() == 80000.0
    torch.testing.assert_close(reference_dice_ce(x, t), reference_dice_ce(x.float(), t))


# ---------------------------------------------------------------- the loss object, the builder

def split_into(x, t, sizes):
    out, i = [], 0
    for n in sizes:
        out.append((x[i:i + n], t[i:i + n]))
        i += n
    assert i == len(x)
    return out


@pytest.mark.parametrize("reduction", ["batch", "image"])
@pytest.mark.parametrize("opts", [{}, {"class_weights": (0.5, 1.0, 3.0), "ignore_index": IGNORE},
                                  {"include_background": True, "ce_weight": 0.0}],
                         ids=["plain", "weights-ignore", "bg-dice-only"])
def test_summed_parts_give_the_loss_of_the_whole_split(reduction, opts):
    x, t = phantom_batch(3, n=9, size=24, seed=70)
    t[2, :4] = IGNORE if opts.get("ignore_index") else 0
    loss = MulticlassDiceCELoss(classes=3, dice_reduction=reduction, **opts)
    whole = loss(x, t).item()
    ref = reference_dice_ce(x, t, dice_reduction=reduction, **opts).item()
    assert whole == ref
    for sizes in ([9], [4, 4, 1], [1] * 9, [0, 5, 0, 4]):
        parts = sum(loss.parts(a, b) for a, b in split_into(x, t, sizes))
        assert parts.dtype == torch.float64 and parts.numel() == loss.n_parts
        assert loss.from_parts(parts) == pytest.approx(whole, rel=1e-6), sizes
    assert math.isnan(loss.from_parts(loss.parts(x[:0], t[:0])))


def test_the_loss_object_checks_its_class_count_and_freezes_weights():
    w = [1.0, 2.0, 3.0]
    loss = MulticlassDiceCELoss(classes=3, class_weights=w)
    w[1] = 100.0
    assert loss.class_weights == (1.0, 2.0, 3.0)
    x, t = random_batch(4, seed=71)
    with pytest.raises(ValueError, match="N×3×spatial"):
        loss(x, t)


@pytest.mark.parametrize("kind,weights", [("dice_bce", (0.7, 2.0)), ("bce", (0.7, 0.0)),
                                          ("dice", (0.0, 2.0))])
def test_build_multiclass_loss_fn_is_the_configured_loss(kind, weights):
    cfg = LossConfig(loss=kind, bce_weight=0.7, dice_weight=2.0, dice_reduction="image",
                     fused_loss="off")
    fn = build_multiclass_loss_fn(cfg, 3, class_weights=[0.2, 1.0, 2.0], ignore_index=IGNORE)
    x, t = random_batch(3, seed=72, ignore_frac=0.1)
    want = reference_dice_ce(x, t, ce_weight=weights[0], dice_weight=weights[1],
                             dice_reduction="image", class_weights=[0.2, 1.0, 2.0],
                             ignore_index=IGNORE)
    assert torch.equal(fn(x, t), want)


def test_one_class_is_exactly_the_binary_loss():
    cfg = LossConfig(loss="dice_bce", bce_weight=0.4, dice_weight=1.3, dice_reduction="batch",
                     fused_loss="auto")
    fn = build_multiclass_loss_fn(cfg, 1)
    assert isinstance(fn, DiceBCELoss) and fn == build_loss_fn(cfg)
    gen = torch.Generator().manual_seed(73)
    x, t = torch.randn(2, 1, 9, 9, generator=gen), (torch.rand(2, 1, 9, 9, generator=gen) > 0.5)
    assert torch.equal(fn(x, t), build_loss_fn(cfg)(x, t))
    with pytest.raises(ValueError, match="classes ≥ 2"):
        build_multiclass_loss_fn(cfg, 1, ignore_index=IGNORE)


@pytest.mark.slow
def test_compiled_reference_matches_eager():
    x, t = phantom_batch(3, n=2, size=32, seed=74)
    compiled = torch.compile(reference_dice_ce)
    eager = grads(reference_dice_ce, x, t, dice_reduction="image", class_weights=[1.0, 2.0, 0.5])
    comp = grads(compiled, x, t, dice_reduction="image", class_weights=[1.0, 2.0, 0.5])
    assert_same(comp, eager, grad_rtol=1e-5, grad_atol=1e-9)
    with pytest.raises(RuntimeError, match=r"\[0, 3\)"):   # the label check survives compile
        compiled(x, torch.where(t == t.max(), 7, t))


def _loss_benchmark():
    import importlib.util
    import sys
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loss.py"
    spec = importlib.util.spec_from_file_location("bench_loss_multiclass", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                        # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_loss_benchmark_times_the_k_class_loss(capsys):
    bench = _loss_benchmark()
    argv = ["--device", "cpu", "--size", "24", "--batch-size", "2", "--iters", "1", "--warmup",
            "1", "--variants", "reference,fused", "--json", "--dtype", "fp32"]
    report = bench.main(argv + ["--classes", "3", "--dice-reduction", "image"])
    assert report["settings"]["classes"] == 3 and report["settings"]["shape"] == [2, 3, 24, 24]
    assert "skipped" in report["results"]["fused"]      # CPU: the interpreter is not timed
    x, t = bench.make_inputs(bench.parse_args(argv + ["--classes", "3"]), torch.device("cpu"))
    assert set(t.unique().tolist()) == {0, 1, 2}
    want = reference_dice_ce(x, t, dice_reduction="image").item()
    assert report["results"]["reference"]["loss"] == pytest.approx(want, rel=1e-6)
    binary = bench.main(argv)                           # --classes 1: the report as before
    assert "classes" not in binary["settings"] and binary["settings"]["shape"] == [2, 1, 24, 24]
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--classes", "3", "--pos-weight", "2"])
    assert e.value.code == 2
    capsys.readouterr()


# ---------------------------------------------------------------- the fused kernel

@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def run_both(x, t, **kw):
    return grads(fused_dice_ce, x, t, **kw), grads(reference_dice_ce, x, t, **kw)


def assert_match(kernel, ref, dtype):
    (lk, gk), (lr, gr) = kernel, ref
    assert lk.dtype == torch.float32 and torch.isfinite(lk)
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=1e-7)
    assert gk.dtype == gr.dtype == dtype and gk.stride() == gr.stride()
    assert torch.isfinite(gk.float()).all()
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(gk.float(), gr.float(), rtol=rtol, atol=atol)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("reduction", ["batch", "image"])
def test_kernel_matches_reference(k, dtype, layout, reduction):
    x, t = random_batch(k, shape=(2, 37, 29), seed=k, ignore_frac=0.1)  # ragged last tile
    t[0][t[0] == k - 1] = 0                             # class K-1 empty in image 0
    x = x.to(DTYPES[dtype])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    kw = dict(ce_weight=0.7, dice_weight=1.3, dice_reduction=reduction, ignore_index=IGNORE,
              class_weights=[0.5 + i for i in range(k)], include_background=(k == 3))
    kernel, ref = run_both(x, t.to(torch.uint8), **kw)
    assert_match(kernel, ref, DTYPES[dtype])
    if layout == "channels_last":
        assert kernel[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("k", KS)
def test_kernel_on_phantom_label_maps(k):
    x, t = phantom_batch(k, n=3, size=48, seed=80 + k)
    for reduction in ("batch", "image"):
        assert_match(*run_both(x, t, dice_reduction=reduction), torch.float32)


@pytest.mark.usefixtures("interpret")
def test_kernel_per_image_class_sums_match():
    x, t = random_batch(5, shape=(3, 23, 31), seed=81, ignore_frac=0.2)
    t[1][t[1] == 2] = 4                                 # class 2 absent from image 1
    w = [0.3, 1.0, 2.0, 0.0, 5.0]
    got = fused_multiclass_sums(x, t, w, IGNORE)
    want = multiclass_sums(x, t, class_weights=w, ignore_index=IGNORE)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert got[2][1, 2] == 0 and got[0][1, 2] == 0


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("shape", [(1, 13, 7), (1, 71, 73), (4, 1, 1), (2, 5, 6, 7)],
                         ids=["b1-below-block", "b1-several-tiles", "1px", "volume"])
def test_kernel_odd_sizes(shape):
    x, t = random_batch(3, shape=shape, seed=82, ignore_frac=0.1)
    for reduction in ("batch", "image"):
        assert_match(*run_both(x, t, dice_reduction=reduction, ignore_index=IGNORE),
                     torch.float32)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("k", [9, 17])
def test_kernel_many_classes(k):
    x, t = random_batch(k, shape=(2, 19, 21), seed=k, ignore_frac=0.1)
    kw = dict(ignore_index=IGNORE,
              class_weights=torch.rand(k, generator=torch.Generator().manual_seed(k)).tolist())
    for reduction in ("batch", "image"):
        assert_match(*run_both(x, t, dice_reduction=reduction, **kw), torch.float32)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("ignore", [-100, 0, 2], ids=["torch-default", "background", "a-class"])
def test_kernel_ignore_index_values(ignore):
    x, t = random_batch(3, shape=(2, 15, 17), seed=89)
    gen = torch.Generator().manual_seed(90)
    t[torch.rand(t.shape, generator=gen) < 0.2] = ignore
    kernel, ref = run_both(x, t, ignore_index=ignore, dice_reduction="image",
                           include_background=True)
    assert_match(kernel, ref, torch.float32)
    ce_only = reference_dice_ce(x, t, ignore_index=ignore, dice_weight=0.0)
    torch.testing.assert_close(ce_only, nn.CrossEntropyLoss(ignore_index=ignore)(x, t))


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernel_extreme_logits(dtype):
    gen = torch.Generator().manual_seed(83)
    t = torch.randint(0, 3, (2, 17, 19), generator=gen)
    wrong = torch.nn.functional.one_hot((t + 1) % 3, 3).permute(0, 3, 1, 2).float()
    x = (200 * wrong - 100).to(DTYPES[dtype])           # confidently wrong everywhere
    kernel, ref = run_both(x, t, dice_reduction="image")
    assert_match(kernel, ref, DTYPES[dtype])
    assert kernel[0].item() > 100
    x_right = (200 * torch.nn.functional.one_hot(t, 3).permute(0, 3, 1, 2).float() - 100)
    kernel, ref = run_both(x_right.to(DTYPES[dtype]), t, dice_reduction="image")
    assert_match(kernel, ref, DTYPES[dtype])
    assert kernel[0].item() < 1e-4


@pytest.mark.usefixtures("interpret")
def test_kernel_empty_classes_all_ignored_and_single_terms():
    x, t = random_batch(4, seed=84)
    t[0] = 0                                            # image 0: background only
    t[1][t[1] == 3] = 1                                 # class 3 only in image 2
    for kw in (dict(dice_reduction="batch"), dict(dice_reduction="image"),
               dict(ce_weight=0.0), dict(dice_weight=0.0, class_weights=[1.0, 2.0, 3.0, 4.0])):
        assert_match(*run_both(x, t, **kw), torch.float32)
    all_ignored = torch.full_like(t, IGNORE)
    kernel, ref = run_both(x, all_ignored, ignore_index=IGNORE, dice_reduction="image")
    assert_match(kernel, ref, torch.float32)
    assert (kernel[1] == 0).all()


@pytest.mark.usefixtures("interpret")
def test_kernel_label_dtypes_layouts_and_strided_logits():
    big, t = random_batch(3, shape=(2, 30, 50), seed=85)
    x = big[:, :, 4:, ::2]                              # not dense: copied
    t = t[:, 4:, ::2]
    ref = grads(reference_dice_ce, x, t)
    for tt in (t, t.to(torch.uint8), t.int(), t.to(torch.int8), t[:, None], t.mT.contiguous().mT):
        assert_match(grads(fused_dice_ce, x, tt), ref, torch.float32)
    x2 = torch.randn(2, 2, 9, 11)
    b = torch.rand(2, 9, 11) > 0.5
    assert_match(grads(fused_dice_ce, x2, b), grads(reference_dice_ce, x2, b.long()), torch.float32)


@pytest.mark.usefixtures("interpret")
def test_kernel_sums_in_fp32_beyond_fp16_range():
    x = torch.zeros(1, 2, 300, 300, dtype=torch.float16)
    x[:, 1] = 8.0
    t = torch.ones(1, 300, 300, dtype=torch.uint8)
    inter, psum, tsum, ce_sum, w_sum = fused_multiclass_sums(x, t)
    assert tsum[0, 1].item() == 90000.0 and w_sum.item() == 90000.0
    want = multiclass_sums(x, t)
    for g, r in zip((inter, psum, tsum, ce_sum, w_sum), want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("interpret")
def test_kernel_refuses_bad_labels_and_arguments():
    x, t = random_batch(3, seed=86)
    with pytest.raises(ValueError, match=r"\[0, 3\).*2 pixel"):
        fused_dice_ce(x, _with_bad(t, 2))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fused_dice_ce(x, torch.where(t == 1, -1, t))
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        fused_dice_ce(x.double(), t)
    with pytest.raises(TypeError, match="integer"):
        fused_multiclass_sums(x, t.float())


def _with_bad(t, count):
    t = t.clone()
    t.view(-1)[:count] = 9
    return t


@pytest.mark.usefixtures("interpret")
def test_dispatch_on_auto_off(monkeypatch):
    x, t = random_batch(3, shape=(2, 9, 11), seed=87)
    xx = x.clone().requires_grad_()
    on = dice_ce_loss(xx, t, fused="on")
    assert "_FusedDiceCESumsBackward" in _graph_names(on)
    for mode in ("auto", "off"):                        # CPU tensors: auto means the reference
        loss = dice_ce_loss(xx, t, fused=mode)
        assert "_FusedDiceCESumsBackward" not in _graph_names(loss)
        torch.testing.assert_close(loss, on, rtol=1e-5, atol=0)
    fn = build_multiclass_loss_fn(LossConfig(fused_loss="on"), 3)
    assert "_FusedDiceCESumsBackward" in _graph_names(fn(xx, t))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dice_ce_loss(xx, t, fused="on")                 # the choice is made per call
    from tumorseg_dist.kernels.launch import interpreting
    assert not interpreting()


def _graph_names(loss):
    names, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.usefixtures("interpret")
def test_kernel_under_cpu_autocast_returns_fp32():
    gen = torch.Generator().manual_seed(88)
    w = torch.randn(3, 1, 1, 1, generator=gen)
    inp = torch.randn(2, 1, 12, 14, generator=gen, requires_grad=True)
    t = torch.randint(0, 3, (2, 12, 14), generator=gen)
    out = []
    for mode in ("on", "off"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = nn.functional.conv2d(inp, w)
            assert logits.dtype == torch.bfloat16
            loss = dice_ce_loss(logits, t, fused=mode)
        assert loss.dtype == torch.float32
        logits.retain_grad()
        loss.backward()
        out.append((loss.detach(), logits.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=0)
    assert out[0][1].dtype == torch.bfloat16
    torch.testing.assert_close(out[0][1], out[1][1], rtol=2 ** -7, atol=1e-7)


@pytest.mark.parametrize("xdt,tdt,has_ignore", [("bf16", "u8", True), ("fp32", "i64", False),
                                                ("fp16", "i32", True)])
def test_gpu_flavour_compiles_for_sm90_without_a_gpu(xdt, tdt, has_ignore):
    """The compiled (non-interpreter) kernels lower to an sm_90 cubin on this CPU machine."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fwd, bwd = kmod._kernels(interpret=False)
    block, kp = kmod.block_sizes(5)
    common = {"x_ptr": "*" + xdt, "t_ptr": "*" + tdt, "w_ptr": "*fp32", "M": "i32", "K": "i32",
              "stride_n": "i32", "stride_c": "i32", "stride_p": "i32", "ignore_index": "i32",
              "HAS_IGNORE": "constexpr", "BLOCK": "constexpr", "KP": "constexpr"}
    consts = {"HAS_IGNORE": has_ignore, "BLOCK": block, "KP": kp}
    sources = [
        ASTSource(fn=fwd, signature={**common, "part_ptr": "*fp32", "scal_ptr": "*fp32",
                                     "P": "i32"}, constexprs=consts),
        ASTSource(fn=bwd, signature={**common, "coef_ptr": "*fp32", "gce_ptr": "*fp32",
                                     "g_ptr": "*" + xdt}, constexprs=consts),
    ]
    for src in sources:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": kmod.NUM_WARPS})
        assert len(compiled.asm["cubin"]) > 0


def test_block_sizes_keep_the_tile_at_a_fixed_element_count():
    assert kmod.block_sizes(2) == (1024, 2)
    assert kmod.block_sizes(3) == (512, 4)
    assert kmod.block_sizes(5) == (256, 8)
    assert kmod.block_sizes(200) == (16, 256)


def test_the_kernel_module_imports_nothing_from_the_package():
    """Only its own package's launcher (kernels/launch.py), never losses above it."""
    tree = ast.parse(Path(kmod.__file__).read_text())
    ours = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            and (getattr(n, "level", 0) or any(a.name.startswith("tumorseg_dist") for a in n.names)
                 or (getattr(n, "module", None) or "").startswith("tumorseg_dist"))]
    assert ours == ["from .launch import KernelPair, check_runnable as _check_runnable, programs_per_image"]
