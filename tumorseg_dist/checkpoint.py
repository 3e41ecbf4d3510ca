"""Atomic checkpoints with the full training state; every load refuses code.

A checkpoint is a plain dict of tensors and primitives: model, optimizer, scheduler, scaler,
engine extras, progress (epoch, step, batch within the epoch), early-stopping state, RNG
states, the epoch's metrics record and the resolved config. Written to a temp file in the same
directory, fsynced, then renamed: a crash during the save leaves the previous file intact.

Trust (docs/engine.md, "Checkpoint safety"):
* loads are `weights_only=True`; `refuse_code()` forces that on every `torch.load` a library
  makes inside it (DeepSpeed asks for `weights_only=False`), with only the named globals allowed;
* `refuse_nonfinite()`: nothing non-finite is ever written (a NaN BatchNorm statistic would
  poison every later resume and evaluation);
* a full disk is one line naming the file and the space needed; no temp file stays behind.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .outputs import FULL_DISK, TEMP_GLOB, free_space, full_disk, temp_name

FORMAT_VERSION = 1
_TORCH_LOAD = torch.load  # the real one, also while refuse_code() has replaced torch.load


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, written or trusted; the message names the file."""


# ---------------------------------------------------------------- writing


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list: about what torch.save writes."""
    return sum(t.numel() * t.element_size() for _, t in named_tensors(obj))


def write_error(exc: BaseException, path: Path, needed: int, previous: Path | None = None) -> CheckpointError:
    """The one-line error for a failed write of `path` (`needed` bytes); `previous` is the
    checkpoint that the failed save would have replaced (default `path` itself)."""
    previous = Path(path if previous is None else previous)
    previous = (f"the previous checkpoint {previous} is intact" if previous.is_file()
                else f"no previous {previous.name} existed")
    full = full_disk(exc)
    if full is None:
        return CheckpointError(f"could not write checkpoint {path} ({type(exc).__name__}: {exc}); "
                               f"{previous}, no temp file was left")
    return CheckpointError(f"{FULL_DISK[full.errno]} writing checkpoint {path}: it needs about "
                           f"{_mb(needed)}{free_space(path.parent)} on "
                           f"{path.parent}; {previous}, no temp file was left. Free space (or point "
                           f"--out at a larger filesystem) and resume with --resume auto")


def atomic_save(obj: Any, path: Path, **save_kwargs) -> None:
    """torch.save to a temp file beside `path`, fsync, rename. On any failure the temp file is
    removed and `path` is untouched; a full disk raises a CheckpointError saying so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f, **save_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)  # before measuring the free space
        raise write_error(e, path, tensor_bytes(obj)) from e
    finally:
        tmp.unlink(missing_ok=True)


def save_checked(obj: Any, path: Path) -> str | None:
    """atomic_save unless `obj` holds a non-finite tensor. Returns the refusal or the write
    error instead of raising, for `raise_agreed` (every rank must stop together)."""
    refusal = nonfinite_message(path, nonfinite(named_tensors(obj)))
    if refusal:
        return refusal
    try:
        atomic_save(obj, path)
    except CheckpointError as e:
        return str(e)
    return None


def remove_stale_temps(ckpt_dir: Path) -> list[Path]:
    """Delete the temp files of writers that were killed (SIGKILL, node loss) under ckpt_dir.
    Called once at the start of training, before any writer of this run exists."""
    ckpt_dir = Path(ckpt_dir)
    removed = sorted(ckpt_dir.rglob(TEMP_GLOB)) if ckpt_dir.is_dir() else []
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


# ---------------------------------------------------------------- finiteness


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor in a nested dict/list/tuple."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating tensors holding a NaN or inf (one host sync for all of them)."""
    floats = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(floats):
        by_device.setdefault(t.device, []).append(i)
    bad = set()
    for idx in by_device.values():
        ok = torch.stack([torch.isfinite(floats[i][1]).all() for i in idx]).tolist()
        bad.update(i for i, good in zip(idx, ok) if not good)
    return [floats[i][0] for i in sorted(bad)]


def nonfinite_message(path: Path, bad: list[str]) -> str | None:
    """The refusal to write `path` holding the non-finite tensors `bad`, or None if there are none."""
    if not bad:
        return None
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    return (f"refusing to write checkpoint {path}: {len(bad)} tensor(s) hold NaN/inf ({shown}); "
            f"training stopped. {last_good(Path(path).parent)} Try a lower --lr, --clip-grad 1.0, "
            f"a longer --warmup-steps, or --amp bf16 instead of fp16.")


def last_good(ckpt_dir: Path) -> str:
    """What is on disk to resume from, read from the files themselves (so it stays true across
    resumes and whatever this process did): their epoch and step, or that there is none."""
    found = []
    for name in ("last.pt", "best.pt"):
        p = Path(ckpt_dir) / name
        if not p.is_file():
            continue
        try:  # memory-mapped: only the small metadata is read
            ck = load_file(p, "cpu", mmap=zipfile.is_zipfile(p))
            ts = ck["train_state"]
        except (CheckpointError, KeyError, TypeError):
            found.append(f"{p} (unreadable)")
            continue
        skipped = int((ck.get("health") or {}).get("run", 0))
        found.append(f"{p} (epoch {ts['epoch']}, step {ts['step']}"
                     + (f", written after {skipped} consecutive skipped steps" if skipped else "") + ")")
    if not found:
        return f"No checkpoint exists in {ckpt_dir}: nothing was saved before the values went bad."
    return "The last good checkpoints, unchanged: " + "; ".join(found) + "."


# ---------------------------------------------------------------- reading


def _load_error(path: Path, exc: BaseException) -> CheckpointError:
    if isinstance(exc, pickle.UnpicklingError):
        m = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+|"
                      r"Trying to [^\n.]+)", str(exc))
        why = m.group(1) if m else str(exc).strip().splitlines()[-1][:200]
        return CheckpointError(f"refusing to load {path}: it holds Python code or objects that are not "
                               f"tensors or plain data ({why}); a checkpoint of this tool never does, "
                               f"so it was not written by it or has been tampered with. Nothing from it "
                               f"was run; delete it or resume from another file")
    return CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); "
                           f"it may be truncated: delete it or resume from another file")


def load_file(path: Path, map_location: Any = "cpu", safe_globals: Iterable = (), mmap: bool = False):
    """torch.load with weights_only=True (plus `safe_globals`); any failure is a CheckpointError
    naming the file."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise _load_error(Path(path), e) from e


def check_files(paths: Iterable[Path], safe_globals: Iterable = ()) -> str | None:
    """The error of the first file that a weights-only load refuses, else None. Zip files are
    memory-mapped, so no tensor data is read: only the pickle is checked."""
    for p in paths:
        try:
            load_file(p, "cpu", safe_globals, mmap=zipfile.is_zipfile(p))
        except CheckpointError as e:
            return str(e)
    return None


@contextlib.contextmanager
def refuse_code(safe_globals: Iterable = ()):
    """Inside this block every torch.load (ours or a library's, e.g. DeepSpeed's checkpoint
    engine, which passes weights_only=False) runs with weights_only=True and only
    `safe_globals` added; a refused file raises CheckpointError naming it."""
    allowed = list(safe_globals)

    def guarded_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **_):
        return load_file(f, map_location, allowed, mmap=bool(mmap))

    saved = torch.load, torch.serialization.load
    torch.load = torch.serialization.load = guarded_load
    try:
        yield
    finally:
        torch.load, torch.serialization.load = saved


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    ckpt = load_file(path, map_location)
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        hint = (" (it is one of DeepSpeed's shard files; pass RUN/checkpoints/best.pt or last.pt)"
                if path.parent.parent.name == "deepspeed" else "")
        raise CheckpointError(f"{path} is not a tumorseg_dist checkpoint (no format_version){hint}")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {ckpt['format_version']}, newer than this "
                              f"tumorseg_dist understands ({FORMAT_VERSION}); upgrade the package")
    return ckpt


# ---------------------------------------------------------------- ranks agree


def agreed_error(message: str | None) -> str | None:
    """Collective: the first rank's error message (None where a rank has none), the same on every
    rank, so that all ranks stop together instead of one waiting forever in the next collective."""
    d = torch.distributed
    if not (d.is_available() and d.is_initialized()) or d.get_world_size() == 1:
        return message
    every: list = [None] * d.get_world_size()
    d.all_gather_object(every, message)
    return next((m for m in every if m), None)


def raise_agreed(message: str | None) -> None:
    """Collective: raise CheckpointError on every rank if any rank has an error."""
    message = agreed_error(message)
    if message:
        raise CheckpointError(message)


def weights_of(ckpt_or_state: dict, prefer_ema: bool = True) -> dict:
    """The model state dict in a checkpoint (its EMA weights when it has them and prefer_ema),
    or the argument itself if it is already a model state dict."""
    if "format_version" in ckpt_or_state or "model" in ckpt_or_state:
        if prefer_ema and ckpt_or_state.get("ema"):
            return ckpt_or_state["ema"]
        return ckpt_or_state["model"]
    return ckpt_or_state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
