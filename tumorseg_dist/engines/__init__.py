"""The engine wraps model + optimizer + precision so the loop never branches on them.

Precision (AMP dtype, GradScaler, memory format, torch.compile) is decided once, in
`tumorseg_dist/precision.py`, and handed to the engine as a `Precision`. Two engines share one
interface:

* `DDPEngine` (`--engine ddp`): one process, or torch DDP; `engines/ddp.py`.
* `DeepSpeedEngine` (`--engine deepspeed`): `engines/deepspeed.py` (imported only when chosen).
* `engines/parts.py`: what both share (Schedule, EMA, Health, optimizer, grad_norm).

The loop, train.py and the benchmarks call only the members of the `Engine` protocol
(`engines/protocol.py`). Both engines implement gradient accumulation (`--grad-accum`),
clipping (`--clip-grad`), an EMA of the weights (`--ema-decay`, used by `eval_logits` and
checkpointed) and the non-finite-step guard (`--max-bad-steps`).
"""
from __future__ import annotations

import torch.nn as nn

from ..config import Config
from ..dist import DistInfo
from ..precision import Precision, resolve_precision
from .ddp import DDPEngine
from .parts import LossFn, NonFiniteLossError
from .protocol import Engine

__all__ = ["DDPEngine", "Engine", "LossFn", "NonFiniteLossError", "build_engine",
           "build_engine_for_benchmark"]


def build_engine(cfg: Config, model: nn.Module, dist: DistInfo, loss_fn: LossFn, total_steps: int,
                 precision: Precision | None = None) -> Engine:
    """`precision`: the run's (train.run resolves it once); omitted, it is resolved from cfg.train
    here, for library callers and tests (the engines themselves never decide it)."""
    precision = precision or resolve_precision(cfg.train, dist.device)
    if cfg.engine.engine == "ddp":
        return DDPEngine(cfg, model, dist, loss_fn, total_steps, precision)
    from .deepspeed import DeepSpeedEngine
    return DeepSpeedEngine(cfg, model, dist, loss_fn, total_steps, precision)


def build_engine_for_benchmark(cfg: Config, dist: DistInfo | None = None, total_steps: int = 1000) -> Engine:
    """An engine (cfg.engine.engine: ddp or deepspeed) with the configured model and loss, for
    synthetic tensors: `engine.train_step(image, mask)` with image [B/world, C, S, S] (in the
    engine's memory format, on `engine.device`) and mask {0,1} [B/world, 1, S, S].

    `dist` defaults to the torchrun environment (`tumorseg_dist.dist.init`)."""
    from .. import dist as distmod
    from ..models import build_model
    from ..losses import build_loss_fn
    if dist is None:
        dist = distmod.init(cfg.train.device)
    precision = resolve_precision(cfg.train, dist.device)
    cfg.train.amp = precision.amp
    return build_engine(cfg, build_model(cfg.model, cfg.data.in_channels), dist, build_loss_fn(cfg.loss), total_steps,
                        precision)
