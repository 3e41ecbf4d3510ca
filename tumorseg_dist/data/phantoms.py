"""Synthetic phantoms: the built-in data set. Deterministic from (seed, index), no files needed.

Each image is a textured background, an organ-like ellipse and 0-3 lesions of varied size and
contrast (about one image in five has none), so that a model has something real to learn and
the metrics have empty-target cases to handle.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

IMAGES_PER_GROUP = 4  # consecutive phantoms share a "patient" so group splitting is exercised


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    u, v = (x * c + y * s) / rx, (-x * s + y * c) / ry
    return u * u + v * v <= 1.0


def phantom(index: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 H×W, mask bool H×W) for one phantom."""
    rng = np.random.default_rng([seed, index])
    h = w = size
    img = gaussian_filter(rng.normal(0, 1, (h, w)), sigma=size / 64) * 18 + 40
    organ = _ellipse(h, w, h / 2 + rng.uniform(-0.05, 0.05) * h, w / 2 + rng.uniform(-0.05, 0.05) * w,
                     rng.uniform(0.3, 0.42) * h, rng.uniform(0.3, 0.42) * w, rng.uniform(0, np.pi))
    img = img + organ * rng.uniform(50, 80)
    img = img + gaussian_filter(rng.normal(0, 1, (h, w)), sigma=size / 128) * 10 * organ
    mask = np.zeros((h, w), bool)
    n_lesions = rng.choice([0, 1, 1, 2, 3], p=[0.2, 0.35, 0.15, 0.2, 0.1])
    inside = np.argwhere(organ)
    for _ in range(n_lesions):
        cy, cx = inside[rng.integers(len(inside))]
        r = rng.uniform(0.03, 0.12) * size
        lesion = _ellipse(h, w, cy, cx, r * rng.uniform(0.6, 1.0), r, rng.uniform(0, np.pi)) & organ
        mask |= lesion
        img = img + lesion * rng.uniform(40, 110) * rng.choice([-0.6, 1.0], p=[0.2, 0.8])
    img = gaussian_filter(img, sigma=0.6) + rng.normal(0, 4, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def phantom_group(index: int) -> str:
    return f"phantom-{index // IMAGES_PER_GROUP:05d}"
