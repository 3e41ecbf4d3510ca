"""Drawing segmentations: the one overlay drawer every figure uses.

`overlay_image` paints ground truth (green) and prediction (red) contours on an image; the
prediction masks of `predict --overlay`, evaluate's cases.png and training's overlays.png (and
its wandb copy) are all drawn by it, so they look alike. Ground floor: numpy/scipy only here.
"""
from __future__ import annotations

import numpy as np

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
