"""Run output: console lines and progress bars for a person, the same lines with timestamps in a
log file, and (RunLog) metrics.jsonl / steps.jsonl. Rank 0 only: elsewhere every method is a no-op.

Lines go through the `logging` module (logger "tumorseg_dist"): information to stdout, warnings
to stderr, both to the log file. A progress bar appears only when stderr is a terminal, and while
one is shown, log lines are written above it (tqdm's logging_redirect_tqdm), never through it.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Iterable, Iterator

from . import outputs

LOGGER = logging.getLogger("tumorseg_dist")
FILE_FORMAT = logging.Formatter("%(asctime)s  %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


class _ConsoleHandler(logging.StreamHandler):
    """One console handler (logging_redirect_tqdm swaps exactly one) that sends information to
    stdout and warnings to stderr, whatever sys.stdout/sys.stderr are at the time of the line."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


class _LaterFile(logging.Handler):
    """A log file that may only be opened once its folder exists (a run refused early leaves no
    folder): lines before `open` are kept in memory and written first."""

    def __init__(self):
        super().__init__()
        self.setFormatter(FILE_FORMAT)
        self.pending: list[str] = []
        self.file = None

    def open(self, path: Path) -> None:
        if self.file is None:
            self.file = open(path, "a", encoding="utf-8")  # a resumed run adds to its log
            self.file.writelines(self.pending)
            self.file.flush()
            self.pending = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self.file is None:
                self.pending.append(line)
            else:
                self.file.write(line)
                self.file.flush()  # a killed run keeps every line it showed
        except Exception:  # noqa: BLE001 - logging must not end a run
            self.handleError(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


class Console:
    """What one command shows: `info`/`warning` lines, `progress` bars, and the log file
    (`open_file(path)` once its folder exists). Creating one replaces the previous one's handlers,
    so a process that runs several commands (tests) never writes to an old stream or file."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        for h in list(LOGGER.handlers):
            LOGGER.removeHandler(h)
            h.close()
        LOGGER.setLevel(logging.INFO)
        LOGGER.propagate = False  # the root logger (a library's basicConfig) must not print twice
        self._file = _LaterFile()
        if enabled:
            console = _ConsoleHandler()
            console.setFormatter(logging.Formatter("%(message)s"))
            LOGGER.addHandler(console)
            LOGGER.addHandler(self._file)
        else:
            LOGGER.addHandler(logging.NullHandler())

    def info(self, msg: str) -> None:
        if self.enabled:
            LOGGER.info(msg)

    def warning(self, msg: str) -> None:
        if self.enabled:
            LOGGER.warning(msg)

    def open_file(self, path: Path) -> None:
        """From now on (and for every line shown so far) also write to `path`, timestamped."""
        if self.enabled:
            self._file.open(Path(path))

    def close(self) -> None:
        self._file.close()

    def progress(self, iterable: Iterable, total: int | None, desc: str, unit: str = "it") -> Iterable:
        """`iterable`, with a bar on a terminal; unchanged (no bar characters anywhere) when this
        rank does not log or stderr is not a terminal (a log file, a batch job, a pipe)."""
        if not self.enabled or not sys.stderr.isatty():
            return iterable
        return _bar(iterable, total, desc, unit)


def _bar(iterable: Iterable, total: int | None, desc: str, unit: str) -> Iterator:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm(loggers=[LOGGER]), \
            tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                 file=sys.stderr) as bar:
        yield from bar


class RunLog(Console):
    """Everything rank 0 writes about a training run: its lines (and RUN/train.log, opened by
    `open_file()` once the run directory exists), metrics.jsonl and steps.jsonl."""

    def __init__(self, run_dir: Path, enabled: bool):
        super().__init__(enabled)
        self.dir = Path(run_dir)
        self.log_path = self.dir / "train.log"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.steps_path = self.dir / "steps.jsonl"  # per log interval, full precision

    def open_file(self, path: Path | None = None) -> None:
        super().open_file(self.log_path if path is None else path)

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
        outputs.write_text(self.steps_path, "".join(kept), f"the earlier {self.steps_path.name} is unchanged")

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
        outputs.write_text(self.metrics_path, "".join(json.dumps(_finite(r)) + "\n" for r in records),
                           f"the earlier {self.metrics_path.name} is unchanged")

    def write_json(self, name: str, obj: dict) -> None:
        if self.enabled:
            outputs.write_text(self.dir / name, json.dumps(_finite(obj), indent=2) + "\n")


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
