"""Helpers for the evaluate/predict/export tests: real-format checkpoints without training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tumorseg_dist.checkpoint import atomic_save
from tumorseg_dist.config import Config, ModelConfig
from tumorseg_dist.dist import DistInfo
from tumorseg_dist.engines import build_engine
from tumorseg_dist.loop import TrainState, checkpoint_state
from tumorseg_dist.models import build_model


def tiny_config(size: int = 64, in_channels: int = 1, arch: str = "unet", data: Path | None = None,
                mean: tuple[float, ...] = (0.3,), std: tuple[float, ...] = (0.2,)) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(arch=arch, encoder="resnet18", encoder_weights="none")
    cfg.data.size, cfg.data.in_channels, cfg.data.path = size, in_channels, data
    cfg.data.mean, cfg.data.std, cfg.data.num_workers = mean * in_channels, std * in_channels, 0
    cfg.train.device, cfg.train.amp, cfg.train.channels_last = "cpu", "off", False
    cfg.train.batch_size = 4
    return cfg


def make_checkpoint(path: Path, cfg: Config, seed: int = 0) -> Path:
    """A checkpoint exactly as training writes it (loop.checkpoint_state), with seeded random
    weights: the commands under test must not care whether the model is any good."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.in_channels)
    engine = build_engine(cfg, model, DistInfo(0, 0, 1, torch.device("cpu")), lambda a, b: a.sum(), 1)
    atomic_save(checkpoint_state(cfg, engine, TrainState()), path)
    return path


# ---------------------------------------------------------------- multi-channel and stacked TIFFs

TIFF_H, TIFF_W = 40, 56  # not square, so a transposed or mis-read plane shows in the shape
# (name, array shape, tifffile.imwrite keywords, what the one reader makes of it: the image's
# shape, or the start of the refusal). The keywords are explicit so the files do not depend on
# tifffile's default guesses, which are changing (see imageio's module docstring for the rule).
TIFF_CASES = [
    ("hw5-pages", (TIFF_H, TIFF_W, 5), {"photometric": "minisblack"}, f"is a stack of {TIFF_H} images"),
    ("hw5-samples", (TIFF_H, TIFF_W, 5), {"photometric": "minisblack", "planarconfig": "contig"},
     "has 5 samples per pixel"),
    ("4hw-planes", (4, TIFF_H, TIFF_W), {"photometric": "minisblack"}, "is a stack of 4 images"),
    ("4hw-rgba", (4, TIFF_H, TIFF_W), {"photometric": "rgb", "planarconfig": "separate"},
     (TIFF_H, TIFF_W, 4)),
    ("hw3", (TIFF_H, TIFF_W, 3), {"photometric": "rgb"}, (TIFF_H, TIFF_W, 3)),
    ("3hw", (3, TIFF_H, TIFF_W), {"photometric": "rgb", "planarconfig": "separate"}, (TIFF_H, TIFF_W, 3)),
    ("1hw", (1, TIFF_H, TIFF_W), {"photometric": "minisblack"}, (TIFF_H, TIFF_W)),
    ("hw1", (TIFF_H, TIFF_W, 1), {"photometric": "minisblack"}, (TIFF_H, TIFF_W)),
    ("2hw3", (2, TIFF_H, TIFF_W, 3), {"photometric": "rgb"}, "is a stack of 2 images"),
]
TIFF_GOOD = [c for c in TIFF_CASES if isinstance(c[3], tuple)]
TIFF_BAD = [c for c in TIFF_CASES if isinstance(c[3], str)]


def write_tiff(path: Path, shape: tuple[int, ...], kwargs: dict, seed: int = 0) -> np.ndarray:
    """A real TIFF of random uint8 pixels; returns the image as the reader should see it:
    channels-last, single planes squeezed (only meaningful for the readable cases)."""
    import tifffile
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    tifffile.imwrite(path, arr, **kwargs)
    if kwargs.get("planarconfig") == "separate":
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[0] == 1:
        arr = arr[0]
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def tiff_folder(root: Path, with_masks: bool = False) -> dict[str, np.ndarray]:
    """One TIFF per case in root (named after the case), with `X_mask.png` masks if asked;
    returns name -> the image the reader should return (readable cases only)."""
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    want = {}
    for i, (name, shape, kwargs, expect) in enumerate(TIFF_CASES):
        img = write_tiff(root / f"{name}.tif", shape, kwargs, seed=i)
        if isinstance(expect, tuple):
            want[name] = img
        if with_masks:
            m = np.zeros((TIFF_H, TIFF_W), np.uint8)
            m[5:15 + i, 10:30] = 255
            Image.fromarray(m).save(root / f"{name}_mask.png")
    return want
