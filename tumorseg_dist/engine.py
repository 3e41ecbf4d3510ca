"""The engine wraps model + optimizer + precision so the loop never branches on them.

Precision (AMP dtype, GradScaler), memory format (channels_last) and torch.compile are decided
here, once, and written back into the run's config. Two engines share one interface:

* `DDPEngine` (`--engine ddp`): one process, or torch DDP; this module.
* `DeepSpeedEngine` (`--engine deepspeed`): `tumorseg_dist/deepspeed_engine.py`.

The loop only calls `train_step`, `eval_logits`, `train`/`eval`, `lr`, `end_epoch`,
`check_health`, `save_checkpoint` and `load_state_dict`/`load_weights`. Both engines implement
gradient accumulation (`--grad-accum`), clipping (`--clip-grad`), an EMA of the weights
(`--ema-decay`, used by `eval_logits` and checkpointed) and the non-finite-step guard
(`--max-bad-steps`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint
from .config import Config
from .dist import DistInfo

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


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


def build_optimizer(cfg: Config, params, fused: bool = False) -> torch.optim.Optimizer:
    """`fused=True` uses PyTorch's fused kernels (CPU and CUDA), which can skip a step on the
    device from a `found_inf` tensor, without a host sync (see `_step_skipping_nonfinite`)."""
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
    """Counts consecutive skipped (non-finite) optimizer steps.

    Device-side counters updated with tensor ops (no sync); `check()` reads them at log
    intervals and epoch ends, where the loop syncs anyway. Host-side skips (DeepSpeed reports
    its own overflow skips as Python ints) are folded in the same way."""

    def __init__(self, max_bad: int, device: torch.device):
        self.max_bad = max_bad
        self.run = torch.zeros((), dtype=torch.int64, device=device)     # current consecutive run
        self.worst = torch.zeros((), dtype=torch.int64, device=device)   # longest run since check
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # skipped since check
        self.total_skipped = 0

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
                f"The checkpoints in RUN/checkpoints/ are from before these steps and were not "
                f"overwritten. Try a lower --lr, --clip-grad 1.0, a longer --warmup-steps, or "
                f"--amp bf16 instead of fp16.")
        return skipped

    def state_dict(self) -> dict:
        return {"run": int(self.run.item()), "total_skipped": self.total_skipped}

    def load_state_dict(self, sd: dict) -> None:
        self.run.fill_(int(sd.get("run", 0)))
        self.worst.copy_(self.run)
        self.total_skipped = int(sd.get("total_skipped", 0))


def _step_skipping_nonfinite(optimizer: torch.optim.Optimizer, bad: torch.Tensor, fused: bool) -> None:
    """optimizer.step() unless `bad` (a 0-dim bool tensor) is set. With a fused optimizer the
    decision stays on the device (the same `found_inf` mechanism GradScaler uses: the update
    and the step counter are left unchanged); otherwise it costs one host sync."""
    if fused:
        optimizer.grad_scale, optimizer.found_inf = None, bad.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(bad):
        optimizer.step()


def grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """Total gradient norm (device tensor); clips in place to `clip` when clip > 0."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def amp_autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast in `dtype` on the device, or nothing without AMP (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def weights_of(ckpt_or_state: dict, prefer_ema: bool = True) -> dict:
    """The model state dict in a checkpoint (its EMA weights when it has them and prefer_ema),
    or the argument itself if it is already a model state dict."""
    if "format_version" in ckpt_or_state or "model" in ckpt_or_state:
        if prefer_ema and ckpt_or_state.get("ema"):
            return ckpt_or_state["ema"]
        return ckpt_or_state["model"]
    return ckpt_or_state


class DDPEngine:
    """Single process or torch DDP; AMP via autocast (+ GradScaler for fp16)."""

    name = "ddp"

    def __init__(self, cfg: Config, model: nn.Module, dist: DistInfo, loss_fn: LossFn, total_steps: int):
        self.cfg, self.dist, self.loss_fn = cfg, dist, loss_fn
        e = cfg.engine
        self.device = dist.device
        self.amp = resolve_amp(cfg.train.amp, self.device)
        self.amp_dtype = AMP_DTYPES.get(self.amp)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)  # unwrapped: eval/save
        self.fused = self.device.type in ("cpu", "cuda")
        self.optimizer = build_optimizer(cfg, self.model.parameters(), fused=self.fused)
        self.accum, self.clip = e.grad_accum, e.clip_grad
        self.schedule = Schedule(cfg, self.optimizer, optimizer_steps(total_steps, self.accum))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.health = Health(e.max_bad_steps, self.device)
        self.ema = EMA(self.model, e.ema_decay) if e.ema_decay > 0 else None
        self.micro_step = 0  # micro-batches seen; an optimizer step every `accum` of them
        net: nn.Module = self.model
        self.ddp: DDP | None = None
        if dist.distributed:
            net = self.ddp = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = torch.compile(net) if cfg.train.compile else net
        eval_model = self.ema.module if self.ema is not None else self.model
        self.eval_net = torch.compile(eval_model) if cfg.train.compile else eval_model

    def autocast(self):
        return amp_autocast(self.device, self.amp_dtype)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def train_step(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Forward, fp32 loss, backward; every --grad-accum micro-batches: unscale, clip, skip if
        non-finite, optimizer, lr and EMA step. Returns the detached (unscaled) loss."""
        boundary = (self.micro_step + 1) % self.accum == 0
        no_sync = self.ddp is not None and not boundary
        with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast():
                logits = self.net(image)
            loss = self.loss_fn(logits.float(), mask)
            self.scaler.scale(loss / self.accum if self.accum > 1 else loss).backward()
        self.micro_step += 1
        if boundary:
            self._optimizer_step()
        return loss.detach()

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        # The norm is taken after DDP's all-reduce, so every rank makes the same decision.
        bad = ~torch.isfinite(grad_norm(params, self.clip))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips on inf/NaN itself
            self.scaler.update()
        else:
            _step_skipping_nonfinite(self.optimizer, bad, self.fused)
        self.health.update(bad)
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
                "scaler": self.scaler.state_dict(), "micro_step": self.micro_step,
                "health": self.health.state_dict()}

    def load_state_dict(self, sd: dict, ckpt_dir: Path | None = None) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.schedule.load_state_dict(sd["schedule"])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        self._load_ema(sd)
        self.micro_step = int(sd.get("micro_step", 0))
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
                f"torch.compile {'on' if self.cfg.train.compile else 'off'}"]

    def save_checkpoint(self, path: Path, meta: dict) -> None:
        """Called on every rank at the same step; rank 0 writes one atomic file."""
        if self.dist.is_main:
            checkpoint.atomic_save({**meta, **self.state_dict()}, path)

    def load_weights(self, ckpt_or_state: dict) -> None:
        """Weights only: from a checkpoint dict (either engine's) or a model state dict. The
        model gets the checkpoint's raw weights, the EMA (if on) its EMA weights."""
        self.model.load_state_dict(weights_of(ckpt_or_state, prefer_ema=False))
        if isinstance(ckpt_or_state, dict) and "model" in ckpt_or_state:
            self._load_ema(ckpt_or_state)
        elif self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())

    def memory_report(self) -> dict:
        """Bytes this rank holds for parameters, and for optimizer state (moments etc.)."""
        return {"param_bytes": _tensor_bytes(self.model.parameters()),
                "optimizer_state_bytes": _optimizer_state_bytes(self.optimizer),
                "master_param_bytes": 0}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v) and v.dim() > 0)


def build_engine(cfg: Config, model: nn.Module, dist: DistInfo, loss_fn: LossFn, total_steps: int):
    if cfg.engine.engine == "ddp":
        return DDPEngine(cfg, model, dist, loss_fn, total_steps)
    from .deepspeed_engine import DeepSpeedEngine
    return DeepSpeedEngine(cfg, model, dist, loss_fn, total_steps)


def build_engine_for_benchmark(cfg: Config, dist: DistInfo | None = None, total_steps: int = 1000):
    """An engine (cfg.engine.engine: ddp or deepspeed) with the configured model and loss, for
    synthetic tensors: `engine.train_step(image, mask)` with image [B/world, C, S, S] (in the
    engine's memory format, on `engine.device`) and mask {0,1} [B/world, 1, S, S].

    `dist` defaults to the torchrun environment (`tumorseg_dist.dist.init`)."""
    from . import dist as distmod
    from .models import build_model
    from .train import make_loss_fn
    if dist is None:
        dist = distmod.init(cfg.train.device)
    cfg.train.amp = resolve_amp(cfg.train.amp, dist.device)
    return build_engine(cfg, build_model(cfg.model, cfg.data.in_channels), dist, make_loss_fn(cfg), total_steps)
