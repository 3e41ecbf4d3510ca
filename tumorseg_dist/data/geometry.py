"""Training geometry (`--geometry squash|letterbox|crop`, issue 15): where the source image lands
on the size × size output, as numbers both loaders use (torch in its workers, DALI's
`PlanSource` on the host), so image, mask and pad mask are placed the same way in both.

* squash: resized to size × size, aspect ratio lost (the default; every pixel real).
* letterbox: the long side resized to size, the aspect ratio kept, centred, the rest padding.
* crop: the short side resized to size (`--scale resize`) or the native scale kept
  (`--scale native`), then a size × size window: uniform over the valid positions, or, for a
  `--crop-foreground` fraction of the samples, centred on a random lesion pixel (nnU-Net's
  oversampling), clamped to the image. A side shorter than size is centred and padded.

A placement is the scaled size (Ly, Lx), rounded to whole pixels, and the window's origin
(oy, ox) on it, whole pixels too, so a native-scale crop or a letterbox offset moves pixels
without blurring them. Where the scaled size is smaller than the source, the loaders first
shrink to (Ly, Lx) with antialiasing (as they do for squash) and the rest is a translation.
Coordinates are half-pixel (pixel centres at +0.5, DALI's); `to_opencv` converts a matrix.
"""
from __future__ import annotations

import math

import numpy as np

GEOMETRIES = ("squash", "letterbox", "crop")


def _round(x: float) -> int:
    return math.floor(x + 0.5)   # half up, not numpy's half to even: DALI's floor(x + 0.5)


def scaled_size(h: int, w: int, size: int, geometry: str, scale: str = "resize") -> tuple[int, int]:
    """(Ly, Lx): the source's size on the output's scale, before the window is taken."""
    if geometry == "squash":
        return size, size
    if geometry == "crop" and scale == "native":
        return h, w
    s = size / (max(h, w) if geometry == "letterbox" else min(h, w))
    return max(1, _round(h * s)), max(1, _round(w * s))


def origin(length: int, size: int, u: float = 0.5, centre: float | None = None) -> int:
    """The window's first pixel on a side of `length`: centred (negative: padded) when the side
    is no longer than `size`, else at fraction `u` of the valid range, or centred on `centre`
    (a fraction of the side) and clamped to the image."""
    if length <= size:
        return _round((length - size) / 2)
    c = centre * length if centre is not None else u * (length - size) + size / 2
    return _round(min(max(c - size / 2, 0.0), float(length - size)))


def placement(src_hw: tuple[int, int], scaled_hw: tuple[int, int], origin_yx: tuple[int, int]) -> np.ndarray:
    """3×3 (half-pixel) source -> output matrix: scale `src_hw` to `scaled_hw`, then shift the
    window's origin to 0."""
    (h, w), (ly, lx), (oy, ox) = src_hw, scaled_hw, origin_yx
    return np.array([[lx / w, 0.0, -ox], [0.0, ly / h, -oy], [0.0, 0.0, 1.0]])


def augment_matrix(size: int, d: dict) -> np.ndarray:
    """3×3 (half-pixel) output -> output matrix of the flips (mirror about the centre), then zoom
    and rotation about the centre (the drawn angle counter-clockwise on screen, as OpenCV's),
    then the shift, from `draws.draws`."""
    flip = np.diag([-1.0 if d["hflip"] else 1.0, -1.0 if d["vflip"] else 1.0, 1.0])
    flip[0, 2] = size if d["hflip"] else 0.0
    flip[1, 2] = size if d["vflip"] else 0.0
    angle, zoom, tx, ty = d["affine"] or (0.0, 1.0, 0.0, 0.0)
    a = math.radians(angle)
    c = size / 2
    rot = np.array([[zoom * math.cos(a), zoom * math.sin(a), 0.0],
                    [-zoom * math.sin(a), zoom * math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    about = np.array([[1.0, 0, c], [0, 1.0, c], [0, 0, 1.0]]) @ rot @ np.array([[1.0, 0, -c], [0, 1.0, -c], [0, 0, 1.0]])
    about[0, 2] += tx * size
    about[1, 2] += ty * size
    return about @ flip


def to_opencv(m: np.ndarray) -> np.ndarray:
    """A half-pixel 2×3 (or 3×3) matrix as OpenCV's (pixel centres at integers)."""
    a, t = m[:2, :2], m[:2, 2]
    return np.hstack([a, (t + a @ [0.5, 0.5] - 0.5)[:, None]])


def place(h: int, w: int, size: int, geometry: str, scale: str = "resize", d: dict | None = None):
    """(shrink, matrix) for a letterbox or crop sample of source size h × w: `shrink` is the
    (Ly, Lx) to resize to first with antialiasing (None when no side shrinks), `matrix` the 3×3
    half-pixel map from that (shrunk or original) image to the output, the draws' flips and
    affine included (`d`: `draws.sample_draws`; None: no augmentation, a centred window)."""
    ly, lx = scaled_size(h, w, size, geometry, scale)
    crop = (d or {}).get("crop") if geometry == "crop" else None
    if crop is None:
        oy, ox = origin(ly, size), origin(lx, size)
    else:
        (uy, ux), centre = crop["u"], crop["centre"]
        oy = origin(ly, size, uy, None if centre is None else centre[0])
        ox = origin(lx, size, ux, None if centre is None else centre[1])
    shrink = (ly, lx) if ly < h or lx < w else None
    m = placement(shrink or (h, w), (ly, lx), (oy, ox))
    return shrink, (m if d is None else augment_matrix(size, d) @ m)
