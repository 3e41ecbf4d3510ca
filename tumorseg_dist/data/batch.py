"""What every loader hands the loop, and the channel/normalisation rules both loaders share.

A loader yields `Batch`es already on the device, normalised, in the model's memory format.
Every rank gets the same number of batches per epoch (`len(loader)`); in evaluation, padding
samples that make the ranks even are marked `valid=False` so each real sample counts once.

`Batch.pad` (issue 15, `--geometry letterbox|crop`): which output pixels come from the source
image. None with `--geometry squash` (every pixel counts, exactly as before; the affine's
corners stay background there, as before): consumers then treat every pixel as real.
Otherwise (letterbox, crop; training and evaluation batches alike, even when a batch happens to
have no padding) a float32 tensor [B, 1, H, W] of {0.0, 1.0} on the batch's device, in the
batch's memory format (the same shape, dtype and layout as `mask`): 1 = a real (source) pixel,
0 = padding added by the geometry (the letterbox border, a crop window or an affine move past
the image edge). Padding pixels are excluded from the loss and from the metrics; the image
there holds the normalised value of 0, and the mask 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from .augment import AugmentParams


@dataclass
class Batch:
    image: torch.Tensor   # float [B, C, H, W] on the device, normalised
    mask: torch.Tensor    # float {0, 1} [B, 1, H, W] on the device
    valid: torch.Tensor   # bool [B]: False for rank-padding samples (never counted)
    keys: list[str]
    pad: torch.Tensor | None = None   # float {0, 1} [B, 1, H, W], 1 = real pixel; None = all real


class Loader(Protocol):
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class LoaderSpec:
    """What every loader implementation needs, resolved from config + manifest."""

    shard_dir: Path
    split: str
    training: bool
    size: int
    in_channels: int
    batch_size: int          # per rank
    mean: tuple[float, ...]  # per model channel, in [0, 1] units
    std: tuple[float, ...]
    augment: AugmentParams
    seed: int
    num_workers: int
    memory_format: torch.memory_format  # Precision.memory_format: the batches' layout
    image_dtype: torch.dtype = torch.float32   # what AMP computes in: bf16/fp16 halve the copy
    grad_accum: int = 1      # training epochs are whole optimizer steps (order.py)
    geometry: str = "squash"   # data/geometry.py: squash | letterbox | crop
    crop_scale: str = "resize"   # crop: resize (short side to size) | native
    crop_foreground: float = 0.33   # crop: fraction of training crops centred on a lesion pixel


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L") and DALI's GRAY output


def source_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """The channels to resize and augment in: alpha dropped, colour reduced to the model's one
    channel; grey stays one channel even when the model wants three (repeated afterwards)."""
    if t.shape[0] in (2, 4):
        t = t[:t.shape[0] - 1]
    return to_channels(t, 1) if channels == 1 else t


def to_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """[C,H,W] -> [channels,H,W]: grey repeated, colour to grey by BT.601 luma, alpha dropped."""
    if t.shape[0] == channels:
        return t
    if t.shape[0] in (2, 4):  # grey+alpha, RGBA: drop alpha
        t = t[:t.shape[0] - 1]
        if t.shape[0] == channels:
            return t
    if channels == 1:
        if t.shape[0] == 3:
            return torch.tensordot(torch.tensor(LUMA, dtype=t.dtype), t, dims=1)[None]
        return t.mean(0, keepdim=True)
    if t.shape[0] == 1:
        return t.expand(channels, -1, -1).contiguous()
    return t[:channels]


def norm_stats(manifest: dict, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Train-split mean/std from the manifest, mapped to the model's channel count."""
    mean, std = list(manifest.get("mean", [0.5])), list(manifest.get("std", [0.25]))
    if len(mean) != channels:
        mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
    return tuple(mean), tuple(max(s, 1e-6) for s in std)
