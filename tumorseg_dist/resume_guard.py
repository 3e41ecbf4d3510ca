"""What a resume starts from and what it may change.

`source` picks the checkpoint (and whether only its weights are taken); `check` compares the
requested config with the checkpoint's. A checkpoint carries `config` (the resolved config of the run that wrote it). Resuming with
other values for settings that decide what the run computes would mix two runs silently (the
optimizer state, for one, brings the old learning rate back), so those are one error listing
every difference; the settings in `config.MAY_CHANGE_ON_RESUME` are applied and logged.

The world size may change (DDP, and DeepSpeed ZeRO-1/2, whose optimizer partitions the engine
re-cuts: engines/deepspeed.py `_load_other_world`): `relayout` keeps the per-rank batch and the optimizer batch
(--batch-size x --grad-accum) of the checkpoint and recomputes the global micro-batch and the
accumulation for the new number of ranks, so the run continues the same global sample order
(data/order.py) at the same position with the same batch statistics (docs/cluster.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .models import model_name
from .config import (MAY_CHANGE_ON_RESUME, RESUME_MECHANICS, Config, ConfigError, apply_overrides,
                     flag_name)

NEW_RUN = "start a new run with --out NEW_DIR (or --resume never to restart this one)"
FINE_TUNE = "fine-tune from its weights with --out NEW_DIR --resume {path} --weights-only"


def saved_config(ckpt: dict, path: Path) -> Config | None:
    """The checkpoint's config as a Config (None if it has none); keys this version no longer
    knows are dropped, keys it added take their defaults."""
    table = ckpt.get("config")
    if not isinstance(table, dict):
        return None
    default = Config()
    known = {f.name: {g.name for g in dataclasses.fields(getattr(default, f.name))}
             for f in dataclasses.fields(Config)}
    table = {s: {k: v for k, v in vals.items() if k in known[s]}
             for s, vals in table.items() if s in known and isinstance(vals, dict)}
    return apply_overrides(Config(), table, f"{path} (its config)")


def _show(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return "none" if value is None else str(value)


# Compared as their product (the optimizer batch) when the checkpoint says its world size:
# `relayout` then sets them for this run's world size.
LAYOUT = frozenset({"train.batch_size", "engine.grad_accum"})


def optimizer_batch(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.engine.grad_accum


def differences(requested: Config, saved: Config, elastic: bool = False) -> tuple[list[str], list[str]]:
    """(frozen, allowed): one "--flag old -> new" per setting that differs. `elastic`: the
    batch layout is compared as the optimizer batch only (see LAYOUT)."""
    frozen, allowed = [], []
    same_batch = elastic and optimizer_batch(requested) == optimizer_batch(saved)
    for group in dataclasses.fields(Config):
        new_group, old_group = getattr(requested, group.name), getattr(saved, group.name)
        for f in dataclasses.fields(new_group):
            dotted = f"{group.name}.{f.name}"
            old, new = getattr(old_group, f.name), getattr(new_group, f.name)
            if dotted in RESUME_MECHANICS or old == new or (same_batch and dotted in LAYOUT):
                continue
            line = f"{flag_name(group.name, f.name)} {_show(old)} -> {_show(new)}"
            (allowed if dotted in MAY_CHANGE_ON_RESUME else frozen).append(line)
    return frozen, allowed


def model_identity(cfg: Config) -> str:
    m = cfg.model
    name = model_name(m.arch, m.encoder)
    return f"{name} with {cfg.data.in_channels} input channel{'s' if cfg.data.in_channels != 1 else ''}"


def check(requested: Config, ckpt: dict, path: Path, weights_only: bool) -> list[str]:
    """Raise ConfigError if `requested` cannot continue (or, weights only, load) the checkpoint
    at `path`; else return the log lines of the settings the resume changes."""
    saved = saved_config(ckpt, path)
    if saved is None:
        return []
    if model_identity(saved) != model_identity(requested):
        fix = (f"pass the checkpoint's --arch/--encoder/--in-channels to start from it, or start "
               f"from --encoder-weights instead of --resume" if weights_only
               else f"pass its --arch/--encoder/--in-channels to continue it, {NEW_RUN}")
        raise ConfigError(f"checkpoint {path} holds a {model_identity(saved)} model; this run asks "
                          f"for {model_identity(requested)}: {fix}")
    if weights_only:
        return []
    elastic = bool((ckpt.get("train_state") or {}).get("world_size"))
    frozen, allowed = differences(requested, saved, elastic)
    if frozen:
        recorded = path.parent.parent / "config.toml"
        hint = f" (--config {recorded} holds them)" if recorded.is_file() else ""
        raise ConfigError(f"{path}: these settings cannot change when resuming a run: "
                          f"{', '.join(frozen)}. Either resume with the checkpoint's values{hint}, "
                          f"{NEW_RUN}, or {FINE_TUNE.format(path=path)}")
    return [f"changed on resume: {line}" for line in allowed]


def _nearest(candidates: list[int], want: int) -> list[int]:
    return sorted(sorted(candidates, key=lambda w: (abs(w - want), w))[:2])


def relayout(cfg: Config, ckpt: dict, path: Path, world: int) -> list[str]:
    """Set cfg's --batch-size and --grad-accum for `world` ranks from the checkpoint's layout
    (its per-rank batch and optimizer batch kept); return the log lines of what changed. Raises
    ConfigError when that layout does not fit `world` ranks or the engine cannot move."""
    saved_world = int((ckpt.get("train_state") or {}).get("world_size") or 0)
    saved = saved_config(ckpt, path)
    if not saved_world or saved is None:
        return []   # written before the world size was recorded: the flags as given
    per_rank = saved.train.batch_size // saved_world
    total = optimizer_batch(saved)
    if world != saved_world:
        # The stage DeepSpeed ran (an expert --deepspeed-config may set it), not our flag's.
        stage = (ckpt.get("deepspeed") or {}).get("zero_stage", saved.engine.zero_stage)
        if saved.engine.engine == "deepspeed" and stage not in (1, 2):
            raise ConfigError(f"{path} was written by DeepSpeed ZeRO stage {stage} on {saved_world} ranks; "
                              f"only ZeRO-1/2 state is re-partitioned for another world size (this run has "
                              f"{world}). Resume on {saved_world} ranks, or {FINE_TUNE.format(path=path)}")
    if total % (per_rank * world):
        fits = [w for w in range(1, total // per_rank + 1) if total % (per_rank * w) == 0]
        raise ConfigError(f"{path}: the run trains optimizer batches of {total} samples (--batch-size "
                          f"{saved.train.batch_size} x --grad-accum {saved.engine.grad_accum} on {saved_world} "
                          f"ranks, {per_rank} per rank); on {world} ranks {total} does not split into per-rank "
                          f"batches of {per_rank}. Resume on {' or '.join(map(str, _nearest(fits, world)))} ranks "
                          f"(any of {', '.join(map(str, fits))}), or {NEW_RUN}")
    batch, accum = per_rank * world, total // (per_rank * world)
    old = (cfg.train.batch_size, cfg.engine.grad_accum)
    cfg.train.batch_size, cfg.engine.grad_accum = batch, accum
    if world == saved_world and old == (batch, accum):
        return []
    zero = (f"; DeepSpeed's ZeRO optimizer state re-partitioned from {saved_world} to {world} ranks"
            if world != saved_world and cfg.engine.engine == "deepspeed" else "")
    return [f"resumed on {world} ranks (written on {saved_world}): per-rank batch {per_rank} and optimizer "
            f"batch {total} kept; --batch-size {old[0]} -> {batch}, --grad-accum {old[1]} -> {accum}{zero}"]


@dataclass
class Source:
    path: Path
    ckpt: dict
    weights_only: bool


def source(cfg: Config, run_dir: Path, device) -> Source | None:
    """The checkpoint this run starts from, or None for a fresh start.

    `--resume PATH` into a run directory that already has its own last.pt continues that
    last.pt when it was started from PATH (a requeued or rerun job, or `--config
    RUN/config.toml`), so a restart never throws the run's progress away; a last.pt of
    another run is an error, not overwritten."""
    r = cfg.train.resume
    if r == "never":
        return None
    own = run_dir / "checkpoints" / "last.pt"
    if r == "auto":
        return Source(own, checkpoint.load(own, device), False) if own.is_file() else None
    wanted = Path(r).resolve()
    if own.is_file() and own.resolve() != wanted:
        mine = checkpoint.load(own, device)
        started = (saved_config(mine, own) or Config()).train.resume
        if started not in ("auto", "never") and Path(started).resolve() == wanted:
            return Source(own, mine, False)
        raise ConfigError(f"{run_dir} already holds another run ({own}); to start from {r}, pass "
                          f"a new --out DIR, or delete {run_dir / 'checkpoints'} to reuse the directory")
    return Source(wanted, checkpoint.load(wanted, device), cfg.train.weights_only)
