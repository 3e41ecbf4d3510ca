"""Drawing segmentations: the one overlay drawer every figure uses.

`overlay_image` paints ground truth (green) and prediction (red) contours on an image;
`predict --overlay`, evaluate's cases.png and training's overlays.png (and its wandb copy) are
all drawn by it, so they look alike. `save_grid` lays such panels out in one figure. Ground
floor: imports nothing from the package (matplotlib only when a figure is saved).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_overlays(images: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor, path: Path,
                  mean, std, threshold: float = 0.5, max_images: int = 8) -> None:
    """Training's figure of a batch: normalised [B, C, S, S] images (un-normalised here with the
    training mean/std), [B, 1, S, S] masks and probabilities, 4 per row, drawn by overlay_image."""
    n = min(max_images, images.shape[0])
    if n == 0:
        return
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    panels = []
    for i in range(n):
        img = (images[i].float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
        pred = probs[i, 0].float().cpu().numpy() > threshold
        panels.append((overlay_image(img, pred, masks[i, 0].float().cpu().numpy() > 0.5), ""))
    cols = min(4, n)
    rows = [panels[r * cols:(r + 1) * cols] for r in range(math.ceil(n / cols))]
    save_grid(rows, path, "green: ground truth, red: prediction", panel=(3.0, 3.0), fontsize=11)
