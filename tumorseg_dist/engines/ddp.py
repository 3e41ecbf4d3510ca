"""`--engine ddp`: one process, or torch DistributedDataParallel; AMP via autocast (+ GradScaler
for fp16), a fused optimizer that skips non-finite steps on the device."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import checkpoint
from ..config import Config
from ..dist import DistInfo
from ..precision import Precision
from .parts import (EMA, EngineBase, Health, LossFn, Mark, Schedule, allreduce_gradients, amp_autocast, build_optimizer,
                    mark_phase, nonfinite_gradients, optimizer_state_bytes, optimizer_steps)


class DDPEngine(EngineBase):
    """Single process or torch DDP; AMP via autocast (+ GradScaler for fp16)."""

    name = "ddp"

    def __init__(self, cfg: Config, model: nn.Module, dist: DistInfo, loss_fn: LossFn, total_steps: int,
                 precision: Precision):
        super().__init__(cfg, dist, loss_fn, precision)
        e, p = cfg.engine, precision
        self.model = model.to(self.device, memory_format=p.memory_format)  # unwrapped: eval/save
        self.fused = self.device.type in ("cpu", "cuda")
        self.optimizer = build_optimizer(cfg, self.model.parameters(), fused=self.fused)
        self.accum, self.clip = e.grad_accum, e.clip_grad
        self.schedule = Schedule(cfg, self.optimizer, optimizer_steps(total_steps, self.accum))
        self.scaler = torch.amp.GradScaler("cuda", enabled=p.grad_scaler)
        self.health = Health(e.max_bad_steps, self.device)
        self.ema = EMA(self.model, e.ema_decay) if e.ema_decay > 0 else None
        self.micro_batches = 0  # seen so far; an optimizer step every `accum` of them
        net: nn.Module = self.model
        self.ddp: DDP | None = None
        if dist.distributed:
            net = self.ddp = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = torch.compile(net) if p.compile else net
        eval_model = self.ema.module if self.ema is not None else self.model
        self.eval_net = torch.compile(eval_model) if p.compile else eval_model

    def autocast(self):
        return amp_autocast(self.device, self.precision.compute_dtype)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def train_step(self, image: torch.Tensor, mask: torch.Tensor, mark: Mark | None = None,
                   pad: torch.Tensor | None = None) -> torch.Tensor:
        """Forward, fp32 loss, backward; every --grad-accum micro-batches: unscale, clip, skip if
        non-finite, optimizer, lr and EMA step. Returns the detached (unscaled) loss.

        `mark(phase)` (benchmarks): called as each of parts.PHASES ends. Under DDP the
        gradient all-reduce then runs after backward, as its own phase, instead of overlapped."""
        boundary = (self.micro_batches + 1) % self.accum == 0
        split_allreduce = mark is not None and self.ddp is not None
        no_sync = self.ddp is not None and (not boundary or split_allreduce)
        with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast():
                logits = self.net(image)
            mark_phase(mark, "forward")
            loss = self.loss_fn(logits.float(), mask, *(() if pad is None else (pad,)))
            mark_phase(mark, "loss")
            self.scaler.scale(loss / self.accum if self.accum > 1 else loss).backward()
            mark_phase(mark, "backward")
        if split_allreduce and boundary:
            allreduce_gradients(self.model, self.dist.world_size)
        mark_phase(mark, "all_reduce")
        self.micro_batches += 1
        if boundary:
            self._optimizer_step()
        mark_phase(mark, "optimizer")
        return loss.detach()

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        bad = nonfinite_gradients(self.model, self.clip)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips on inf/NaN itself
            self.scaler.update()
            self.health.update(bad)
        else:
            self.health.step(self.optimizer, bad, self.fused)
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update(self.model)

    @torch.no_grad()
    def eval_logits(self, image: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.eval_net(image).float()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def end_epoch(self, monitored: float) -> None:
        self.schedule.end_epoch(monitored)

    def check_health(self) -> int:
        """At log intervals: skipped steps since the last check; raises NonFiniteLossError."""
        return self.health.check()

    def state_dict(self) -> dict:
        return {"engine": self.name, "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "micro_batches": self.micro_batches,
                "health": self.health.state_dict()}

    def load_state_dict(self, sd: dict, ckpt_dir: Path | None = None) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.schedule.load_state_dict(sd["schedule"])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        self._load_ema(sd)
        # "micro_step": the same counter's name in checkpoints written before it was renamed.
        self.micro_batches = int(sd.get("micro_batches", sd.get("micro_step", 0)))
        if sd.get("health"):
            self.health.load_state_dict(sd["health"])

    def _load_ema(self, sd: dict) -> None:
        if self.ema is not None:
            # A checkpoint without an EMA (written with --ema-decay 0) starts it from the weights.
            self.ema.load_state_dict(sd.get("ema") or self.model.state_dict())

    def can_resume(self, sd: dict) -> str | None:
        """None if `sd` can be fully resumed by this engine, else why not (weights only)."""
        if sd.get("engine", "ddp") != self.name:
            return f"it was written by the {sd.get('engine')} engine"
        if "optimizer" not in sd:
            return "it holds no optimizer state"
        return None

    def write_run_files(self, run_dir: Path) -> None:
        """Engine-specific files in the run directory (DDP has none)."""

    def describe(self) -> list[str]:
        ddp = f"DDP over {self.dist.world_size} ranks" if self.ddp is not None else "one process"
        return [f"{ddp}, {self.cfg.optim.optimizer}{' (fused)' if self.fused else ''}, "
                f"accum {self.accum}, clip {self.clip or 'off'}, "
                f"EMA {self.ema.decay if self.ema is not None else 'off'}, "
                f"{self.precision.describe()}"]

    def save_checkpoint(self, path: Path, meta: dict) -> None:
        """Called on every rank at the same step; rank 0 writes one atomic file, unless a tensor
        is non-finite or the disk is full: then every rank raises the same CheckpointError.
        (The ranks hold the same weights, optimizer state and, broadcast from rank 0, buffers.)"""
        error = checkpoint.save_checked({**meta, **self.state_dict()}, path) if self.dist.is_main else None
        checkpoint.raise_agreed(error)

    def load_weights(self, ckpt_or_state: dict) -> None:
        """Weights only: from a checkpoint dict (either engine's) or a model state dict. The
        model gets the checkpoint's raw weights, the EMA (if on) its EMA weights."""
        self.model.load_state_dict(checkpoint.weights_of(ckpt_or_state, prefer_ema=False))
        if isinstance(ckpt_or_state, dict) and "model" in ckpt_or_state:
            self._load_ema(ckpt_or_state)
        elif self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())

    def memory_report(self) -> dict:
        """Bytes this rank holds for parameters, and for optimizer state (moments etc.)."""
        return {"param_bytes": checkpoint.tensor_bytes(list(self.model.parameters())),
                "optimizer_state_bytes": optimizer_state_bytes(self.optimizer),
                "master_param_bytes": 0}
