"""Segmentation losses. The PyTorch reference here is the spec; fast paths must match it.

`dice_bce_loss` = bce_weight * BCEWithLogits(mean over pixels) + dice_weight * (1 - soft Dice),
with all reductions in fp32 whatever the autocast dtype (fp16 sums overflow at 640×640).

dice_reduction:
* "batch": one Dice over every pixel of the batch, smp `DiceLoss("binary", from_logits=True)`
  semantics (smooth 0, eps 1e-7, loss 0 when the batch has no positive pixel).
* "image": mean over images of per-image Dice losses, MONAI `DiceLoss(sigmoid=True)` semantics
  (smooth_nr = smooth_dr = 1e-5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BATCH_SMOOTH, BATCH_EPS = 0.0, 1e-7
IMAGE_SMOOTH = 1e-5


def dice_sums(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image Σp·t, Σp, Σt in fp32 (p = sigmoid(logits))."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    return (p * t).sum(1), p.sum(1), t.sum(1)


def dice_from_sums(inter: torch.Tensor, psum: torch.Tensor, tsum: torch.Tensor,
                   reduction: str) -> torch.Tensor:
    if reduction == "batch":
        inter, psum, tsum = inter.sum(), psum.sum(), tsum.sum()
        score = (2 * inter + BATCH_SMOOTH) / (psum + tsum + BATCH_SMOOTH).clamp_min(BATCH_EPS)
        return (1 - score) * (tsum > 0).float()
    if reduction == "image":
        score = (2 * inter + IMAGE_SMOOTH) / (psum + tsum + IMAGE_SMOOTH)
        return (1 - score).mean()
    raise ValueError(f"dice_reduction must be 'batch' or 'image', got {reduction!r}")


def reference_dice_bce(logits: torch.Tensor, target: torch.Tensor, *, bce_weight: float = 1.0,
                       dice_weight: float = 1.0, dice_reduction: str = "batch",
                       pos_weight: float | None = None) -> torch.Tensor:
    """The spec: fp32 BCE-with-logits mean + soft Dice loss."""
    x, t = logits.float(), target.float()
    loss = x.new_zeros(())
    if bce_weight:
        pw = None if pos_weight is None else x.new_tensor(pos_weight)
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
    if dice_weight:
        loss = loss + dice_weight * dice_from_sums(*dice_sums(x, t), dice_reduction)
    return loss


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, *, bce_weight: float = 1.0,
                  dice_weight: float = 1.0, dice_reduction: str = "batch",
                  pos_weight: float | None = None, fused: str = "auto") -> torch.Tensor:
    """Public entry point used by the loop, the benchmark and outside code.

    fused: "off" = reference; "on" = Triton kernel (compiled on CUDA tensors; under the Triton
    interpreter when TRITON_INTERPRET=1 is set, else a RuntimeError saying so); "auto" = the
    kernel on CUDA tensors when Triton is importable, the reference elsewhere. Both paths give
    the same value and gradient (tolerances in docs/loss.md)."""
    if fused not in ("auto", "on", "off"):
        raise ValueError(f"fused must be auto, on or off, got {fused!r}")
    if dice_reduction not in ("batch", "image"):
        raise ValueError(f"dice_reduction must be 'batch' or 'image', got {dice_reduction!r}")
    use_kernel = fused == "on" or (fused == "auto" and logits.is_cuda and _kernel_available())
    if use_kernel:
        from .kernels.dice_bce import fused_dice_bce
        return fused_dice_bce(logits, target, bce_weight=bce_weight, dice_weight=dice_weight,
                              dice_reduction=dice_reduction, pos_weight=pos_weight)
    return reference_dice_bce(logits, target, bce_weight=bce_weight, dice_weight=dice_weight,
                              dice_reduction=dice_reduction, pos_weight=pos_weight)


def _kernel_available() -> bool:
    try:
        import triton  # noqa: F401
        from .kernels import dice_bce  # noqa: F401
    except ImportError:
        return False
    return True


def loss_weights(kind: str, bce_weight: float, dice_weight: float) -> tuple[float, float]:
    """--loss dice_bce|bce|dice -> (bce_weight, dice_weight)."""
    return {"dice_bce": (bce_weight, dice_weight), "bce": (bce_weight, 0.0),
            "dice": (0.0, dice_weight)}[kind]
