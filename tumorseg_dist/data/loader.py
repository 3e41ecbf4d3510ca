"""The loader factory: `build_loader` picks `--loader torch|dali` and fills the `LoaderSpec`.

The interface the loop sees (`Batch`, `Loader`) is in `batch.py`; the implementations are
`torch_loader.py` and `dali.py`; both read the shards through `shards.py`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..dist import DistInfo
from ..precision import Precision, resolve_precision
from .batch import Loader, LoaderSpec, norm_stats
from .order import divisible_choices
from .shards import fold_split, read_manifest
from .torch_loader import TorchLoader


def resolve_norm(cfg, shard_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """--mean/--std if given (one value or one per channel), else the manifest's train stats."""
    c = cfg.data.in_channels
    if cfg.data.mean and cfg.data.std:
        mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
        if len(mean) == 1:
            mean, std = mean * c, std * c
        if len(mean) != c or len(std) != c:
            raise ValueError(f"--mean/--std need 1 or {c} values (one per --in-channels), got {mean} / {std}")
        return mean, std
    return norm_stats(read_manifest(shard_dir), c)


def build_loader(cfg, shard_dir: Path, split: str, dist: DistInfo, training: bool,
                 precision: Precision | None = None, workers: int | None = None) -> Loader:
    """The configured loader (`--loader torch|dali`) for one split of a packed dataset (under
    `--fold k`, train and val are the folds: `shards.fold_split`), delivering
    `precision`'s image dtype and memory format (the run's; omitted, resolved from cfg.train).
    The model's first op casts to that dtype anyway; delivering it halves the output copy.
    `workers`: the process's thread budget (threads.plan); omitted, cfg.data.num_workers."""
    precision = precision or resolve_precision(cfg.train, dist.device)
    from .augment import PRESETS, resolve
    if cfg.train.batch_size % dist.world_size:
        raise ValueError(f"--batch-size {cfg.train.batch_size} is the GLOBAL batch and must be divisible "
                         f"by the world size {dist.world_size}: "
                         f"{divisible_choices(cfg.train.batch_size, dist.world_size)}")
    mean, std = resolve_norm(cfg, shard_dir)
    spec = LoaderSpec(
        shard_dir=Path(shard_dir), split=fold_split(split, cfg.data.fold), training=training, size=cfg.data.size,
        in_channels=cfg.data.in_channels, batch_size=cfg.train.batch_size // dist.world_size,
        mean=mean, std=std, augment=resolve(cfg.augment) if training else PRESETS["none"],
        seed=cfg.train.seed, num_workers=cfg.data.num_workers if workers is None else workers,
        memory_format=precision.memory_format, image_dtype=precision.image_dtype,
        grad_accum=cfg.engine.grad_accum, geometry=cfg.data.geometry, crop_scale=cfg.data.crop_scale,
        crop_foreground=cfg.data.crop_foreground)
    if cfg.data.loader == "dali":
        from .dali import DaliLoader
        return DaliLoader(spec, dist)
    return TorchLoader(spec, dist)
