"""Stop signals during a pack: Ctrl-C (SIGINT) and SIGTERM end it with one message, from the
main process, whenever they arrive.

* The main process turns the first SIGINT/SIGTERM into `KeyboardInterrupt`; repeats are
  ignored, so the clean-up they interrupt (pool, staging folder) always finishes.
* Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group) and die quietly
  on SIGTERM (how the pool stops them); they report bad inputs as values, never tracebacks.
* Both signals are blocked while the pool starts, so no worker or pool thread ever runs with
  the main process's handler: only the main thread receives them, and none is lost.
* Once the work is finished (`StopSignals.finish`), a late signal is recorded, not raised: the
  result and its message are already decided.
"""
from __future__ import annotations

import os
import select
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The main process's handler for the duration of one command (see `stop_on_signals`)."""

    def __init__(self) -> None:
        self.raised = False      # the first signal has been raised; later ones are ignored
        self.finished = False    # the outcome is decided; a signal now is only recorded
        self.late: int | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.finished or self.raised:
            self.late = self.late or signum
            return
        self.raised = True
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def finish(self) -> None:
        self.finished = True


_ACTIVE: list[StopSignals] = []


@contextmanager
def stop_on_signals(restore: bool = True) -> Iterator[StopSignals]:
    """Install the handler for the body (the outermost call only; nested calls share it).

    `restore=False` leaves it installed, finished, when the process is about to exit: a signal
    from then on can neither interrupt the exit nor kill the process with a complete output
    and no message."""
    if _ACTIVE or threading.current_thread() is not threading.main_thread():
        yield _ACTIVE[0] if _ACTIVE else StopSignals()
        return
    handler = StopSignals()
    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    _ACTIVE.append(handler)
    try:
        yield handler
    finally:
        handler.finish()   # first: a signal during the restore below is recorded, not raised
        _ACTIVE.clear()
        if restore:
            for s, h in old.items():
                signal.signal(s, h)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGINT/SIGTERM held back (not lost: delivered when the block ends). Threads and processes
    started inside inherit the block, so they never run the main process's handler."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_signals() -> None:
    """In a pool worker (started inside `signals_blocked`): the main process owns Ctrl-C and
    the message; the pool's SIGTERM ends the worker without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def hold(point: str) -> None:
    """Test hook (TUMORSEG_PACK_HOLD=POINT:FIFO): at POINT, wait until the FIFO's writer closes
    it, so a test can signal a pack at a known moment instead of racing it. The wait returns
    to Python every 0.1 s, so a signal is handled at once whichever thread the OS gave it to."""
    spec = os.environ.get("TUMORSEG_PACK_HOLD", "")
    name, _, fifo = spec.partition(":")
    if name != point or not fifo:
        return
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        writer_seen = False
        while True:
            if select.select([fd], [], [], 0.1)[0]:
                data = os.read(fd, 4096)
                writer_seen = writer_seen or bool(data)
                if not data and writer_seen:
                    return   # the test closed its end: go on
                if not data:
                    select.select([], [], [], 0.1)   # no writer yet (EOF before open): wait for it
    finally:
        os.close(fd)
