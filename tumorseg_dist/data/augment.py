"""Augmentation presets shared by both loaders (torch and DALI), so they mean the same thing."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import AugmentConfig


@dataclass(frozen=True)
class AugmentParams:
    flip_p: float = 0.0        # each of horizontal and vertical flip
    rotate_deg: float = 0.0    # uniform in [-rotate_deg, rotate_deg]
    scale: float = 0.0         # zoom uniform in [1-scale, 1+scale]
    translate: float = 0.0     # shift uniform in [-translate, translate] × side
    brightness: float = 0.0    # multiply by uniform [1-b, 1+b]
    contrast: float = 0.0      # stretch around the mean by uniform [1-c, 1+c]

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in vars(self).values())


PRESETS: dict[str, AugmentParams] = {
    "none": AugmentParams(),
    "light": AugmentParams(flip_p=0.5),
    "standard": AugmentParams(flip_p=0.5, rotate_deg=15, scale=0.1, translate=0.05,
                              brightness=0.1, contrast=0.1),
    "strong": AugmentParams(flip_p=0.5, rotate_deg=30, scale=0.2, translate=0.1,
                            brightness=0.2, contrast=0.2),
}


def resolve(cfg: AugmentConfig) -> AugmentParams:
    """The preset, with every field the user set (>= 0) taking precedence."""
    base = PRESETS[cfg.augment]
    over = {k: getattr(cfg, k) for k in vars(base) if getattr(cfg, k) >= 0}
    return AugmentParams(**{**vars(base), **over})
