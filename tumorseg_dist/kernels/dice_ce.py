"""Fused K-class softmax Dice + cross-entropy sums in Triton: one read of logits+labels forward,
one pass backward. The K-class sibling of kernels/dice_bce.py, built the same way.

Forward kernel: a program owns a tile of BLOCK pixels × KP class slots (KP = K rounded up to a
power of two, padded slots masked to -inf so they get probability 0) and reads each of the K
logits of a pixel once. Per pixel, in fp32 whatever the logits' dtype:

    m = max_k x_k,   s = Σ_k exp(x_k - m),   p_k = exp(x_k - m) / s
    ce = w_t · ((m - x_t) + log s)            (w = class weights, t = the pixel's label)

and, over the pixels whose label is not ignore_index, the per-(image, class) sums

    I[n,k] = Σ p_k·[t = k],   P[n,k] = Σ p_k,   T[n,k] = Σ [t = k]

plus per image Σ ce, Σ w_t and the number of labels outside [0, K) that are not ignore_index.
Like the binary kernel, each program of an (N, P) grid walks tiles P apart inside image n and
writes its partial sums to small (N, P, ...) buffers that torch sums: deterministic, no atomics.
The module stops at those sums (`fused_multiclass_sums`) and imports nothing from the package;
losses.fused_dice_ce makes the loss from them with the reference's own reductions.

Backward kernel: autograd hands us g_I[n,k], g_P[n,k] (dL/dI, dL/dP) and g_ce[n]. With
a_k = g_I[n,k]·[t = k] + g_P[n,k] the softmax Jacobian contracts to

    dL/dx_j = p_j · (a_j - Σ_k a_k p_k) + g_ce · w_t · (p_j - [j = t])

(0 at ignored pixels), recomputed from x in one pass and written in the logits' dtype and
strides. That gradient is the only full-size tensor allocated.

Layouts: pixel i of image n, class k sits at n·stride_n + k·stride_c + i·stride_p, which covers
NCHW-contiguous (stride_p = 1) and channels_last (stride_c = 1) without a copy; anything else is
made contiguous. Labels are read as an N×M row-major block (any integer dtype, or bool).

Where it runs: compiled on CUDA tensors; under the Triton interpreter when TRITON_INTERPRET=1 is
set at call time (CPU tensors, slow, for tests), chosen per call as in dice_bce.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import KernelPair, check_runnable as _check_runnable, programs_per_image

TILE_ELEMENTS = 2048      # BLOCK pixels × KP classes per tile: registers stay as for one class
NUM_WARPS = 8

# Only builtins and the standard library's own combiners, which the interpreter maps to numpy
# (see dice_bce.py: `tl.sum`/`tl.max` are @jit helpers fixed at `import triton` time and break
# the interpreter when TRITON_INTERPRET=1 is set later).
_sum_combine = tl.standard._sum_combine
_max_combine = tl.standard._elementwise_max


def _dice_ce_fwd(x_ptr, t_ptr, w_ptr, part_ptr, scal_ptr, M, P, K, stride_n, stride_c, stride_p,
                 ignore_index, HAS_IGNORE: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr):
    # Tiles are [KP classes, BLOCK pixels]: the pixel sums then reduce along the last axis,
    # which the interpreter's numpy sums pairwise (along a leading axis numpy adds row after
    # row, and 90000 fp32 terms drift by 1e-5).
    n = tl.program_id(0)
    c = tl.program_id(1)
    xbase = n.to(tl.int64) * stride_n
    tbase = n.to(tl.int64) * M
    offs = tl.arange(0, BLOCK)
    cls = tl.arange(0, KP)
    cmask = cls < K
    w = tl.load(w_ptr + cls, mask=cmask, other=0.0)
    acc_i = tl.full([KP, BLOCK], 0.0, tl.float32)
    acc_p = tl.full([KP, BLOCK], 0.0, tl.float32)
    acc_t = tl.full([KP, BLOCK], 0.0, tl.float32)
    acc_ce = tl.full([BLOCK], 0.0, tl.float32)
    acc_w = tl.full([BLOCK], 0.0, tl.float32)
    acc_bad = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(c * BLOCK, M, P * BLOCK):
        pix = start + offs
        pmask = pix < M
        m2 = cmask[:, None] & pmask[None, :]
        x = tl.load(x_ptr + xbase + cls[:, None] * stride_c + pix[None, :] * stride_p,
                    mask=m2, other=0.0).to(tl.float32)
        x = tl.where(cmask[:, None], x, float("-inf"))     # padded classes: probability 0
        t = tl.load(t_ptr + tbase + pix, mask=pmask, other=0).to(tl.int64)
        if HAS_IGNORE:
            counted = pmask & (t != ignore_index)
        else:
            counted = pmask
        valid = counted & (t >= 0) & (t < K)
        mx = tl.reduce(x, 0, _max_combine)
        e = tl.exp(x - mx[None, :])
        s = tl.reduce(e, 0, _sum_combine)
        p = e / s[None, :]
        onehot = (cls[:, None] == t[None, :]) & valid[None, :]
        x_t = tl.reduce(tl.where(onehot, x, 0.0), 0, _sum_combine)
        w_t = tl.reduce(tl.where(onehot, w[:, None], 0.0), 0, _sum_combine)
        acc_i += tl.where(onehot, p, 0.0)
        acc_p += tl.where(valid[None, :], p, 0.0)
        acc_t += tl.where(onehot, 1.0, 0.0)
        # lse - x_t as (m - x_t) + log s: m + log s would round log s away next to m
        acc_ce += tl.where(valid, w_t * ((mx - x_t) + tl.log(s)), 0.0)
        acc_w += w_t
        acc_bad += tl.where(counted & ((t < 0) | (t >= K)), 1.0, 0.0)
    out = part_ptr + (n * P + c) * (3 * KP)
    tl.store(out + cls, tl.reduce(acc_i, 1, _sum_combine))
    tl.store(out + KP + cls, tl.reduce(acc_p, 1, _sum_combine))
    tl.store(out + 2 * KP + cls, tl.reduce(acc_t, 1, _sum_combine))
    sout = scal_ptr + (n * P + c) * 3
    tl.store(sout + 0, tl.reduce(acc_ce, 0, _sum_combine))
    tl.store(sout + 1, tl.reduce(acc_w, 0, _sum_combine))
    tl.store(sout + 2, tl.reduce(acc_bad, 0, _sum_combine))


def _dice_ce_bwd(x_ptr, t_ptr, w_ptr, coef_ptr, gce_ptr, g_ptr, M, K, stride_n, stride_c,
                 stride_p, ignore_index, HAS_IGNORE: tl.constexpr, BLOCK: tl.constexpr,
                 KP: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1)
    xbase = n.to(tl.int64) * stride_n
    tbase = n.to(tl.int64) * M
    pix = c * BLOCK + tl.arange(0, BLOCK)
    pmask = pix < M
    cls = tl.arange(0, KP)
    cmask = cls < K
    m2 = cmask[:, None] & pmask[None, :]
    w = tl.load(w_ptr + cls, mask=cmask, other=0.0)
    g_i = tl.load(coef_ptr + n * (2 * KP) + cls)
    g_p = tl.load(coef_ptr + n * (2 * KP) + KP + cls)
    g_ce = tl.load(gce_ptr + n)
    offs2 = xbase + cls[:, None] * stride_c + pix[None, :] * stride_p
    x = tl.load(x_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
    x = tl.where(cmask[:, None], x, float("-inf"))
    t = tl.load(t_ptr + tbase + pix, mask=pmask, other=0).to(tl.int64)
    valid = pmask & (t >= 0) & (t < K)
    if HAS_IGNORE:
        valid = valid & (t != ignore_index)
    mx = tl.reduce(x, 0, _max_combine)
    e = tl.exp(x - mx[None, :])
    s = tl.reduce(e, 0, _sum_combine)
    p = e / s[None, :]
    onehot = (cls[:, None] == t[None, :]) & valid[None, :]
    a = tl.where(onehot, g_i[:, None], 0.0) + g_p[:, None]
    a_dot = tl.reduce(a * p, 0, _sum_combine)
    w_t = tl.reduce(tl.where(onehot, w[:, None], 0.0), 0, _sum_combine)
    grad = p * (a - a_dot[None, :]) + (g_ce * w_t)[None, :] * (p - tl.where(onehot, 1.0, 0.0))
    grad = tl.where(valid[None, :], grad, 0.0)
    tl.store(g_ptr + offs2, grad.to(g_ptr.dtype.element_ty), mask=m2)


_kernels = KernelPair(_dice_ce_fwd, _dice_ce_bwd)


def check_runnable(logits: torch.Tensor) -> bool:
    """Which flavour runs these logits (True = interpreter); a clear error if none can."""
    return _check_runnable(logits, "fused K-class Dice+CE loss")


def block_sizes(classes: int) -> tuple[int, int]:
    """(BLOCK pixels, KP class slots) of a tile for K classes."""
    kp = max(2, 1 << math.ceil(math.log2(classes)))
    return max(16, TILE_ELEMENTS // kp), kp


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x or a contiguous copy, stride_p): pixel i (row-major over the spatial dims) of class k
    is at n·stride(0) + k·stride(1) + i·stride_p. K ≥ 2, so stride(1) is meaningful in both."""
    if x.is_contiguous():
        return x, 1
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if cl is not None and x.is_contiguous(memory_format=cl):
        return x, x.shape[1]
    return x.contiguous(), 1


def _prepare(logits: torch.Tensor, labels: torch.Tensor, class_weights):
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused loss supports fp32/fp16/bf16 logits, got {logits.dtype}")
    if logits.dim() < 3 or logits.shape[1] < 2 or logits.numel() == 0:
        raise ValueError(f"logits must be N×K×spatial with K ≥ 2 and no empty dimension, got "
                         f"{tuple(logits.shape)}")
    n, k = logits.shape[:2]
    if logits.numel() // n >= 2 ** 31:          # in-image offsets are 32-bit in the kernels
        raise ValueError(f"fused loss: one image of {tuple(logits.shape[1:])} has 2^31 or more "
                         "logits; use the reference (--fused-loss off)")
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be logits shape "
                         f"{tuple(logits.shape)} without the class dimension")
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}")
    x, stride_p = _layout(logits.detach())
    t = labels.detach()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    t = t.reshape(n, -1).contiguous()            # row-major pixel order, as stride_p indexes x
    if class_weights is None:
        w = torch.ones(k, dtype=torch.float32, device=x.device)
    else:
        w = torch.as_tensor(class_weights, dtype=torch.float32).flatten().to(x.device)
        if w.numel() != k:
            raise ValueError(f"class_weights has {w.numel()} entries for {k} classes")
    return x, t, w.contiguous(), stride_p


class _FusedDiceCESums(torch.autograd.Function):
    """(logits, labels, class_weights, ignore_index) -> fp32 I, P, T (N×K), Σ w_t·ce, Σ w_t (N);
    gradient to the logits."""

    @staticmethod
    def forward(ctx, logits, labels, class_weights, ignore_index):
        x, t, w, stride_p = _prepare(logits, labels, class_weights)
        interpret = check_runnable(x)
        fwd, _ = _kernels(interpret)
        n, k = x.shape[:2]
        m = t.shape[1]
        block, kp = block_sizes(k)
        tiles = triton.cdiv(m, block)
        p = programs_per_image(tiles, n, interpret, x.device)
        part = torch.empty((n, p, 3, kp), dtype=torch.float32, device=x.device)
        scal = torch.empty((n, p, 3), dtype=torch.float32, device=x.device)
        has_ignore = ignore_index is not None
        ign = int(ignore_index) if has_ignore else 0
        fwd[(n, p)](x, t, w, part, scal, m, p, k, x.stride(0), x.stride(1), stride_p, ign,
                    HAS_IGNORE=has_ignore, BLOCK=block, KP=kp, num_warps=NUM_WARPS)
        sums = part.sum(1)[:, :, :k]
        ce_sum, w_sum, bad = scal.sum(1).unbind(1)
        # Labels outside [0, K) would silently count for no class; the reference refuses them
        # too. On CUDA as a device-side assert, as F.cross_entropy does: reading the count back
        # would synchronise every step, which the training loop otherwise avoids.
        message = f"labels must be in [0, {k}) or ignore_index={ignore_index}"
        if x.is_cuda:
            torch._assert_async(bad.sum() == 0, message)
        elif bool((bad > 0).any()):
            raise ValueError(f"{message}: {int(bad.sum().item())} pixel(s) are not")
        ctx.save_for_backward(x, t, w)
        ctx.meta = (interpret, stride_p, has_ignore, ign)
        inter, psum, tsum = sums.unbind(1)
        ctx.mark_non_differentiable(tsum, w_sum)
        return inter, psum, tsum, ce_sum, w_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_inter, g_psum, _g_tsum, g_ce, _g_wsum):
        x, t, w = ctx.saved_tensors
        interpret, stride_p, has_ignore, ign = ctx.meta
        _, bwd = _kernels(interpret)
        n, k = x.shape[:2]
        m = t.shape[1]
        block, kp = block_sizes(k)
        coef = torch.zeros((n, 2, kp), dtype=torch.float32, device=x.device)
        # a None gradient means that output did not reach the loss (e.g. dice_weight = 0)
        if g_inter is not None:
            coef[:, 0, :k] = g_inter
        if g_psum is not None:
            coef[:, 1, :k] = g_psum
        gce = (torch.zeros(n, device=x.device) if g_ce is None else g_ce).float().contiguous()
        grad = torch.empty_like(x)                  # same dtype and strides as the logits
        bwd[(n, triton.cdiv(m, block))](x, t, w, coef, gce, grad, m, k, x.stride(0), x.stride(1),
                                        stride_p, ign, HAS_IGNORE=has_ignore, BLOCK=block, KP=kp,
                                        num_warps=NUM_WARPS)
        return grad, None, None, None


def fused_multiclass_sums(logits: torch.Tensor, labels: torch.Tensor, class_weights=None,
                          ignore_index: int | None = None):
    """fp32 (I, P, T) per (image, class) and (Σ w_t·ce, Σ w_t) per image, over the pixels whose
    label is not ignore_index, from one read of the logits and labels (N×spatial integers)."""
    return _FusedDiceCESums.apply(logits, labels, class_weights, ignore_index)
