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

pad (issue 15, `Batch.pad`): an optional {0, 1} valid-pixel mask shaped like the binary target
(N×1×H×W; 1 = real pixel). Padded pixels count in no term: BCE is the mean over the real pixels
only, and the Dice sums Σp·t, Σp, Σt run over real pixels only (p and t multiplied by the mask,
as MONAI's MaskedDiceLoss does). A letterboxed image thus has the loss of its unpadded original.
pad=None is today's arithmetic, unchanged (not a mask of ones: the same operations).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LossConfig

BATCH_SMOOTH, BATCH_EPS = 0.0, 1e-7
IMAGE_SMOOTH = 1e-5


def pad_mask(pad: torch.Tensor, like: torch.Tensor, what: str = "logits") -> torch.Tensor:
    """The valid-pixel mask as fp32 N×M (M = pixels per image, flattened as `like` is), checked
    against `like`: binary logits N×1×spatial, or K-class labels N×spatial (one per pixel)."""
    if pad.shape[0] != like.shape[0] or pad.numel() != like.numel():
        raise ValueError(f"pad mask shape {tuple(pad.shape)} does not fit {what} shape "
                         f"{tuple(like.shape)}: it must be N×1×H×W, 1 = real pixel")
    if pad.device != like.device:
        raise ValueError(f"pad mask is on {pad.device} but {what} are on {like.device}")
    return pad.float().reshape(pad.shape[0], -1)


def dice_sums(logits: torch.Tensor, target: torch.Tensor,
              pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image Σp·t, Σp, Σt in fp32 (p = sigmoid(logits)), over the real pixels with a pad."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    if pad is not None:
        v = pad_mask(pad, logits)
        p, t = p * v, t * v
    return (p * t).sum(1), p.sum(1), t.sum(1)


def masked_bce_sums(x: torch.Tensor, t: torch.Tensor, pad: torch.Tensor | None,
                    pos_weight: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image fp32 Σ bce over the real pixels, and the number of real pixels (N each)."""
    pw = None if pos_weight is None else x.new_tensor(pos_weight)
    x, t = x.float().flatten(1), t.float().flatten(1)
    bce = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none")
    if pad is None:
        return bce.sum(1), x.new_full((x.shape[0],), float(x.shape[1]))
    v = pad_mask(pad, x)
    return (bce * v).sum(1), v.sum(1)


def masked_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count; 0 when no pixel is real (an all-padding batch has nothing to learn)."""
    return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), total.new_zeros(()))


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
                       pos_weight: float | None = None, pad: torch.Tensor | None = None) -> torch.Tensor:
    """The spec: fp32 BCE-with-logits mean + soft Dice loss (over the real pixels with a pad)."""
    x, t = logits.float(), target.float()
    loss = x.new_zeros(())
    if bce_weight:
        if pad is None:
            pw = None if pos_weight is None else x.new_tensor(pos_weight)
            bce = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
        else:
            bce = masked_mean(*(v.sum() for v in masked_bce_sums(x, t, pad, pos_weight)))
        loss = loss + bce_weight * bce
    if dice_weight:
        loss = loss + dice_weight * dice_from_sums(*dice_sums(x, t, pad), dice_reduction)
    return loss


def fused_dice_bce(logits: torch.Tensor, target: torch.Tensor, *, bce_weight: float = 1.0,
                   dice_weight: float = 1.0, dice_reduction: str = "batch",
                   pos_weight: float | None = None, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Same value and gradient as `reference_dice_bce`, from the fused Triton kernel's per-image
    sums (kernels/dice_bce.py stops at the sums, so it never imports this module)."""
    from .kernels.dice_bce import fused_sums  # imports Triton: only when the kernel is used
    if dice_reduction not in ("batch", "image"):
        raise ValueError(f"dice_reduction must be 'batch' or 'image', got {dice_reduction!r}")
    if pad is not None:
        pad_mask(pad, logits)                               # shape and device: a clear error
    inter, psum, tsum, bce = fused_sums(logits, target, pos_weight, pad)
    loss = inter.new_zeros(())
    if bce_weight:
        if pad is None:
            loss = loss + bce_weight * (bce.sum() / logits.numel())
        else:
            loss = loss + bce_weight * masked_mean(bce.sum(), pad.float().sum())
    if dice_weight:
        loss = loss + dice_weight * dice_from_sums(inter, psum, tsum, dice_reduction)
    return loss


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, *, bce_weight: float = 1.0,
                  dice_weight: float = 1.0, dice_reduction: str = "batch",
                  pos_weight: float | None = None, fused: str = "auto",
                  pad: torch.Tensor | None = None) -> torch.Tensor:
    """Public entry point used by the loop, the benchmark and outside code.

    fused: "off" = reference; "on" = Triton kernel (compiled on CUDA tensors; under the Triton
    interpreter when TRITON_INTERPRET=1 is set, else a RuntimeError saying so); "auto" = the
    kernel on CUDA tensors when Triton is importable, the reference elsewhere. Both paths give
    the same value and gradient (tolerances in docs/loss.md). pad: the valid-pixel mask (above)."""
    if fused not in ("auto", "on", "off"):
        raise ValueError(f"fused must be auto, on or off, got {fused!r}")
    if dice_reduction not in ("batch", "image"):
        raise ValueError(f"dice_reduction must be 'batch' or 'image', got {dice_reduction!r}")
    use_kernel = fused == "on" or (fused == "auto" and logits.is_cuda and _kernel_available())
    if use_kernel:
        return fused_dice_bce(logits, target, bce_weight=bce_weight, dice_weight=dice_weight,
                              dice_reduction=dice_reduction, pos_weight=pos_weight, pad=pad)
    return reference_dice_bce(logits, target, bce_weight=bce_weight, dice_weight=dice_weight,
                              dice_reduction=dice_reduction, pos_weight=pos_weight, pad=pad)


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

    def __call__(self, logits: torch.Tensor, target: torch.Tensor,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        return dice_bce_loss(logits, target, bce_weight=self.bce_weight, dice_weight=self.dice_weight,
                             dice_reduction=self.dice_reduction, pos_weight=self.pos_weight,
                             fused=self.fused, pad=pad)

    def parts(self, logits: torch.Tensor, target: torch.Tensor,
              pad: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's additive parts as float64 [N_PARTS]: [Σ BCE, pixels, then for "batch"
        Σp·t, Σp, Σt; for "image" Σ per-image Dice loss, images, 0]. Sums of these over batches
        and ranks give `from_parts` the loss of all those samples as one batch. Per-image sums
        are fp32 like the loss; they are added up in float64, so the partition into batches and
        ranks changes the result only by float64 rounding. With a pad, "pixels" counts the real
        pixels and every sum runs over them only."""
        x, t = logits.float().flatten(1), target.float().flatten(1)
        out = torch.zeros(self.N_PARTS, dtype=torch.float64, device=x.device)
        if x.shape[0] == 0:
            return out
        if pad is None:
            pw = None if self.pos_weight is None else x.new_tensor(self.pos_weight)
            bce = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none").sum(1)
            out[0], out[1] = bce.double().sum(), float(x.numel())
        else:
            bce, count = masked_bce_sums(x, t, pad, self.pos_weight)
            out[0], out[1] = bce.double().sum(), count.double().sum()
        inter, psum, tsum = dice_sums(x, t, pad)
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


# ---------------------------------------------------------------- K classes (softmax)
#
# The K-class loss is a separate family beside the binary one: nothing above changes, so the
# binary (K = 1, sigmoid) path stays bit-identical. `build_multiclass_loss_fn(cfg, 1)` *is*
# `build_loss_fn(cfg)`.
#
#   loss = ce_weight · CE + dice_weight · D
#
# CE is PyTorch's `F.cross_entropy(logits, target, weight=class_weights, ignore_index=...)`
# (mean over the non-ignored pixels, weighted by the weight of each pixel's class), except that
# a batch with no non-ignored pixel gives 0 instead of NaN. D is the soft Dice loss of
# p = softmax(logits) per class k, from per-(image, class) sums over the non-ignored pixels
#
#   I[n,k] = Σ p_k·[t = k],   P[n,k] = Σ p_k,   T[n,k] = Σ [t = k]
#
# with the binary loss's reductions and constants:
# * "batch": per class over the whole batch, smp `DiceLoss("multiclass")` semantics (smooth 0,
#   eps 1e-7, a class with no pixel in the batch contributes 0), then the class-weighted mean;
# * "image": 1 - (2I + 1e-5)/(P + T + 1e-5) per (image, class), MONAI semantics, the
#   class-weighted mean over classes, then the mean over images.
# Classes in D: 1..K-1 by default (include_background=False), the classes the binary Dice
# scores; include_background=True adds class 0. The class-weighted mean is Σ w_k·d_k / Σ w_k over
# the classes in D, so uniform weights change nothing.


def _class_weight_tensor(class_weights, classes: int, device) -> torch.Tensor:
    if class_weights is None:
        return torch.ones(classes, dtype=torch.float32, device=device)
    w = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
    if w.numel() != classes:
        raise ValueError(f"class_weights has {w.numel()} entries for {classes} classes")
    if w.device.type == "cpu" and (not torch.isfinite(w).all() or (w < 0).any()):
        raise ValueError(f"class_weights must be finite and ≥ 0, got {w.tolist()}")
    return w.to(device)      # checked before the copy: no device round trip per call


def _check_multiclass_options(classes: int, dice_reduction: str, include_background: bool,
                              class_weights) -> None:
    if classes < 2:
        raise ValueError(f"the softmax loss needs classes ≥ 2, got {classes} (one class is the "
                         "binary sigmoid loss, dice_bce_loss)")
    if dice_reduction not in ("batch", "image"):
        raise ValueError(f"dice_reduction must be 'batch' or 'image', got {dice_reduction!r}")
    w = _class_weight_tensor(class_weights, classes, "cpu")
    if (w[_dice_classes(classes, include_background)] == 0).all():
        raise ValueError("class_weights are 0 for every class in the Dice mean")


def multiclass_labels(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The label map as N×(spatial) integers: target N×H×W, or N×1×H×W (MONAI's layout), for
    logits N×K×H×W (any number of spatial dimensions)."""
    if logits.dim() < 3:
        raise ValueError(f"logits must be N×K×spatial, got {tuple(logits.shape)}")
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target.squeeze(1)
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} must be logits shape "
                         f"{tuple(logits.shape)} without the class dimension (N×H×W or N×1×H×W)")
    if target.dtype.is_floating_point or target.dtype.is_complex:
        raise TypeError(f"a K-class target holds integer labels, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    return target


def multiclass_sums(logits: torch.Tensor, target: torch.Tensor, *, class_weights=None,
                    ignore_index: int | None = None, pad: torch.Tensor | None = None):
    """Per-(image, class) fp32 I, P, T (N×K) and per-image fp32 Σ w_t·ce, Σ w_t (N), over the
    pixels whose label is not ignore_index, p = softmax(logits) over dim 1. Labels outside
    [0, K) that are not ignore_index are a ValueError on CPU, a device-side assert on CUDA.
    pad (N×1×spatial, 1 = real pixel): a padded pixel is an ignored pixel, whatever its label."""
    t = multiclass_labels(logits, target).long()
    n, k = logits.shape[:2]
    x = logits.float().flatten(2)                          # N×K×M
    t = t.flatten(1)                                       # N×M
    valid = (t >= 0) & (t < k)
    if ignore_index is not None:
        ignored = t == ignore_index
        valid &= ~ignored
    else:
        ignored = torch.zeros_like(valid)
    if pad is not None:
        real = pad_mask(pad, t, "labels") > 0.5
        valid &= real
        ignored |= ~real
    bad = ~valid & ~ignored
    message = f"target labels must be in [0, {k}) or ignore_index={ignore_index}"
    # Under compile an eager check would break the graph in two, and on CUDA it would
    # synchronise every step: a device-side assert there, as F.cross_entropy does.
    if torch.compiler.is_compiling() or t.is_cuda:
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        raise ValueError(f"{message}, got {sorted(t[bad].unique()[:8].tolist())}")
    w = _class_weight_tensor(class_weights, k, x.device)
    logp = torch.log_softmax(x, 1)
    p = logp.exp()
    tc = torch.where(valid, t, 0)
    onehot = F.one_hot(tc, k).transpose(1, 2).float() * valid.unsqueeze(1)   # N×K×M
    vf = valid.float()
    inter = (p * onehot).sum(2)
    psum = (p * vf.unsqueeze(1)).sum(2)
    tsum = onehot.sum(2)
    wt = w[tc] * vf                                         # N×M, 0 where ignored
    ce = -(logp.gather(1, tc.unsqueeze(1)).squeeze(1)) * wt
    return inter, psum, tsum, ce.sum(1), wt.sum(1)


def _dice_classes(classes: int, include_background: bool) -> slice:
    return slice(0 if include_background else 1, classes)


def multiclass_dice_from_sums(inter: torch.Tensor, psum: torch.Tensor, tsum: torch.Tensor,
                              reduction: str, class_weights=None,
                              include_background: bool = False) -> torch.Tensor:
    """The Dice term D of N×K sums (the definition above), shared by the reference and the
    fused kernel like `dice_from_sums` is for one class."""
    k = inter.shape[1]
    sel = _dice_classes(k, include_background)
    w = _class_weight_tensor(class_weights, k, inter.device).to(inter.dtype)[sel]
    inter, psum, tsum = inter[:, sel], psum[:, sel], tsum[:, sel]
    if reduction == "batch":
        inter, psum, tsum = inter.sum(0), psum.sum(0), tsum.sum(0)
        score = (2 * inter + BATCH_SMOOTH) / (psum + tsum + BATCH_SMOOTH).clamp_min(BATCH_EPS)
        d = (1 - score) * (tsum > 0).to(inter.dtype)
        return (d * w).sum() / w.sum()
    if reduction == "image":
        d = image_dice_losses(inter, psum, tsum)           # N×K'
        return ((d * w).sum(1) / w.sum()).mean()
    raise ValueError(f"dice_reduction must be 'batch' or 'image', got {reduction!r}")


def multiclass_ce_from_sums(ce_sum: torch.Tensor, w_sum: torch.Tensor) -> torch.Tensor:
    """Σ w_t·ce / Σ w_t over the batch; 0 when no pixel counts (PyTorch: NaN)."""
    c, w = ce_sum.sum(), w_sum.sum()
    return torch.where(w > 0, c / torch.where(w > 0, w, 1.0), c.new_zeros(()))


def _multiclass_loss(sums, ce_weight, dice_weight, dice_reduction, class_weights,
                     include_background) -> torch.Tensor:
    inter, psum, tsum, ce_sum, w_sum = sums
    loss = inter.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * multiclass_ce_from_sums(ce_sum, w_sum)
    if dice_weight:
        loss = loss + dice_weight * multiclass_dice_from_sums(
            inter, psum, tsum, dice_reduction, class_weights, include_background)
    return loss


def reference_dice_ce(logits: torch.Tensor, target: torch.Tensor, *, ce_weight: float = 1.0,
                      dice_weight: float = 1.0, dice_reduction: str = "batch",
                      class_weights=None, ignore_index: int | None = None,
                      include_background: bool = False, pad: torch.Tensor | None = None) -> torch.Tensor:
    """The K-class spec: fp32 cross-entropy + softmax soft Dice loss (definition above).
    logits N×K×H×W (K ≥ 2), target N×H×W or N×1×H×W integer labels."""
    multiclass_labels(logits, target)                      # shapes first: clearer errors
    _check_multiclass_options(logits.shape[1], dice_reduction, include_background, class_weights)
    sums = multiclass_sums(logits, target, class_weights=class_weights, ignore_index=ignore_index,
                           pad=pad)
    return _multiclass_loss(sums, ce_weight, dice_weight, dice_reduction, class_weights,
                            include_background)


def fused_dice_ce(logits: torch.Tensor, target: torch.Tensor, *, ce_weight: float = 1.0,
                  dice_weight: float = 1.0, dice_reduction: str = "batch", class_weights=None,
                  ignore_index: int | None = None, include_background: bool = False,
                  pad: torch.Tensor | None = None) -> torch.Tensor:
    """Same value and gradient as `reference_dice_ce`, from the fused Triton kernel's sums
    (kernels/dice_ce.py). A pad reaches the kernel as ignored labels: the reference's own
    definition (a padded pixel is an ignored one), so the kernel needs no second mask."""
    from .kernels.dice_ce import fused_multiclass_sums  # imports Triton: only when used
    t = multiclass_labels(logits, target)
    _check_multiclass_options(logits.shape[1], dice_reduction, include_background, class_weights)
    if pad is not None:
        t, ignore_index = padding_as_ignored(t, pad, ignore_index)
    sums = fused_multiclass_sums(logits, t, class_weights, ignore_index)
    return _multiclass_loss(sums, ce_weight, dice_weight, dice_reduction, class_weights,
                            include_background)


PAD_LABEL = -(2 ** 31) + 1   # the label padded pixels take when no ignore_index is set


def padding_as_ignored(labels: torch.Tensor, pad: torch.Tensor, ignore_index: int | None):
    """(labels with every padded pixel set to the ignored label, that label): ignore_index when
    set, else PAD_LABEL (outside any class range, so a real label stays checked as before)."""
    label = PAD_LABEL if ignore_index is None else int(ignore_index)
    real = (pad_mask(pad, labels, "labels") > 0.5).view(labels.shape)
    return torch.where(real, labels.long(), label), label


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, ce_weight: float = 1.0,
                 dice_weight: float = 1.0, dice_reduction: str = "batch", class_weights=None,
                 ignore_index: int | None = None, include_background: bool = False,
                 fused: str = "auto", pad: torch.Tensor | None = None) -> torch.Tensor:
    """The K-class entry point; `fused` as in `dice_bce_loss` (auto: the kernel on CUDA tensors
    when Triton is importable, the reference elsewhere); `pad` as in `dice_bce_loss`."""
    if fused not in ("auto", "on", "off"):
        raise ValueError(f"fused must be auto, on or off, got {fused!r}")
    kw = dict(ce_weight=ce_weight, dice_weight=dice_weight, dice_reduction=dice_reduction,
              class_weights=class_weights, ignore_index=ignore_index,
              include_background=include_background, pad=pad)
    if fused == "on" or (fused == "auto" and logits.is_cuda and _multiclass_kernel_available()):
        return fused_dice_ce(logits, target, **kw)
    return reference_dice_ce(logits, target, **kw)


def _multiclass_kernel_available() -> bool:
    try:
        import triton  # noqa: F401
        from .kernels import dice_ce  # noqa: F401
    except ImportError:
        return False
    return True


def as_labels(target: torch.Tensor) -> torch.Tensor:
    """The loaders' masks are float (binary {0, 1}, or class ids for K classes): the K-class loss
    object takes them as they come and casts them to integer labels (exact: small whole numbers)."""
    return target.long() if target.dtype.is_floating_point else target


@dataclass(frozen=True)
class MulticlassDiceCELoss:
    """`dice_ce_loss` with fixed options; like `DiceBCELoss`, also the exact loss of a split
    through `parts`/`from_parts` (n_parts = 2 + 3·classes)."""

    classes: int
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    dice_reduction: str = "batch"
    class_weights: tuple[float, ...] | None = None
    ignore_index: int | None = None
    include_background: bool = False
    fused: str = "auto"

    def __post_init__(self) -> None:
        if self.fused not in ("auto", "on", "off"):
            raise ValueError(f"fused must be auto, on or off, got {self.fused!r}")
        _check_multiclass_options(self.classes, self.dice_reduction, self.include_background,
                                  self.class_weights)
        if self.class_weights is not None:   # hashable and immune to later edits by the caller
            object.__setattr__(self, "class_weights", tuple(
                float(v) for v in torch.as_tensor(self.class_weights, dtype=torch.float64).flatten()))

    @property
    def n_parts(self) -> int:
        return 3 + 3 * self.classes

    def _options(self) -> dict:
        return dict(ce_weight=self.ce_weight, dice_weight=self.dice_weight,
                    dice_reduction=self.dice_reduction, class_weights=self.class_weights,
                    ignore_index=self.ignore_index, include_background=self.include_background)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        if logits.dim() < 3 or logits.shape[1] != self.classes:
            raise ValueError(f"logits {tuple(logits.shape)} must be N×{self.classes}×spatial")
        return dice_ce_loss(logits, as_labels(target), fused=self.fused, pad=pad, **self._options())

    def parts(self, logits: torch.Tensor, target: torch.Tensor,
              pad: torch.Tensor | None = None) -> torch.Tensor:
        """float64 [n_parts]: [Σ w_t·ce, Σ w_t, images, then for "batch" I_k, P_k, T_k summed
        over the images (3·K); for "image" the sum over images of the per-image Dice term, then
        zeros]. Sums over batches and ranks give `from_parts` the loss of them all as one batch."""
        out = torch.zeros(self.n_parts, dtype=torch.float64, device=logits.device)
        if logits.shape[0] == 0:
            return out
        inter, psum, tsum, ce_sum, w_sum = multiclass_sums(
            logits, as_labels(target), class_weights=self.class_weights, ignore_index=self.ignore_index,
            pad=pad)
        out[0], out[1], out[2] = ce_sum.double().sum(), w_sum.double().sum(), float(logits.shape[0])
        if self.dice_reduction == "batch":
            out[3:] = torch.cat([inter, psum, tsum], 1).double().sum(0)
        else:
            k = self.classes
            sel = _dice_classes(k, self.include_background)
            w = _class_weight_tensor(self.class_weights, k, inter.device)[sel]
            d = image_dice_losses(inter[:, sel], psum[:, sel], tsum[:, sel])
            out[3] = ((d * w).sum(1) / w.sum()).double().sum()
        return out

    def from_parts(self, parts) -> float:
        """The loss from summed `parts`; NaN (undefined) with no image."""
        p = torch.as_tensor(parts, dtype=torch.float64).cpu()
        if p[2] == 0:
            return float("nan")
        if self.dice_reduction == "batch":
            inter, psum, tsum = p[3:].view(3, self.classes)
            dice = multiclass_dice_from_sums(inter[None], psum[None], tsum[None], "batch",
                                             self.class_weights, self.include_background).item()
        else:
            dice = (p[3] / p[2]).item()
        ce = multiclass_ce_from_sums(p[0], p[1]).item()
        return self.ce_weight * ce + self.dice_weight * dice


def build_multiclass_loss_fn(cfg: LossConfig, classes: int, class_weights=None,
                             ignore_index: int | None = None,
                             include_background: bool = False):
    """The training loss for `classes` outputs. classes = 1: exactly `build_loss_fn(cfg)` (the
    binary sigmoid loss; it has no class weights or ignore_index). classes ≥ 2: the softmax
    Dice + cross-entropy, with --bce-weight as the cross-entropy weight, --loss bce|dice
    dropping the other term, and --dice-reduction / --fused-loss as for one class."""
    if classes == 1:
        if class_weights is not None or ignore_index is not None or include_background:
            raise ValueError("one class is the binary sigmoid loss: class_weights, ignore_index "
                             "and include_background need classes ≥ 2")
        return build_loss_fn(cfg)
    ce_w, dice_w = loss_weights(cfg.loss, cfg.bce_weight, cfg.dice_weight)
    return MulticlassDiceCELoss(classes=classes, ce_weight=ce_w, dice_weight=dice_w,
                                dice_reduction=cfg.dice_reduction, class_weights=class_weights,
                                ignore_index=ignore_index, include_background=include_background,
                                fused=cfg.fused_loss)
