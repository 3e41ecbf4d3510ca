"""Segmentation losses. The PyTorch reference here is the spec; fast paths must match it.

`dice_bce_loss` = bce_weight * BCEWithLogits(mean over pixels) + dice_weight * (1 - soft Dice),
with all reductions in fp32 whatever the autocast dtype (fp16 sums overflow at 640×640).

dice_reduction:
* "batch": one Dice over every pixel of the batch, smp `DiceLoss("binary", from_logits=True)`
  semantics (smooth 0, eps 1e-7, loss 0 when the batch has no positive pixel).
* "image": mean over images of per-image Dice losses, MONAI `DiceLoss(sigmoid=True)` semantics
  (smooth_nr = smooth_dr = 1e-5).

`DiceBCELoss` is the same loss as an object: called on a batch it is `dice_bce_loss` (training);
its `parts`/`from_parts` give the loss of a whole split as if it were one batch, summed over any
number of batches and ranks (the validation loss, exact whatever the world size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LossConfig

BATCH_SMOOTH, BATCH_EPS = 0.0, 1e-7
IMAGE_SMOOTH = 1e-5


def dice_sums(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image Σp·t, Σp, Σt in fp32 (p = sigmoid(logits))."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    return (p * t).sum(1), p.sum(1), t.sum(1)


def image_dice_losses(inter: torch.Tensor, psum: torch.Tensor, tsum: torch.Tensor) -> torch.Tensor:
    """Per-image 1 - soft Dice, MONAI smoothing (the terms "image" reduction averages)."""
    return 1 - (2 * inter + IMAGE_SMOOTH) / (psum + tsum + IMAGE_SMOOTH)


def dice_from_sums(inter: torch.Tensor, psum: torch.Tensor, tsum: torch.Tensor,
                   reduction: str) -> torch.Tensor:
    if reduction == "batch":
        inter, psum, tsum = inter.sum(), psum.sum(), tsum.sum()
        score = (2 * inter + BATCH_SMOOTH) / (psum + tsum + BATCH_SMOOTH).clamp_min(BATCH_EPS)
        return (1 - score) * (tsum > 0).float()
    if reduction == "image":
        return image_dice_losses(inter, psum, tsum).mean()
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


def fused_dice_bce(logits: torch.Tensor, target: torch.Tensor, *, bce_weight: float = 1.0,
                   dice_weight: float = 1.0, dice_reduction: str = "batch",
                   pos_weight: float | None = None) -> torch.Tensor:
    """Same value and gradient as `reference_dice_bce`, from the fused Triton kernel's per-image
    sums (kernels/dice_bce.py stops at the sums, so it never imports this module)."""
    from .kernels.dice_bce import fused_sums  # imports Triton: only when the kernel is used
    if dice_reduction not in ("batch", "image"):
        raise ValueError(f"dice_reduction must be 'batch' or 'image', got {dice_reduction!r}")
    inter, psum, tsum, bce = fused_sums(logits, target, pos_weight)
    loss = inter.new_zeros(())
    if bce_weight:
        loss = loss + bce_weight * (bce.sum() / logits.numel())
    if dice_weight:
        loss = loss + dice_weight * dice_from_sums(inter, psum, tsum, dice_reduction)
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


@dataclass(frozen=True)
class DiceBCELoss:
    """`dice_bce_loss` with fixed options; also the exact loss of a split (see `parts`)."""

    bce_weight: float = 1.0
    dice_weight: float = 1.0
    dice_reduction: str = "batch"
    pos_weight: float | None = None
    fused: str = "auto"

    N_PARTS = 5

    def __post_init__(self) -> None:
        if self.fused not in ("auto", "on", "off"):
            raise ValueError(f"fused must be auto, on or off, got {self.fused!r}")
        if self.dice_reduction not in ("batch", "image"):
            raise ValueError(f"dice_reduction must be 'batch' or 'image', got {self.dice_reduction!r}")

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_bce_loss(logits, target, bce_weight=self.bce_weight, dice_weight=self.dice_weight,
                             dice_reduction=self.dice_reduction, pos_weight=self.pos_weight,
                             fused=self.fused)

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch's additive parts as float64 [N_PARTS]: [Σ BCE, pixels, then for "batch"
        Σp·t, Σp, Σt; for "image" Σ per-image Dice loss, images, 0]. Sums of these over batches
        and ranks give `from_parts` the loss of all those samples as one batch. Per-image sums
        are fp32 like the loss; they are added up in float64, so the partition into batches and
        ranks changes the result only by float64 rounding."""
        x, t = logits.float().flatten(1), target.float().flatten(1)
        out = torch.zeros(self.N_PARTS, dtype=torch.float64, device=x.device)
        if x.shape[0] == 0:
            return out
        pw = None if self.pos_weight is None else x.new_tensor(self.pos_weight)
        bce = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none").sum(1)
        out[0], out[1] = bce.double().sum(), float(x.numel())
        inter, psum, tsum = dice_sums(x, t)
        if self.dice_reduction == "batch":
            out[2:] = torch.stack([inter, psum, tsum], 1).double().sum(0)
        else:
            out[2] = image_dice_losses(inter, psum, tsum).double().sum()
            out[3] = float(x.shape[0])
        return out

    def from_parts(self, parts: list[float] | torch.Tensor) -> float:
        """The loss from summed `parts`: bce_weight · ΣBCE / pixels + dice_weight · Dice term,
        the Dice term of the summed Σp·t, Σp, Σt ("batch") or the mean per-image term ("image").
        NaN (undefined) with no pixel."""
        bce, pixels, a, b, c = torch.as_tensor(parts, dtype=torch.float64).tolist()
        if pixels == 0:
            return float("nan")
        if self.dice_reduction == "batch":
            dice = dice_from_sums(*(torch.tensor(v, dtype=torch.float64) for v in (a, b, c)), "batch").item()
        else:
            dice = a / b
        return self.bce_weight * bce / pixels + self.dice_weight * dice


def loss_weights(kind: str, bce_weight: float, dice_weight: float) -> tuple[float, float]:
    """--loss dice_bce|bce|dice -> (bce_weight, dice_weight)."""
    return {"dice_bce": (bce_weight, dice_weight), "bce": (bce_weight, 0.0),
            "dice": (0.0, dice_weight)}[kind]


def build_loss_fn(cfg: LossConfig) -> DiceBCELoss:
    """The training loss of --loss, --bce-weight, --dice-weight, --dice-reduction, --fused-loss:
    `loss_fn(logits, target)`, what the engines call on every micro-batch. An object, not a
    closure: evaluation sums its parts over batches and ranks (exact val_loss)."""
    bce_w, dice_w = loss_weights(cfg.loss, cfg.bce_weight, cfg.dice_weight)
    return DiceBCELoss(bce_weight=bce_w, dice_weight=dice_w, dice_reduction=cfg.dice_reduction,
                       fused=cfg.fused_loss)
