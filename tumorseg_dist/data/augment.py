"""Augmentation presets shared by both loaders (torch and DALI), so they mean the same thing.

Every augmentation has a probability (per sample) and a range; one set of random parameters is
drawn per sample and applied to image and mask alike (geometric ones), or to the image only
(intensity ones). The order is fixed in both loaders:

    horizontal flip, vertical flip -> affine (scale + rotate about the centre, then translate)
    -> gamma -> brightness -> contrast -> Gaussian noise -> normalisation

Intensity augmentations work on the image in [0, 1] units before normalisation. Gamma comes
first because it needs [0, 1] input (it clamps to it); after it nothing clamps, as in MONAI's
intensity transforms, so brightness, contrast and noise may take values a little outside [0, 1].
That is what lets the DALI loader fold brightness and contrast into the normalisation pass
(x*b*c + b*mean*(1-c), then (· - mean) / std: one per-sample affine map). Elastic
deformation is not offered: DALI can only express it with `fn.experimental.remap`, which is
GPU-only, and the CPU and GPU pipelines must be the same definition.
"""
from __future__ import annotations

import dataclasses

from ..config import AugmentConfig, ConfigError

# The augmentation fields are declared once, with their meaning, in config.AugmentConfig.
FIELDS = tuple(f.name for f in dataclasses.fields(AugmentConfig) if f.name != "augment")


class AugmentParams(dataclasses.make_dataclass("_AugmentFields", [(n, float, 0.0) for n in FIELDS],
                                               frozen=True)):
    """The numbers the loaders apply: a preset with the user's settings on top, every field
    AugmentConfig's (a float; 0 = off)."""

    @property
    def enabled(self) -> bool:
        return bool(self.flip_p > 0
                    or (self.affine_p > 0 and (self.rotate_deg > 0 or self.scale > 0 or self.translate > 0))
                    or (self.brightness_p > 0 and self.brightness > 0)
                    or (self.contrast_p > 0 and self.contrast > 0)
                    or (self.gamma_p > 0 and self.gamma > 0)
                    or (self.noise_p > 0 and self.noise > 0))


PRESETS: dict[str, AugmentParams] = {
    "none": AugmentParams(),
    "light": AugmentParams(flip_p=0.5),
    "standard": AugmentParams(flip_p=0.5, affine_p=1.0, rotate_deg=15, scale=0.1, translate=0.05,
                              brightness_p=1.0, brightness=0.1, contrast_p=1.0, contrast=0.1,
                              gamma_p=0.3, gamma=0.2, noise_p=0.1, noise=0.02),
    "strong": AugmentParams(flip_p=0.5, affine_p=1.0, rotate_deg=30, scale=0.2, translate=0.1,
                            brightness_p=1.0, brightness=0.2, contrast_p=1.0, contrast=0.2,
                            gamma_p=0.5, gamma=0.3, noise_p=0.3, noise=0.05),
}


def check(p: AugmentParams) -> AugmentParams:
    """Reject values that would not be a valid transform (the message names the flag)."""
    for name in ("flip_p", "affine_p", "brightness_p", "contrast_p", "gamma_p", "noise_p"):
        if not 0.0 <= getattr(p, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} is a probability and must be in [0, 1], "
                              f"got {getattr(p, name)}")
    for name in ("scale", "brightness", "contrast", "gamma"):
        if not 0.0 <= getattr(p, name) < 1.0:
            raise ConfigError(f"--{name} is a relative range and must be in [0, 1), got {getattr(p, name)}")
    if not 0.0 <= p.translate <= 0.5:
        raise ConfigError(f"--translate must be in [0, 0.5] (fraction of the side), got {p.translate}")
    if not 0.0 <= p.rotate_deg <= 180.0:
        raise ConfigError(f"--rotate-deg must be in [0, 180], got {p.rotate_deg}")
    if not 0.0 <= p.noise <= 1.0:
        raise ConfigError(f"--noise is a standard deviation in [0, 1] image units, got {p.noise}")
    return p


def resolve(cfg: AugmentConfig) -> AugmentParams:
    """The preset, with every field the user set taking precedence."""
    base = dataclasses.asdict(PRESETS[cfg.augment])
    over = {k: getattr(cfg, k) for k in FIELDS if getattr(cfg, k) is not None}
    return check(AugmentParams(**{**base, **over}))
