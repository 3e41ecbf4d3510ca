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


def sample_draws(p: AugmentParams, seed: int, size: int, channels: int) -> dict:
    """`draws` from `seed` (a `position_seed`), with the noise field under "field" (None when
    off): what the torch loader's `_augment` draws from `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    d = draws(p, rng)
    d["field"] = noise_field(rng, size, channels) if d["noise"] else None
    return d
