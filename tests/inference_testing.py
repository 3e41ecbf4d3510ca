"""Helpers for the evaluate/predict/export tests: real-format checkpoints without training."""
from __future__ import annotations

from pathlib import Path

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
