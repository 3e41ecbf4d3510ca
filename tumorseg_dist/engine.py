"""The engine wraps model + optimizer + precision so the loop never branches on them.

Precision (AMP dtype, GradScaler), memory format (channels_last) and torch.compile are decided
here, once, and written back into the run's config. The loop only calls `train_step`,
`eval_logits`, `state_dict`/`load_state_dict`, `lr` and `end_epoch`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import Config
from .dist import DistInfo

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(choice: str, device: torch.device) -> str:
    """auto -> bf16 on GPUs that have it, fp16 on older GPUs, off on CPU."""
    if choice == "auto":
        if device.type != "cuda":
            return "off"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (the GradScaler is CUDA-only here); "
                         "use --amp bf16 or --amp off on CPU")
    return choice


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        span = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return 1.0


class Schedule:
    """Per-step warm-up/cosine, or per-epoch ReduceLROnPlateau on the monitored metric."""

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
        self.cfg, self.opt, self.total = cfg, optimizer, total_steps
        self.peak = cfg.optim.lr
        self.step_count = 0
        self.plateau = None
        if cfg.optim.scheduler == "plateau":
            mode = "max" if cfg.train.monitor == "val_dice" else "min"
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=cfg.optim.plateau_factor, patience=cfg.optim.plateau_patience)
        self._apply()

    def _apply(self) -> None:
        o = self.cfg.optim
        if self.plateau is not None:
            if o.warmup_steps and self.step_count <= o.warmup_steps:
                for g in self.opt.param_groups:
                    g["lr"] = self.peak * lr_factor(self.step_count, o.warmup_steps, self.total, "none")
            return
        f = lr_factor(self.step_count, o.warmup_steps, self.total, o.scheduler)
        for g in self.opt.param_groups:
            g["lr"] = self.peak * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def end_epoch(self, monitored: float) -> None:
        if self.plateau is not None and math.isfinite(monitored):
            self.plateau.step(monitored)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count,
                "plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, sd: dict) -> None:
        self.step_count = sd["step_count"]
        if self.plateau is not None and sd.get("plateau"):
            self.plateau.load_state_dict(sd["plateau"])
        else:
            self._apply()


class DDPEngine:
    """Single process or torch DDP; AMP via autocast (+ GradScaler for fp16)."""

    name = "ddp"

    def __init__(self, cfg: Config, model: nn.Module, dist: DistInfo, loss_fn: LossFn, total_steps: int):
        self.cfg, self.dist, self.loss_fn = cfg, dist, loss_fn
        self.device = dist.device
        self.amp = resolve_amp(cfg.train.amp, self.device)
        self.amp_dtype = AMP_DTYPES.get(self.amp)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)  # unwrapped: eval/save
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.schedule = Schedule(cfg, self.optimizer, total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        net: nn.Module = self.model
        if dist.distributed:
            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = torch.compile(net) if cfg.train.compile else net
        self.eval_net = torch.compile(self.model) if cfg.train.compile else self.model

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def train_step(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Forward, fp32 loss, backward, optimizer and lr step. Returns the detached loss."""
        with self.autocast():
            logits = self.net(image)
        loss = self.loss_fn(logits.float(), mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return loss.detach()

    @torch.no_grad()
    def eval_logits(self, image: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.eval_net(image).float()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def end_epoch(self, monitored: float) -> None:
        self.schedule.end_epoch(monitored)

    def state_dict(self) -> dict:
        return {"engine": self.name, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.schedule.load_state_dict(sd["schedule"])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])

    def load_weights(self, model_state: dict) -> None:
        self.model.load_state_dict(model_state)


def build_engine(cfg: Config, model: nn.Module, dist: DistInfo, loss_fn: LossFn, total_steps: int):
    if cfg.engine.engine == "ddp":
        return DDPEngine(cfg, model, dist, loss_fn, total_steps)
    from .deepspeed_engine import DeepSpeedEngine
    return DeepSpeedEngine(cfg, model, dist, loss_fn, total_steps)
