"""The engine interface, as a type: what the loop, train.py and the benchmarks may call.

Both `DDPEngine` and `DeepSpeedEngine` satisfy it (tests/test_engine.py compares every method's
signature with this one), so a third engine is written against this file, not against prose.
Anything an engine has beyond these members is its own business; callers must not use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from ..precision import Precision


@runtime_checkable
class Engine(Protocol):
    name: str               # "ddp" or "deepspeed": recorded in checkpoints
    device: torch.device    # where batches must be for train_step / eval_logits
    precision: Precision    # AMP, GradScaler, memory format, compile: what this engine runs

    def train(self) -> None:
        """Training mode (dropout, BatchNorm batch statistics)."""

    def eval(self) -> None:
        """Evaluation mode; every rank evaluates the same weights and buffers."""

    def train_step(self, image: torch.Tensor, mask: torch.Tensor,
                   mark: Callable[[str], None] | None = None,
                   pad: torch.Tensor | None = None) -> torch.Tensor:
        """One micro-batch: forward, fp32 loss, backward; an optimizer step every --grad-accum
        micro-batches. `pad` (Batch.pad, 1 = real pixel): padded pixels count in no loss term;
        None calls the loss as loss_fn(logits, mask), as before. Returns the detached loss
        without a host sync. With `mark`, the timed step of the benchmarks: mark(phase) as each of parts.PHASES ends (no other change to
        the step, except that DDP runs its all-reduce after backward rather than during it)."""

    def eval_logits(self, image: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the evaluation weights (the EMA when on), no gradient."""

    def lr(self) -> float:
        """The current learning rate of the first parameter group."""

    def end_epoch(self, monitored: float) -> None:
        """Per-epoch schedule step (ReduceLROnPlateau) on the monitored metric."""

    def check_health(self) -> int:
        """Skipped non-finite optimizer steps since the last check; raises NonFiniteLossError
        after --max-bad-steps in a row. Syncs with the host."""

    def state_dict(self) -> dict:
        """What this engine puts into a checkpoint next to the loop's metadata."""

    def save_checkpoint(self, path: Path, meta: dict) -> None:
        """Collective: every rank calls it at the same step."""

    def load_state_dict(self, sd: dict, ckpt_dir: Path | None = None) -> None:
        """Full resume from a checkpoint this engine wrote (see `can_resume`)."""

    def can_resume(self, sd: dict) -> str | None:
        """None if `sd` can be fully resumed here, else why not (then only `load_weights`)."""

    def load_weights(self, ckpt_or_state: dict) -> None:
        """Weights only, from either engine's checkpoint or a model state dict."""

    def describe(self) -> list[str]:
        """Lines for the run log: layout, optimizer, accumulation, notes."""

    def write_run_files(self, run_dir: Path) -> None:
        """Engine-specific files in the run directory (rank 0)."""

    def memory_report(self) -> dict:
        """Bytes this rank holds: param_bytes, optimizer_state_bytes, master_param_bytes."""
