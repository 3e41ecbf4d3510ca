"""Segmentation metrics from confusion counts, exact across ranks.

Each rank accumulates per-image TP/FP/FN/TN and per-image Dice/IoU sums for the samples it
owns (padding excluded); one all-reduce of a float64 vector gives the dataset-level numbers.

Dataset-level Dice, IoU, precision, recall and accuracy are ratios of the summed counts. A ratio
whose denominator is 0 is undefined and reported as NaN (null in JSON, "n/a" in logs), as MONAI's
ConfusionMatrixMetric does: a model that predicts nothing has no precision, and a split with no
tumour and no prediction has no Dice. It is never 1.0, so it cannot be chosen as "best".
The per-image scores follow a rule instead: an image whose target and prediction are both empty
scores Dice = IoU = 1 (MONAI's DiceMetric/MeanIoU with ignore_empty=False); mean_image_dice and
mean_image_iou average those, and are undefined only for a split with no images.
"""
from __future__ import annotations

import torch

from .dist import all_reduce_sum

N_COUNTS = 7  # TP, FP, FN, TN, Σdice_i, Σiou_i, n_images
UNDEFINED = float("nan")


def ratio(a: float, b: float) -> float:
    """a / b, or NaN (undefined) when b is 0."""
    return a / b if b > 0 else UNDEFINED


def confusion(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image [TP, FP, FN, TN] as float64 [B, 4] (threshold on the probability)."""
    return mask_confusion(torch.sigmoid(logits.float()) > threshold, target > 0.5)


def mask_confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image [TP, FP, FN, TN] as float64 [B, 4] of boolean predictions and targets [B, ...]
    (evaluate's path: its probabilities are thresholded after the resize to the original size)."""
    pred, t = pred.flatten(1), target.flatten(1)
    tp = (pred & t).sum(1)
    fp = (pred & ~t).sum(1)
    fn = (~pred & t).sum(1)
    tn = (~pred & ~t).sum(1)
    return torch.stack([tp, fp, fn, tn], 1).double()


def per_image_scores(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU per image. The rule (not a ratio): an image whose target and prediction are
    both empty scores 1, a correct "no tumour here"."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    dice_den, iou_den = 2 * tp + fp + fn, tp + fp + fn
    dice = torch.where(dice_den > 0, 2 * tp / dice_den.clamp_min(1), torch.ones_like(tp))
    iou = torch.where(iou_den > 0, tp / iou_den.clamp_min(1), torch.ones_like(tp))
    return dice, iou


class MetricAccumulator:
    """Sums [TP, FP, FN, TN, Σdice_i, Σiou_i, n_images] and `extra` caller-defined sums (the
    validation loss's parts) in one float64 vector on the device: one all-reduce for both."""

    def __init__(self, device: torch.device, extra: int = 0):
        self.sums = torch.zeros(N_COUNTS + extra, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
               threshold: float = 0.5, extra: torch.Tensor | None = None) -> None:
        counts = confusion(logits, target, threshold)[valid]
        dice, iou = per_image_scores(counts)
        self.sums[:4] += counts.sum(0)
        self.sums[4] += dice.sum()
        self.sums[5] += iou.sum()
        self.sums[6] += valid.sum().double()
        if extra is not None:
            self.sums[N_COUNTS:] += extra.double()

    def reduce(self) -> tuple[list[float], list[float]]:
        """(the counts for `summarize`, the extra sums), summed over every rank."""
        s = all_reduce_sum(self.sums.clone()).tolist()
        return s[:N_COUNTS], s[N_COUNTS:]

    def compute(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in summarize(self.reduce()[0]).items()}


def summarize(s: list[float]) -> dict[str, float]:
    """Dataset-level metrics from the 7 summed counts; NaN where a ratio is undefined."""
    tp, fp, fn, tn, dsum, isum, n = s
    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn), "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
        "accuracy": ratio(tp + tn, tp + fp + fn + tn), "mean_image_dice": ratio(dsum, n),
        "mean_image_iou": ratio(isum, n), "samples": int(n),
    }
