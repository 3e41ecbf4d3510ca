"""Weights & Biases tracking (`--wandb auto|online|offline|disabled`), rank 0 only.

* `auto`: online when an API key is configured (WANDB_API_KEY, or an api.wandb.ai entry in
  ~/.netrc as `wandb login` writes it), offline otherwise. Deciding this reads no network.
* `offline`: the run is written to RUN/wandb/offline-run-*/ (upload later with `wandb sync`).
* `online`: if the W&B server cannot be reached within 30 s, the run falls back to offline.
* Runs are grouped and named by the run name; the wandb run id is kept in RUN/wandb/run_id, so
  a resumed (e.g. requeued) run continues the same W&B run.

Logged: the resolved config; per log interval the loss, learning rate and skipped non-finite
steps (the values the loop already synced for its log line: no extra syncs); per epoch the
metrics record (incl. images/s; an undefined metric, NaN, is left out of that point rather
than charted), peak GPU memory, and an overlay figure of validation images (those with a lesion first). Any
wandb error is reported once and turns tracking off; training goes on, and metrics.jsonl is
written whatever the mode.
"""
from __future__ import annotations

import math
import netrc
import os
import tempfile
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch

from .config import Config, to_dict

INIT_TIMEOUT_S = 30


def api_key_configured() -> bool:
    """True if wandb would find an API key without asking: env var or ~/.netrc (no network)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if api_key_configured() else "offline"
    return mode


def defined(values: dict) -> dict:
    """Drop undefined (NaN) metrics: W&B would chart a NaN point; a gap says "undefined"."""
    return {k: v for k, v in values.items() if not (isinstance(v, float) and not math.isfinite(v))}


class Tracker:
    """A wandb run that never raises: the first failure is reported and disables it."""

    def __init__(self, run, run_dir: Path, mode: str, info: Callable[[str], None],
                 mean=None, std=None, threshold: float = 0.5):
        self.run, self.run_dir, self.mode, self.info = run, Path(run_dir), mode, info
        self.mean, self.std, self.threshold = mean, std, threshold
        self.wants_images = run is not None and mean is not None

    def _safe(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.info(f"wandb: {what} failed ({type(e).__name__}: {e}); tracking is off for the rest "
                      f"of this run, training continues and metrics.jsonl is complete")
            self.run, self.wants_images = None, False

    def log_step(self, step: int, loss: float, lr: float, skipped: int = 0) -> None:
        data = {"train/loss": loss, "train/lr": lr}
        if skipped:
            data["train/skipped_nonfinite_steps"] = skipped
        self._safe("logging a step", lambda: self.run.log(data, step=step))

    def log_epoch(self, record: dict, shown=None) -> None:
        def do():
            import wandb
            data = defined({(k if k in ("epoch", "lr") else f"epoch/{k}"): v for k, v in record.items()
                            if isinstance(v, (int, float)) and k != "step"})
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                data["epoch/gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                torch.cuda.reset_peak_memory_stats()
            if shown is not None and self.wants_images:
                from .figures import plot_overlays
                media = self.run_dir / "wandb"
                media.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(suffix=".png", dir=media, delete=False) as f:
                    tmp = Path(f.name)
                try:
                    plot_overlays(shown, tmp, self.mean, self.std, self.threshold, split="val")
                    if tmp.stat().st_size:
                        data["val/overlays"] = wandb.Image(str(tmp), caption=f"epoch {record['epoch']}: "
                                                           "green ground truth, red prediction")
                    self.run.log(data, step=record["step"])
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                self.run.log(data, step=record["step"])
        self._safe("logging an epoch", do)

    def summary(self, values: dict) -> None:
        self._safe("writing the summary", lambda: self.run.summary.update(defined(values)))

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self.info(f"wandb: finishing the run failed ({type(e).__name__}: {e})")


def _init(wandb, mode: str, run_dir: Path, name: str, project: str, config: dict):
    wdir = run_dir / "wandb"
    wdir.mkdir(parents=True, exist_ok=True)
    id_file = wdir / "run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(project=project, name=name, group=name, dir=str(run_dir), config=config,
                     mode=mode, id=run_id, resume="allow" if run_id else None, reinit="create_new",
                     settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, silent=True,
                                             console="off", x_disable_stats=True))
    if run_id is None:
        id_file.write_text(run.id + "\n")
    return run


def start(cfg: Config, run_dir: Path, name: str, is_main: bool, info: Callable[[str], None]) -> Tracker | None:
    """A Tracker on rank 0 when --wandb is not `disabled`, else None. Never raises."""
    if not is_main or cfg.engine.wandb == "disabled":
        return None
    mode = resolve_mode(cfg.engine.wandb)
    run_dir = Path(run_dir)
    mean = getattr(cfg.data, "mean", None)
    std = getattr(cfg.data, "std", None)
    try:
        import wandb
    except Exception as e:  # noqa: BLE001
        info(f"wandb: cannot import it ({e}); tracking is off, metrics.jsonl is written as always")
        return None
    for attempt in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            run = _init(wandb, attempt, run_dir, name, cfg.engine.wandb_project, to_dict(cfg))
        except Exception as e:  # noqa: BLE001
            info(f"wandb: starting a {attempt} run failed ({type(e).__name__}: {e})"
                 + ("; falling back to offline" if attempt == "online" else "; tracking is off"))
            continue
        where = f"{run_dir / 'wandb'} (upload with `wandb sync`)" if attempt == "offline" else run.url
        info(f"wandb: {attempt} run {run.id} ({'auto -> ' if cfg.engine.wandb == 'auto' else ''}"
             f"{attempt}), {where}")
        return Tracker(run, run_dir, attempt, info, mean, std, cfg.train.threshold)
    return None
