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

A pad mask (issue 15, `Batch.pad`: [B, 1, H, W], 1 = real pixel) keeps geometry padding out of
every count: a padded pixel is neither TP, FP, FN nor TN (K classes: in no confusion-matrix
cell), so a letterboxed image scores as its unpadded original. pad=None counts every pixel.
"""
from __future__ import annotations

import torch

from .dist import all_reduce_sum

N_COUNTS = 7  # TP, FP, FN, TN, Σdice_i, Σiou_i, n_images
UNDEFINED = float("nan")


def ratio(a: float, b: float) -> float:
    """a / b, or NaN (undefined) when b is 0."""
    return a / b if b > 0 else UNDEFINED


def confusion(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5,
              pad: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image [TP, FP, FN, TN] as float64 [B, 4] (threshold on the probability), over the
    real pixels of `pad` when given."""
    return mask_confusion(torch.sigmoid(logits.float()) > threshold, target > 0.5, pad)


def real_pixels(pad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The pad mask as bool [B, M], checked against `like` ([B, ...], one entry per pixel)."""
    if pad.shape[0] != like.shape[0] or pad.numel() != like.numel():
        raise ValueError(f"pad mask shape {tuple(pad.shape)} does not fit {tuple(like.shape)}: "
                         "it must be [B, 1, H, W], 1 = real pixel")
    return pad.reshape(pad.shape[0], -1) > 0.5


def mask_confusion(pred: torch.Tensor, target: torch.Tensor,
                   pad: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image [TP, FP, FN, TN] as float64 [B, 4] of boolean predictions and targets [B, ...]
    (evaluate's path: its probabilities are thresholded after the resize to the original size);
    with `pad`, padded pixels count nowhere."""
    pred, t = pred.flatten(1), target.flatten(1)
    if pad is not None:
        real = real_pixels(pad, pred)
        pred, t = pred & real, t & real
        tn = (~pred & ~t & real).sum(1)
    else:
        tn = (~pred & ~t).sum(1)
    tp = (pred & t).sum(1)
    fp = (pred & ~t).sum(1)
    fn = (~pred & t).sum(1)
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
               threshold: float = 0.5, extra: torch.Tensor | None = None,
               pad: torch.Tensor | None = None) -> None:
        """One batch; `pad` ([B, 1, H, W], 1 = real pixel) keeps padding out of the counts."""
        counts = confusion(logits, target, threshold, pad)[valid]
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


# ---------------------------------------------------------------- K classes
#
# The prediction is the argmax over the K logits. Per image, one bincount gives the K×K
# confusion matrix (rows: target class, columns: predicted class) over the pixels whose label
# is not ignore_index; the dataset's matrix is their sum. Per class k (one-vs-rest): TP = C[k,k],
# FP = column k minus TP, FN = row k minus TP; Dice, IoU, precision and recall are ratios of the
# summed counts (NaN when undefined), as for one class. "dice", "iou", "precision", "recall" are
# their means over the foreground classes (1..K-1) that are defined; the per-image scores are
# each image's mean over the foreground classes, a class empty in both target and prediction
# scoring 1 (the binary rule).


def class_confusion(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None,
                    pad: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image K×K confusion matrices, float64 [B, K, K] (rows target, columns prediction),
    of logits [B, K, H, W] and class-id targets [B, 1, H, W] or [B, H, W] (float or integer),
    over the real pixels of `pad` when given."""
    return label_confusion(logits.argmax(1), target, logits.shape[1], ignore_index, pad)


def label_confusion(pred: torch.Tensor, target: torch.Tensor, k: int, ignore_index: int | None = None,
                    pad: torch.Tensor | None = None) -> torch.Tensor:
    """`class_confusion` of predicted labels [B, H, W] (evaluate's path: the argmax after the
    probabilities were resized to the original size)."""
    b = pred.shape[0]
    pred = pred.reshape(b, -1).long()
    t = target.reshape(b, -1).long()
    keep = (t >= 0) & (t < k)
    if ignore_index is not None:
        keep &= t != ignore_index
    if pad is not None:
        keep &= real_pixels(pad, t)
    img = torch.arange(b, device=t.device)[:, None].expand_as(t)
    idx = (img * k + t) * k + pred
    return torch.bincount(idx[keep], minlength=b * k * k).view(b, k, k).double()


def class_counts(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(TP, FP, FN, TN) per class of confusion matrices [..., K, K]."""
    tp = cm.diagonal(dim1=-2, dim2=-1)
    fp = cm.sum(-2) - tp
    fn = cm.sum(-1) - tp
    tn = cm.sum((-2, -1))[..., None] - tp - fp - fn
    return tp, fp, fn, tn


def image_class_scores(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of each foreground class [B, K-1] from confusion matrices
    [B, K, K]; a class empty in both target and prediction scores 1 (per_image_scores)."""
    b, k = cm.shape[:2]
    tp, fp, fn, _ = class_counts(cm)
    dice, iou = per_image_scores(torch.stack([tp[:, 1:], fp[:, 1:], fn[:, 1:]], -1).flatten(0, 1))
    return dice.view(b, k - 1), iou.view(b, k - 1)


class ClassMetricAccumulator:
    """The K-class MetricAccumulator: [C (K·K), Σ image Dice, Σ image IoU, images] and `extra`
    sums in one float64 vector, one all-reduce."""

    def __init__(self, device: torch.device, classes: int, extra: int = 0, ignore_index: int | None = None):
        self.k, self.ignore_index = classes, ignore_index
        self.sums = torch.zeros(classes * classes + 3 + extra, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
               extra: torch.Tensor | None = None, pad: torch.Tensor | None = None) -> None:
        """One batch; `pad` ([B, 1, H, W], 1 = real pixel) keeps padding out of the matrices."""
        self.add(class_confusion(logits[valid], target[valid], self.ignore_index,
                                 None if pad is None else pad[valid]), extra)

    def add(self, cm: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        """Per-image confusion matrices [B, K, K] (and extra sums) into the totals."""
        k = self.k
        cm = cm.to(self.sums.device)
        dice, iou = image_class_scores(cm)
        n = cm.shape[0]
        self.sums[:k * k] += cm.sum(0).flatten()
        if n:
            self.sums[k * k] += dice.mean(1).sum()
            self.sums[k * k + 1] += iou.mean(1).sum()
        self.sums[k * k + 2] += n
        if extra is not None:
            self.sums[k * k + 3:] += extra.double()

    def reduce(self) -> tuple[list[float], list[float]]:
        s = all_reduce_sum(self.sums.clone()).tolist()
        n = self.k * self.k + 3
        return s[:n], s[n:]


def summarize_classes(s: list[float], names: list[str]) -> dict[str, float]:
    """Dataset-level K-class metrics from ClassMetricAccumulator's summed counts: per class
    `dice/NAME`, `iou/NAME`, `precision/NAME`, `recall/NAME` (foreground classes), their means
    over the defined ones as `dice`, ..., pixel accuracy, the per-image means, the matrix."""
    k = len(names)
    cm = torch.tensor(s[:k * k], dtype=torch.float64).view(k, k)
    tp, fp, fn, _ = (v.tolist() for v in class_counts(cm))
    out: dict[str, float] = {}
    per: dict[str, list[float]] = {"dice": [], "iou": [], "precision": [], "recall": []}
    for c in range(1, k):
        vals = {"dice": ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c]), "iou": ratio(tp[c], tp[c] + fp[c] + fn[c]),
                "precision": ratio(tp[c], tp[c] + fp[c]), "recall": ratio(tp[c], tp[c] + fn[c])}
        for m, v in vals.items():
            out[f"{m}/{names[c]}"] = v
            per[m].append(v)
    for m, vals in per.items():
        defined = [v for v in vals if v == v]
        out[m] = sum(defined) / len(defined) if defined else UNDEFINED
    dsum, isum, n = s[k * k:k * k + 3]
    out.update(accuracy=ratio(float(cm.trace()), float(cm.sum())), mean_image_dice=ratio(dsum, n),
               mean_image_iou=ratio(isum, n), samples=int(n))
    return out


def confusion_matrix(s: list[float], classes: int) -> list[list[int]]:
    """The summed K×K pixel confusion matrix (rows target, columns prediction) as integers."""
    return [[int(v) for v in s[r * classes:(r + 1) * classes]] for r in range(classes)]
