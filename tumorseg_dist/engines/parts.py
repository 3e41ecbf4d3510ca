"""The pieces both engines share: optimizer and lr schedule, EMA, the non-finite step guard,
gradient norm, autocast, and the optimizer-state byte counter behind `memory_report`. (Precision itself is
decided in `tumorseg_dist/precision.py`.)

Kept apart from the engines so `ddp.py` and `deepspeed.py` import only downwards and neither
imports the other.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch
import torch.nn as nn

from ..config import Config, monitor_mode
from ..dist import DistInfo
from ..precision import Precision

LossFn = Callable[..., torch.Tensor]   # (logits, mask) or, with a pad mask, (logits, mask, pad)
# `train_step(..., mark=f)` calls f(phase) as each phase of the step ends (benchmarks time them).
Mark = Callable[[str], None]
PHASES = ("forward", "loss", "backward", "all_reduce", "optimizer")


def mark_phase(mark: Mark | None, phase: str) -> None:
    """mark(phase) when a timed step was asked for (see Mark)."""
    if mark is not None:
        mark(phase)


class EngineBase:
    """What both engines hold: the config, the ranks, the loss and the run's precision."""

    def __init__(self, cfg: Config, dist: DistInfo, loss_fn: LossFn, precision: Precision):
        self.cfg, self.dist, self.loss_fn = cfg, dist, loss_fn
        self.device = dist.device
        self.precision = precision


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


def build_optimizer(cfg: Config, params, fused: bool = False) -> torch.optim.Optimizer:
    """`fused=True` uses PyTorch's fused kernels (CPU and CUDA), which can skip a step on the
    device from a `found_inf` tensor, without a host sync (see `Health.step`)."""
    o = cfg.optim
    kw = {"fused": True} if fused else {}
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **kw)
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **kw)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=True, **kw)


def optimizer_steps(total_batches: int, grad_accum: int) -> int:
    """Optimizer steps for a run of `total_batches` micro-batches (the schedule's length)."""
    return max(1, math.ceil(total_batches / max(1, grad_accum)))


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        span = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return 1.0


class Schedule:
    """Per-step warm-up/cosine, or per-epoch ReduceLROnPlateau on the monitored metric.

    Stepped once per optimizer step by both engines (DeepSpeed calls it as its client
    lr_scheduler), so DDP and DeepSpeed follow the same learning-rate curve."""

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
        self.cfg, self.opt, self.total = cfg, optimizer, total_steps
        self.peak = cfg.optim.lr
        self.step_count = 0
        self.plateau = None
        if cfg.optim.scheduler == "plateau":
            mode = monitor_mode(cfg.train.monitor)   # val_dice/NAME is maximised too
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

    def step(self, **_: object) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.opt.param_groups]

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


class EMA:
    """Exponential moving average of the weights (fp32 copy), updated after each optimizer step
    with foreach ops on the device (no host sync). Floating buffers (BatchNorm running stats) are
    averaged too; integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.module.parameters())
        src_p = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            if e.is_floating_point():
                e.lerp_(b.float(), 1.0 - self.decay)
            else:
                e.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)


class Health:
    """The non-finite step guard of both engines: skips an optimizer step whose gradient norm is
    inf/NaN (`step`) or learns of a skip the optimizer made itself (`count_own_skips`), and
    counts consecutive skipped steps.

    Device-side counters updated with tensor ops (no sync); `check()` reads them at log
    intervals and epoch ends, where the loop syncs anyway."""

    def __init__(self, max_bad: int, device: torch.device):
        self.max_bad = max_bad
        self.run = torch.zeros((), dtype=torch.int64, device=device)     # current consecutive run
        self.worst = torch.zeros((), dtype=torch.int64, device=device)   # longest run since check
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # skipped since check
        self.total_skipped = 0
        self.own_skips_seen = 0  # the optimizer's own running count of skipped steps

    def step(self, optimizer: torch.optim.Optimizer, bad: torch.Tensor, fused: bool,
             step: Callable[[], object] | None = None, host_skip: bool = True) -> None:
        """`step()` (default `optimizer.step`) unless `bad` (a 0-dim bool tensor), then count it.

        With a fused optimizer the decision stays on the device (the `found_inf` mechanism
        GradScaler uses: update and step counter unchanged). Otherwise one host sync decides;
        with `host_skip=False` (a step that must run: DeepSpeed's also zeroes the gradients and
        advances its schedule) the bad step is only counted, and stops the run."""
        if fused:
            optimizer.grad_scale, optimizer.found_inf = None, bad.to(torch.float32)
            try:
                (step or optimizer.step)()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif not host_skip or not bool(bad):
            (step or optimizer.step)()
        self.update(bad)

    def count_own_skips(self, total: int) -> None:
        """An optimizer that skips overflow steps itself and keeps a running count (DeepSpeed's
        ZeRO and fp16 optimizers): call after each optimizer step; a count that grew is one
        skipped step."""
        self.update(total > self.own_skips_seen)
        self.own_skips_seen = total

    def update(self, bad: torch.Tensor | bool) -> None:
        bad_t = torch.as_tensor(bad, device=self.run.device).to(torch.int64)
        self.run.add_(bad_t).mul_(bad_t)
        torch.maximum(self.worst, self.run, out=self.worst)
        self.skipped.add_(bad_t)

    def check(self) -> int:
        """Raise NonFiniteLossError after --max-bad-steps consecutive skipped steps; else return
        how many steps were skipped since the last check."""
        worst, skipped = (int(v) for v in torch.stack([self.worst, self.skipped]).tolist())
        self.worst.copy_(self.run)
        self.skipped.zero_()
        self.total_skipped += skipped
        if worst >= self.max_bad:
            raise NonFiniteLossError(
                f"{worst} consecutive optimizer steps had a non-finite loss or gradient "
                f"(--max-bad-steps {self.max_bad}); the steps were skipped and training stopped. "
                f"Try a lower --lr, --clip-grad 1.0, a longer --warmup-steps, or "
                f"--amp bf16 instead of fp16.")
        return skipped

    def state_dict(self) -> dict:
        return {"run": int(self.run.item()), "total_skipped": self.total_skipped}

    def load_state_dict(self, sd: dict) -> None:
        self.run.fill_(int(sd.get("run", 0)))
        self.worst.copy_(self.run)
        self.total_skipped = int(sd.get("total_skipped", 0))


def grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """Total gradient norm (device tensor); clips in place to `clip` when clip > 0."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def allreduce_gradients(model: nn.Module, world_size: int) -> None:
    """Average the gradients over the ranks as one flat bucket: what DDP does during backward,
    done after it so a timed step can show the all-reduce as its own phase."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat.div_(world_size)
    for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(f)


def nonfinite_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """0-dim bool tensor: the total gradient norm is inf/NaN (after clipping in place to `clip`
    when clip > 0). Taken after the gradient all-reduce, so every rank decides the same."""
    return ~torch.isfinite(grad_norm([p for p in model.parameters() if p.grad is not None], clip))


def amp_autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast in `dtype` on the device, or nothing without AMP (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (moments etc.; scalars excluded)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
