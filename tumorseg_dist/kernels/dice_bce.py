"""Fused Dice+BCE loss in Triton: one read of logits+targets forward, one pass backward.

Forward kernel: per image n it reads each logit x and target t once and accumulates, in fp32,

    Σ p·t,  Σ p,  Σ t,  Σ bce(x, t)            with p = sigmoid(x)

where bce is the numerically stable BCE-with-logits term (PyTorch's form, with pos_weight w):

    bce = (1 - t)·x + (1 + (w - 1)·t)·softplus(-x),   softplus(-x) = log1p(exp(-|x|)) + max(-x, 0)

Each program of a (N, P) grid walks tiles P apart inside image n and writes its four partial sums
to a small (N, P, 4) buffer that torch sums (deterministic, no atomics). This module stops at
those per-image sums (`fused_sums`) and imports nothing from the package: the loss is made from
them in `losses.fused_dice_bce` by the same `dice_from_sums` the reference uses, so the two
paths share one definition of Dice/"batch"/"image" reductions and smoothing constants.

Backward kernel: autograd hands us dL/dΣpt, dL/dΣp and dL/dΣbce per image (N-sized). The kernel
re-reads x and t, recomputes p and writes

    dL/dx = p(1-p)·(g_pt·t + g_p) + g_bce·((1 - t) - (1 + (w - 1)·t)·(1 - p))

in the logits' dtype, in one pass. The only full-size tensor allocated is that gradient.

Pad mask (issue 15): with HAS_PAD, a third input v ({0, 1}, 1 = real pixel, the layout of the
logits) multiplies every term, forward (Σ p·t·v, Σ p·v, Σ t·v, Σ bce·v) and backward (dL/dx·v),
so padded pixels contribute nothing. HAS_PAD is a compile-time constant: without a pad the
kernels are the same instructions as before.

Memory formats: a per-image sum does not depend on pixel order, so any layout in which each
image is one dense block of C·H·W elements (NCHW-contiguous or channels_last) is indexed as
`base + n·M + i`. The target is brought to the logits' strides so element i pairs up, and the
gradient is allocated with `empty_like(logits)`, i.e. with the same strides.

Where it runs: compiled Triton on CUDA tensors; with TRITON_INTERPRET=1 in the environment at
call time, the Triton interpreter (CPU tensors, slow, for tests). The kernel flavour is chosen
per call, not at import, so setting or clearing the variable in one test does not leak.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .launch import KernelPair, check_runnable as _check_runnable, programs_per_image

FWD_BLOCK = 2048        # elements per tile
BWD_BLOCK = 2048
NUM_WARPS = 8


# Kernels use only Triton builtins plus `tl.reduce` with the standard library's own sum combiner
# (what `tl.sum` does). Standard-library helpers such as `tl.sum`/`tl.zeros` are themselves
# @jit functions fixed at `import triton` time, so they would break the interpreter when
# TRITON_INTERPRET=1 is set after Triton was imported (e.g. by a test's monkeypatch); builtins
# and this combiner work in both flavours (the interpreter maps it to numpy.sum).
_sum_combine = tl.standard._sum_combine


def _dice_bce_fwd(x_ptr, t_ptr, v_ptr, part_ptr, M, P, pos_weight, HAS_PAD: tl.constexpr,
                  BLOCK: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1)
    base = n.to(tl.int64) * M
    offs = tl.arange(0, BLOCK)
    acc_pt = tl.full([BLOCK], 0.0, tl.float32)
    acc_p = tl.full([BLOCK], 0.0, tl.float32)
    acc_t = tl.full([BLOCK], 0.0, tl.float32)
    acc_bce = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(c * BLOCK, M, P * BLOCK):
        idx = start + offs
        mask = idx < M
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + base + idx, mask=mask, other=0).to(tl.float32)
        e = tl.exp(-tl.abs(x))                       # in (0, 1]: never overflows
        inv = 1.0 / (1.0 + e)
        p = tl.where(x >= 0, inv, e * inv)           # sigmoid(x), stable both sides
        u = 1.0 + e                                  # log1p(e), accurate for tiny e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        softplus_neg = log1p_e + tl.maximum(-x, 0.0)
        bce = (1.0 - t) * x + (1.0 + (pos_weight - 1.0) * t) * softplus_neg
        if HAS_PAD:
            v = tl.load(v_ptr + base + idx, mask=mask, other=0).to(tl.float32)
            p = p * v
            t = t * v
            bce = bce * v
        acc_pt += tl.where(mask, p * t, 0.0)
        acc_p += tl.where(mask, p, 0.0)
        acc_t += tl.where(mask, t, 0.0)
        acc_bce += tl.where(mask, bce, 0.0)
    out = part_ptr + (n * P + c) * 4
    tl.store(out + 0, tl.reduce(acc_pt, 0, _sum_combine))
    tl.store(out + 1, tl.reduce(acc_p, 0, _sum_combine))
    tl.store(out + 2, tl.reduce(acc_t, 0, _sum_combine))
    tl.store(out + 3, tl.reduce(acc_bce, 0, _sum_combine))


def _dice_bce_bwd(x_ptr, t_ptr, v_ptr, coef_ptr, g_ptr, M, pos_weight, HAS_PAD: tl.constexpr,
                  BLOCK: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1)
    base = n.to(tl.int64) * M
    idx = c * BLOCK + tl.arange(0, BLOCK)
    mask = idx < M
    g_pt = tl.load(coef_ptr + n * 3 + 0)
    g_p = tl.load(coef_ptr + n * 3 + 1)
    g_bce = tl.load(coef_ptr + n * 3 + 2)
    x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + base + idx, mask=mask, other=0).to(tl.float32)
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0, inv, e * inv)
    q = tl.where(x >= 0, e * inv, inv)               # 1 - p without cancellation
    grad = p * q * (g_pt * t + g_p) + g_bce * ((1.0 - t) - (1.0 + (pos_weight - 1.0) * t) * q)
    if HAS_PAD:
        grad = grad * tl.load(v_ptr + base + idx, mask=mask, other=0).to(tl.float32)
    tl.store(g_ptr + base + idx, grad.to(g_ptr.dtype.element_ty), mask=mask)


_kernels = KernelPair(_dice_bce_fwd, _dice_bce_bwd)


def check_runnable(logits: torch.Tensor) -> bool:
    """Which flavour runs these logits (True = interpreter); a clear error if none can."""
    return _check_runnable(logits, "fused Dice+BCE loss")


def _dense_per_image(x: torch.Tensor) -> torch.Tensor:
    """x itself if every image is one dense block of numel/N elements, else a contiguous copy."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _prepare(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits shape "
                         f"{tuple(logits.shape)} (binary masks: N×1×H×W, or N×H×W for both)")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused loss supports fp32/fp16/bf16 logits, got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[0] == 0 or logits.numel() == 0:
        raise ValueError(f"logits must be N×... with N ≥ 1 and no empty dimension, got {tuple(logits.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    x = _dense_per_image(logits.detach())
    return x, _like_logits(target, x)


def _like_logits(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A target or pad mask in a dtype the kernels read, with the logits' strides."""
    t = t.detach()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.dtype not in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
        t = t.float()
    if t.stride() != x.stride():                    # pair element i of x with element i of t
        t = torch.empty_strided(x.shape, x.stride(), dtype=t.dtype, device=t.device).copy_(t)
    return t


class _FusedDiceBCESums(torch.autograd.Function):
    """(logits, target, pos_weight, pad) -> per-image fp32 Σp·t, Σp, Σt, Σbce (over the pixels
    the pad marks real, every pixel without one); gradient to logits."""

    @staticmethod
    def forward(ctx, logits, target, pos_weight, pad):
        x, t = _prepare(logits, target)
        if pad is not None:
            if pad.shape != logits.shape or pad.device != logits.device:
                raise ValueError(f"pad mask {tuple(pad.shape)} on {pad.device} must have the logits' "
                                 f"shape {tuple(logits.shape)} and device {logits.device}")
            v = _like_logits(pad, x)
        else:
            v = t                                   # an unread placeholder pointer
        interpret = check_runnable(x)
        fwd, _ = _kernels(interpret)
        n = x.shape[0]
        m = x.numel() // n
        tiles = triton.cdiv(m, FWD_BLOCK)
        p = programs_per_image(tiles, n, interpret, x.device)
        partials = torch.empty((n, p, 4), dtype=torch.float32, device=x.device)
        fwd[(n, p)](x, t, v, partials, m, p, float(pos_weight), HAS_PAD=pad is not None,
                    BLOCK=FWD_BLOCK, num_warps=NUM_WARPS)
        sums = partials.sum(1)
        ctx.save_for_backward(x, t, v)
        ctx.has_pad = pad is not None
        ctx.pos_weight = float(pos_weight)
        ctx.interpret = interpret
        ctx.logits_shape = logits.shape
        inter, psum, tsum, bce = sums.unbind(1)
        ctx.mark_non_differentiable(tsum)
        return inter, psum, tsum, bce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_inter, g_psum, _g_tsum, g_bce):
        x, t, v = ctx.saved_tensors
        _, bwd = _kernels(ctx.interpret)
        n = x.shape[0]
        m = x.numel() // n
        coef = torch.stack([g_inter, g_psum, g_bce], 1).float().contiguous()
        grad = torch.empty_like(x)                  # same dtype and strides as the logits
        bwd[(n, triton.cdiv(m, BWD_BLOCK))](x, t, v, coef, grad, m, ctx.pos_weight,
                                             HAS_PAD=ctx.has_pad, BLOCK=BWD_BLOCK,
                                             num_warps=NUM_WARPS)
        return grad, None, None, None


def fused_sums(logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None,
               pad: torch.Tensor | None = None):
    """Per-image fp32 (Σp·t, Σp, Σt, Σbce) from one read of logits and targets (and the pad
    mask, 1 = real pixel, when given: padded pixels count in no sum and get no gradient)."""
    return _FusedDiceBCESums.apply(logits, target, 1.0 if pos_weight is None else pos_weight, pad)

