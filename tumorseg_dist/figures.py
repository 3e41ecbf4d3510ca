"""Drawing segmentations: the one overlay drawer every figure uses.

`overlay_image` paints ground truth (green) and prediction (red) contours on an image;
`predict --overlay`, evaluate's cases.png and training's overlays.png (and its wandb copy) are
all drawn by it, so they look alike. `save_grid` lays such panels out in one figure;
`plot_curves` draws training's curves.png. Each drawer returns what it drew (captions, ticks),
which is what the tests check. Ground floor: imports nothing from the package (matplotlib only
when a figure is saved).
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import outputs

RED, GREEN = (255, 40, 40), (40, 255, 40)


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask, thickened inwards to `thickness` pixels."""
    from scipy import ndimage
    mask = mask.astype(bool)
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=thickness,
                                   border_value=0)
    return mask & ~inner


def overlay_image(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB H×W×3: the image in grey/colour with ground-truth (green) and prediction (red)
    contours; the line width grows with the image so it stays visible when shown small."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    rgb = (np.clip(img[:, :, :3], 0, 1) * 255).round().astype(np.uint8).copy()
    thick = max(1, round(max(rgb.shape[:2]) / 256))
    if gt is not None:
        rgb[contour(gt > 0, thick)] = GREEN
    rgb[contour(pred > 0, thick)] = RED
    return rgb


def save_grid(rows: list[list[tuple[np.ndarray, str]]], path: Path, title: str,
              panel: tuple[float, float] = (3.2, 3.6), fontsize: int = 8) -> None:
    """Panels (an RGB image and its caption) in rows, one PNG; a short row leaves blank cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = max((len(r) for r in rows), default=0)
    if cols == 0:
        return
    fig, axes = plt.subplots(len(rows), cols, figsize=(panel[0] * cols, panel[1] * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(row):
                image, caption = row[c]
                ax.imshow(image, interpolation="nearest")
                if caption:
                    ax.set_title(caption, fontsize=fontsize)
    fig.suptitle(title, fontsize=fontsize + 1)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=2.0)
    _save_atomic(fig, Path(path))


def wrap_name(name: str, width: int = 28) -> str:
    """A sample name on as many lines as it needs: every character kept, long keys broken at
    separators where they have them."""
    return "\n".join(textwrap.wrap(name, width, break_on_hyphens=True, break_long_words=True)) or name


@dataclass
class OverlayBatch:
    """The images a training overlay figure shows, chosen from a whole split (lesions first).

    images [B, C, S, S] normalised, masks [B, 1, S, S], probs [B, 1, S, S]; dice: each shown
    image's Dice at the threshold; without_lesion / split_images: of the split, how many images
    have an empty ground truth, of how many. K classes: masks hold class ids, probs are
    [B, K, S, S], dice is each image's mean over the foreground classes, names the classes."""
    images: torch.Tensor
    masks: torch.Tensor
    probs: torch.Tensor
    dice: list[float]
    without_lesion: int
    split_images: int
    names: tuple[str, ...] = ()


def plot_overlays(shown: OverlayBatch, path: Path, mean, std, threshold: float = 0.5,
                  split: str = "test", max_images: int = 8) -> list[str]:
    """Training's figure: `shown` un-normalised with the training mean/std, 4 per row, drawn by
    overlay_image, each titled with its Dice; the title says how many of the split's images have
    no lesion (those are shown only when too few have one). Returns the panel captions."""
    n = min(max_images, shown.images.shape[0])
    if n == 0:
        return []
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    panels = []
    for i in range(n):
        img = (shown.images[i].float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
        gt = shown.masks[i, 0].float().cpu().numpy() > 0.5
        caption = f"Dice {shown.dice[i]:.3f}" + ("" if gt.any() else " (no lesion)")
        if shown.names:   # K classes: the argmax filled by class, the truth outlined in white
            labels = shown.probs[i].float().cpu().argmax(0).numpy()
            truth = shown.masks[i, 0].float().cpu().round().numpy().astype(np.uint8)
            panels.append((label_overlay(img, labels, truth=truth), caption))
        else:
            pred = shown.probs[i, 0].float().cpu().numpy() > threshold
            panels.append((overlay_image(img, pred, gt), caption))
    cols = min(4, n)
    rows = [panels[r * cols:(r + 1) * cols] for r in range(math.ceil(n / cols))]
    how = "green: ground truth, red: prediction" if not shown.names else \
        "prediction filled by class (" + ", ".join(f"{c} {class_colour_name(i)}" for i, c in
                                                   enumerate(shown.names[1:], 1)) + "), truth outlined in white"
    title = (f"{how}; {shown.without_lesion} of the "
             f"{shown.split_images} {split} images have no lesion")
    save_grid(rows, path, title, panel=(3.0, 3.2), fontsize=11)
    return [c for _, c in panels]


@dataclass
class Curves:
    """What curves.png shows (returned by plot_curves)."""
    epochs: list[int]
    xticks: list[float]
    best_epoch: int | None
    lr: list[float]


def plot_curves(records: list[dict], path: Path, best_epoch: int | None = None,
                monitor: str = "val_dice") -> Curves | None:
    """Loss, validation Dice/IoU and the learning rate (its own panel, log scale: it spans
    decades) per epoch, integer epoch ticks, the best epoch (the checkpoint used for the test
    split) marked on each panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    if not records:
        return None
    ep = [int(r["epoch"]) for r in records]
    lr = [r.get("lr") for r in records]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    a.plot(ep, [r.get("train_loss") for r in records], marker=".", label="train")
    a.plot(ep, [r.get("val_loss") for r in records], marker=".", label="val")
    a.set_ylabel("loss")
    b.plot(ep, [r.get("val_dice") for r in records], marker=".", label="val Dice")
    b.plot(ep, [r.get("val_iou") for r in records], marker=".", label="val IoU")
    b.set_ylim(0, 1)
    c.plot(ep, lr, marker=".", color="tab:purple", label="learning rate")
    c.set_ylabel("learning rate")
    if all(v is not None and v > 0 for v in lr):
        c.set_yscale("log")
    best = best_epoch if best_epoch in ep else None
    for ax in (a, b, c):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1,
                       label=f"best epoch {best} ({monitor})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    xticks = [float(t) for t in a.get_xticks() if ep[0] - 0.5 <= t <= ep[-1] + 0.5]
    _save_atomic(fig, Path(path))
    return Curves(ep, xticks, best, lr)


# ---------------------------------------------------------------- K classes

# Class colours by id (background has none): distinct, and readable on grey ultrasound/MRI.
CLASS_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                 (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


CLASS_COLOUR_NAMES = ("red", "green", "yellow", "blue", "orange", "purple", "cyan", "magenta", "lime", "pink")


def class_colour(class_id: int) -> tuple[int, int, int]:
    return CLASS_COLOURS[(class_id - 1) % len(CLASS_COLOURS)]


def class_colour_name(class_id: int) -> str:
    return CLASS_COLOUR_NAMES[(class_id - 1) % len(CLASS_COLOUR_NAMES)]


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45,
                  truth: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB H×W×3: the image with each foreground class id filled in its colour (blended
    by `alpha`) and outlined; `truth` (a label map): its classes' outlines in white."""
    rgb = overlay_image(image, np.zeros(labels.shape, bool)).astype(np.float32)
    thick = max(1, round(max(rgb.shape[:2]) / 256))
    for cid in (int(v) for v in np.unique(labels) if v > 0):
        m = labels == cid
        col = np.array(class_colour(cid), np.float32)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * col
        rgb[contour(m, thick)] = col
    for cid in ([] if truth is None else (int(v) for v in np.unique(truth) if v > 0)):
        rgb[contour(truth == cid, thick)] = 255
    return rgb.round().astype(np.uint8)


def save_label_overlay(image: np.ndarray, labels: np.ndarray, names: list[str], path: Path,
                       title: str = "", kept: str = "nothing was written") -> list[str]:
    """The K-class overlay with a legend (one entry per foreground class: its colour, name and
    share of the image) as one PNG, written atomically (`kept`: outputs.atomic's). Returns the
    legend entries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    h, w = labels.shape
    entries = [f"{names[c]} ({(labels == c).sum() / labels.size:.1%})" for c in range(1, len(names))]
    fig, ax = plt.subplots(figsize=(max(3.0, 5.0 * w / max(h, w)) + 1.6, 5.0 * h / max(h, w) + 0.4))
    ax.imshow(label_overlay(image, labels))
    ax.set_axis_off()
    if title:
        ax.set_title(wrap_name(title, 40), fontsize=8)
    handles = [Patch(color=np.array(class_colour(c)) / 255, label=e) for c, e in enumerate(entries, 1)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    _save_atomic(fig, Path(path), kept)
    return entries


def plot_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str = "") -> np.ndarray:
    """The K×K pixel confusion matrix as a PNG: each row (a true class) normalised to 1 and
    coloured by that share, the pixel counts printed in the cells. Returns the row shares."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(matrix, dtype=np.float64)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.2, 1.1 * k + 1.6))
    im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    for r in range(k):
        for c in range(k):
            ax.text(c, r, f"{share[r, c]:.2f}\n{int(cm[r, c])}", ha="center", va="center", fontsize=7,
                    color="white" if share[r, c] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "pixels per true class (row share, count)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save_atomic(fig, Path(path))
    return share


def _save_atomic(fig, path: Path, kept: str = "nothing was written") -> None:
    import matplotlib.pyplot as plt
    try:
        with outputs.atomic(path, kept) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
