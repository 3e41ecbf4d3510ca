"""Run output on rank 0: console lines, a progress bar, metrics.jsonl and the two figures."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Iterable


class RunLog:
    """Everything rank 0 writes about a run; on other ranks every method is a no-op."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.dir, self.enabled = Path(run_dir), enabled
        self.metrics_path = self.dir / "metrics.jsonl"
        self.steps_path = self.dir / "steps.jsonl"  # per log interval, full precision

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def progress(self, iterable: Iterable, total: int, desc: str):
        if not self.enabled or not sys.stderr.isatty():
            return iterable
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    def records(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash: drop it and everything after
        return out

    def rewind(self, upto_epoch: int, last_record: dict | None) -> None:
        """On resume: keep records up to the checkpoint's epoch (re-adding its own record if the
        crash came between checkpoint and log), so metrics.jsonl stays continuous."""
        if not self.enabled:
            return
        kept = [r for r in self.records() if r.get("epoch", 0) <= upto_epoch]
        if last_record and not any(r.get("epoch") == last_record.get("epoch") for r in kept):
            kept.append(last_record)
        self._write(kept)

    def rewind_steps(self, upto_step: int) -> None:
        """On resume: drop step lines after the checkpoint's step (they will be trained again)."""
        if not self.enabled or not self.steps_path.is_file():
            return
        kept = []
        for line in self.steps_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                break
            if r.get("step", 0) <= upto_step:
                kept.append(line + "\n")
        tmp = self.steps_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.steps_path)

    def append_step(self, record: dict) -> None:
        """One steps.jsonl line: the values of a log-interval line, unrounded."""
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.steps_path, "a") as f:
                f.write(json.dumps(_finite(record)) + "\n")

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(_finite(record)) + "\n")

    def _write(self, records: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(_finite(r)) + "\n" for r in records))
        tmp.replace(self.metrics_path)

    def write_json(self, name: str, obj: dict) -> None:
        if self.enabled:
            (self.dir / name).write_text(json.dumps(_finite(obj), indent=2) + "\n")


def _finite(d: dict) -> dict:
    """JSON has no NaN: write null instead."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def fmt(v: float | None, spec: str = ".4f") -> str:
    """A metric for a log line: "n/a" when it is undefined (NaN, or null read back from JSON)."""
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def epoch_line(r: dict) -> str:
    return (f"epoch {r['epoch']:>3} step {r['step']:>6}  train_loss {fmt(r['train_loss'])}  "
            f"val_loss {fmt(r['val_loss'])}  val_dice {fmt(r['val_dice'])}  val_iou {fmt(r['val_iou'])}  "
            f"lr {r['lr']:.2e}  {r['images_per_s']:.1f} img/s  {r['seconds']:.1f}s")


def plot_curves(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not records:
        return
    ep = [r["epoch"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r.get("train_loss") for r in records], label="train")
    a.plot(ep, [r.get("val_loss") for r in records], label="val")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(ep, [r.get("val_dice") for r in records], label="val Dice")
    b.plot(ep, [r.get("val_iou") for r in records], label="val IoU")
    b.set_xlabel("epoch"), b.set_ylim(0, 1), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

