"""Every per-sample random augmentation parameter, drawn on the host from the sample's GLOBAL
POSITION, for both loaders (torch in its workers, DALI in `PlanSource`).

A position's draws are a function of (seed, epoch, position) only: the same flips, affine,
intensities and noise whatever the world size, worker count, rank or loader that reads it, so a
run resumed on another number of ranks continues with the same augmented pixels, and
`--loader torch` and `--loader dali` get identical parameters for the same plan.
"""
from __future__ import annotations

import numpy as np

from .augment import AugmentParams


def position_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one global position's draws (tuple hashes of ints are not randomised per
    process, unlike str hashes, so every process and rank agrees)."""
    return hash((seed, epoch, position)) & 0x7FFFFFFF


def draws(p: AugmentParams, rng: np.random.Generator) -> dict:
    """One sample's random parameters, drawn in the documented order (docs/loader.md).

    hflip, vflip: bool; affine: None or (angle in degrees, counter-clockwise as OpenCV's,
    zoom, shift x, shift y as fractions of the side); gamma: None or the exponent; brightness,
    contrast: factors (1.0 = off); noise: the Gaussian noise's std in [0, 1] image units
    (0.0 = off), its field drawn by `noise_field` from the same generator afterwards."""
    def coin(prob: float) -> bool:
        return prob > 0 and rng.random() < prob

    d = {"hflip": coin(p.flip_p), "vflip": coin(p.flip_p), "affine": None}
    if (p.rotate_deg or p.scale or p.translate) and coin(p.affine_p):
        d["affine"] = (rng.uniform(-p.rotate_deg, p.rotate_deg), rng.uniform(1 - p.scale, 1 + p.scale),
                       rng.uniform(-p.translate, p.translate), rng.uniform(-p.translate, p.translate))
    d["gamma"] = rng.uniform(1 - p.gamma, 1 + p.gamma) if p.gamma and coin(p.gamma_p) else None
    d["brightness"] = rng.uniform(1 - p.brightness, 1 + p.brightness) if p.brightness and coin(p.brightness_p) else 1.0
    d["contrast"] = rng.uniform(1 - p.contrast, 1 + p.contrast) if p.contrast and coin(p.contrast_p) else 1.0
    d["noise"] = rng.uniform(0, p.noise) if p.noise and coin(p.noise_p) else 0.0
    return d


def noise_field(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """The standard-normal field (size × size × channels float32) of a sample whose `noise` is
    on, drawn right after `draws` from the same generator: both loaders add exactly this."""
    return rng.standard_normal((size, size, channels), dtype=np.float32)


def crop_draws(rng: np.random.Generator, foreground: float, mask) -> dict:
    """A crop window's draws (`geometry.place`): u, the window's position as a fraction of the
    valid range per axis (y, x), and, with probability `foreground`, centre: a random lesion
    pixel's centre as a fraction of the source's side (y, x). `mask()` gives the source mask
    (H × W, lesion > 0), read only for those samples; one without lesion keeps the uniform u."""
    u = (rng.random(), rng.random())
    centre = None
    if foreground > 0 and rng.random() < foreground:
        m = mask()
        ys, xs = np.nonzero(m)
        if len(ys):
            j = int(rng.integers(len(ys)))
            centre = ((ys[j] + 0.5) / m.shape[0], (xs[j] + 0.5) / m.shape[1])
    return {"u": u, "centre": centre}


def sample_draws(p: AugmentParams, rng: np.random.Generator, size: int, channels: int,
                 crop_foreground: float | None = None, mask=None) -> dict:
    """Everything one training sample draws, in this order: `draws`, the noise field (under
    "field", None when off), and with `crop_foreground` given (`--geometry crop`) the window
    (under "crop"; `mask` as in `crop_draws`). Both loaders call it with
    `np.random.default_rng(position_seed(...))`."""
    d = draws(p, rng)
    d["field"] = noise_field(rng, size, channels) if d["noise"] else None
    if crop_foreground is not None:
        d["crop"] = crop_draws(rng, crop_foreground, mask)
    return d
