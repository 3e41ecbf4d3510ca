"""Fused Triton Dice+BCE kernel vs the PyTorch reference, on CPU under the Triton interpreter.

TRITON_INTERPRET=1 is set per test with monkeypatch (restored afterwards); the kernel module picks
interpreted or compiled kernels at call time, so nothing leaks into other test modules.

Tolerances (also in docs/loss.md):
* loss, any logits dtype: 1e-5 relative. The kernel and the reference both upcast the same
  half-precision inputs to fp32 and sum in fp32, so only the summation order differs.
* gradient, fp32: 1e-5 relative (+1e-9 absolute for entries that are ~0).
* gradient, fp16/bf16: one unit in the last place of the dtype (2^-10 fp16, 2^-7 bf16, relative,
  +1e-7 absolute for fp16 subnormals): both paths compute the gradient in fp32 and round it once
  to the logits' dtype, so they can differ by at most one rounding step.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton

from tumorseg_dist.kernels import dice_bce as kmod
from tumorseg_dist.kernels.dice_bce import fused_sums
from tumorseg_dist.losses import dice_bce_loss, dice_sums, fused_dice_bce, reference_dice_bce

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_TOL = {torch.float32: (1e-5, 1e-9), torch.float16: (2 ** -10, 1e-7),
            torch.bfloat16: (2 ** -7, 1e-7)}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_target(shape, kind, dtype, gen):
    if kind == "random":
        t = torch.rand(shape, generator=gen) > 0.6
    elif kind == "empty":
        t = torch.zeros(shape, dtype=torch.bool)
    elif kind == "full":
        t = torch.ones(shape, dtype=torch.bool)
    elif kind == "soft":
        return torch.rand(shape, generator=gen).to(dtype)
    else:
        raise ValueError(kind)
    return t.to(dtype)


def run_both(x, t, **kw):
    """(kernel loss, kernel grad, reference loss, reference grad) for the same inputs."""
    xk = x.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    lk = fused_dice_bce(xk, t, **kw)
    lk.backward()
    lr = reference_dice_bce(xr, t, **kw)
    lr.backward()
    return lk, xk.grad, lr, xr.grad


def assert_match(lk, gk, lr, gr, dtype):
    assert lk.dtype == torch.float32 and torch.isfinite(lk)
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=1e-7)
    assert gk.dtype == gr.dtype == dtype
    assert gk.stride() == gr.stride()
    rtol, atol = GRAD_TOL[dtype]
    assert torch.isfinite(gk.float()).all()
    torch.testing.assert_close(gk.float(), gr.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("reduction", ["batch", "image"])
@pytest.mark.parametrize("pos_weight", [None, 3.0])
def test_matches_reference_dtypes_layouts(dtype, layout, reduction, pos_weight):
    gen = torch.Generator().manual_seed(1)
    shape = (2, 3, 37, 29)                       # 3219 per image: 2 tiles, ragged tail
    x = (torch.randn(shape, generator=gen) * 3).to(DTYPES[dtype])
    t = make_target(shape, "random", torch.uint8, gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    lk, gk, lr, gr = run_both(x, t, bce_weight=0.7, dice_weight=1.3, dice_reduction=reduction,
                              pos_weight=pos_weight)
    assert_match(lk, gk, lr, gr, DTYPES[dtype])
    if layout == "channels_last":
        assert gk.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("tdtype", [torch.uint8, torch.bool, torch.float32, torch.float16])
def test_target_dtypes(tdtype):
    gen = torch.Generator().manual_seed(2)
    shape = (3, 1, 33, 35)
    x = torch.randn(shape, generator=gen) * 2
    t = make_target(shape, "random", tdtype, gen)
    for reduction in ("batch", "image"):
        assert_match(*run_both(x, t, dice_reduction=reduction), torch.float32)


def test_target_layout_differs_from_logits():
    gen = torch.Generator().manual_seed(3)
    shape = (2, 3, 19, 23)
    x = torch.randn(shape, generator=gen)
    t = make_target(shape, "random", torch.float32, gen)
    # logits NCHW, target channels_last, and the other way round
    assert_match(*run_both(x, t.contiguous(memory_format=torch.channels_last)), torch.float32)
    assert_match(*run_both(x.contiguous(memory_format=torch.channels_last), t), torch.float32)


def test_non_dense_logits_are_handled():
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(2, 1, 40, 62, generator=gen)
    x = big[:, :, 3:, ::2]                        # strided view, not dense per image
    t = make_target(x.shape, "random", torch.uint8, gen)
    assert_match(*run_both(x, t, dice_reduction="image"), torch.float32)


@pytest.mark.parametrize("shape", [(1, 1, 13, 7), (1, 1, 71, 73), (1, 71, 73), (5, 1, 1, 1)],
                         ids=["b1-below-block", "b1-three-tiles", "no-channel-dim", "1px"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_odd_sizes_and_batch_one(shape, dtype):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen) * 2).to(DTYPES[dtype])
    t = make_target(shape, "random", torch.uint8, gen)
    for reduction in ("batch", "image"):
        assert_match(*run_both(x, t, dice_reduction=reduction), DTYPES[dtype])


@pytest.mark.parametrize("kind", ["empty", "full", "soft"])
@pytest.mark.parametrize("reduction", ["batch", "image"])
def test_empty_full_and_soft_targets(kind, reduction):
    gen = torch.Generator().manual_seed(6)
    shape = (3, 1, 21, 25)
    x = torch.randn(shape, generator=gen)
    t = make_target(shape, kind, torch.float32, gen)
    lk, gk, lr, gr = run_both(x, t, dice_reduction=reduction, pos_weight=2.0)
    assert_match(lk, gk, lr, gr, torch.float32)
    if kind == "empty" and reduction == "batch":
        # smp semantics: no positive pixel in the batch -> the Dice term is exactly 0
        bce_only = fused_dice_bce(x, t, dice_weight=0.0, pos_weight=2.0)
        assert lk.item() == pytest.approx(bce_only.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("reduction", ["batch", "image"])
def test_extreme_logits(dtype, reduction):
    shape = (2, 1, 17, 19)
    gen = torch.Generator().manual_seed(7)
    sign = torch.where(torch.rand(shape, generator=gen) > 0.5, 1.0, -1.0)
    x = (100 * sign).to(DTYPES[dtype])
    t = make_target(shape, "random", torch.uint8, gen)
    lk, gk, lr, gr = run_both(x, t, dice_reduction=reduction, pos_weight=4.0)
    assert_match(lk, gk, lr, gr, DTYPES[dtype])
    assert lk.item() > 10                          # ~half the pixels are confidently wrong
    # confidently right everywhere: BCE ~0, Dice ~0, finite gradient
    x_right = torch.where(t.bool(), 100.0, -100.0).to(DTYPES[dtype])
    lk, gk, lr, gr = run_both(x_right, t, dice_reduction=reduction)
    assert_match(lk, gk, lr, gr, DTYPES[dtype])
    assert lk.item() < 1e-4


def test_sums_accumulate_in_fp32_beyond_fp16_range():
    # 300*300 = 90000 positives per image: an fp16 accumulator overflows (max 65504)
    shape = (1, 1, 300, 300)
    x = torch.full(shape, 8.0, dtype=torch.float16)
    t = torch.ones(shape, dtype=torch.uint8)
    inter, psum, tsum, bce = fused_sums(x, t)
    assert tsum.dtype == torch.float32
    assert tsum.item() == 90000.0
    ref_inter, ref_psum, ref_tsum = dice_sums(x, t)
    torch.testing.assert_close(torch.stack([inter, psum, tsum]),
                               torch.stack([ref_inter, ref_psum, ref_tsum]), rtol=1e-5, atol=0)
    ref_bce = F.binary_cross_entropy_with_logits(x.float(), t.float(), reduction="sum")
    torch.testing.assert_close(bce.sum(), ref_bce, rtol=1e-5, atol=1e-6)


def test_per_image_sums_match():
    gen = torch.Generator().manual_seed(8)
    shape = (4, 2, 23, 31)
    x = torch.randn(shape, generator=gen) * 4
    t = make_target(shape, "random", torch.bool, gen)
    inter, psum, tsum, bce = fused_sums(x, t, pos_weight=1.5)
    for got, ref in zip((inter, psum, tsum), dice_sums(x, t)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ref_bce = F.binary_cross_entropy_with_logits(
        x, t.float(), pos_weight=torch.tensor(1.5), reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(bce, ref_bce, rtol=1e-5, atol=1e-5)


def test_weights_zero_terms():
    gen = torch.Generator().manual_seed(9)
    shape = (2, 1, 15, 16)
    x = torch.randn(shape, generator=gen)
    t = make_target(shape, "random", torch.uint8, gen)
    assert_match(*run_both(x, t, bce_weight=0.0, dice_weight=2.0), torch.float32)
    assert_match(*run_both(x, t, bce_weight=1.5, dice_weight=0.0), torch.float32)


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


def test_dispatch_on_auto_off():
    x = torch.randn(2, 1, 9, 11, requires_grad=True)
    t = torch.rand(2, 1, 9, 11) > 0.5
    on = dice_bce_loss(x, t, fused="on")
    assert "_FusedDiceBCESumsBackward" in _graph_names(on)
    for mode in ("auto", "off"):                  # CPU tensors: auto means the reference
        loss = dice_bce_loss(x, t, fused=mode)
        assert "_FusedDiceBCESumsBackward" not in _graph_names(loss)
        torch.testing.assert_close(loss, on, rtol=1e-5, atol=0)


def test_on_without_cuda_or_interpreter_fails_clearly(monkeypatch):
    x = torch.randn(1, 1, 8, 8)
    t = torch.zeros(1, 1, 8, 8)
    dice_bce_loss(x, t, fused="on")               # interpreted kernels now exist ...
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dice_bce_loss(x, t, fused="on")           # ... but the choice is made per call
    from tumorseg_dist.kernels.launch import interpreting
    assert not interpreting()


def test_bad_arguments():
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        fused_dice_bce(x, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="dice_reduction"):
        fused_dice_bce(x, torch.zeros(2, 1, 8, 8), dice_reduction="mean")
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        fused_dice_bce(x.double(), torch.zeros(2, 1, 8, 8))


def test_under_cpu_autocast_returns_fp32():
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(1, 1, 1, 1, generator=gen)
    x = torch.randn(2, 1, 12, 14, generator=gen, requires_grad=True)
    t = make_target((2, 1, 12, 14), "random", torch.uint8, gen)
    losses, grads, logit_grads = [], [], []
    for mode in ("on", "off"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.conv2d(x, w)                # bf16 under autocast
            assert logits.dtype == torch.bfloat16
            loss = dice_bce_loss(logits, t, fused=mode)
        assert loss.dtype == torch.float32
        logits.retain_grad()
        loss.backward()
        losses.append(loss.detach())
        logit_grads.append(logits.grad)
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    assert logit_grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(logit_grads[0], logit_grads[1], rtol=2 ** -7, atol=1e-7)
    # conv backward multiplies by w in bf16: a second rounding, so up to two bf16 ulps
    torch.testing.assert_close(grads[0], grads[1], rtol=2 ** -6, atol=1e-6)


@pytest.mark.parametrize("xdt,tdt,has_pad", [("bf16", "u8", True), ("fp32", "fp32", False)])
def test_gpu_flavour_compiles_for_sm90_without_a_gpu(xdt, tdt, has_pad):
    """The compiled (non-interpreter) kernels lower all the way to an sm_90 cubin on this CPU box
    (with and without the pad mask)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fwd, bwd = kmod._kernels(interpret=False)
    common = {"x_ptr": "*" + xdt, "t_ptr": "*" + tdt, "v_ptr": "*fp32", "M": "i32",
              "pos_weight": "fp32", "HAS_PAD": "constexpr", "BLOCK": "constexpr"}
    sources = [
        ASTSource(fn=fwd, signature={**common, "part_ptr": "*fp32", "P": "i32"},
                  constexprs={"BLOCK": kmod.FWD_BLOCK, "HAS_PAD": has_pad}),
        ASTSource(fn=bwd, signature={**common, "coef_ptr": "*fp32", "g_ptr": "*" + xdt},
                  constexprs={"BLOCK": kmod.BWD_BLOCK, "HAS_PAD": has_pad}),
    ]
    for src in sources:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": kmod.NUM_WARPS})
        assert len(compiled.asm["cubin"]) > 0


def test_the_kernel_module_imports_nothing_from_the_package():
    """losses -> kernels only: the kernel stops at per-image sums, losses makes the loss. Its
    own package's launcher (kernels/launch.py) is the one import it may make."""
    import ast
    tree = ast.parse(Path(kmod.__file__).read_text())
    ours = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            and (getattr(n, "level", 0) or any(a.name.startswith("tumorseg_dist") for a in n.names)
                 or (getattr(n, "module", None) or "").startswith("tumorseg_dist"))]
    assert ours == ["from .launch import KernelPair, check_runnable as _check_runnable, programs_per_image"]


@pytest.mark.parametrize("kind,weights", [("dice_bce", (1.0, 2.0)), ("bce", (1.0, 0.0)), ("dice", (0.0, 2.0))])
def test_build_loss_fn_is_the_configured_loss(kind, weights):
    from tumorseg_dist.config import LossConfig
    from tumorseg_dist.losses import build_loss_fn
    fn = build_loss_fn(LossConfig(loss=kind, bce_weight=1.0, dice_weight=2.0, dice_reduction="image",
                                  fused_loss="off"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    want = reference_dice_bce(x, t, bce_weight=weights[0], dice_weight=weights[1], dice_reduction="image")
    assert torch.equal(fn(x, t), want)
