"""Worker processes for pack: tasks in, results out in the same order, nothing shared.

Each worker has its own task pipe and result pipe, and task i goes to worker i mod N, so
results come back in input order without sorting, and memory stays bounded (`ahead` tasks
per worker in flight). Unlike multiprocessing.Pool, no lock is shared between processes: a
worker killed at any moment (Slurm's SIGTERM to every process, the OOM killer) cannot leave a
lock held that the main process then waits on forever; its pipe simply ends, and the main
process says what happened.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import threading
from collections import deque
from typing import Callable, Iterable, Iterator

from .signals import signals_blocked, worker_signals


class WorkerDied(RuntimeError):
    """A worker process ended without being asked to (not by a stop signal)."""


def _context():
    # fork starts workers in milliseconds, but forking a process that runs other threads (a
    # progress-bar monitor, a test runner's watchdog) can copy a held lock into the child and
    # hang it; then the fork server (about 1 s once per process) is the safe choice.
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if sys.platform != "win32" else "spawn")


def _serve(fn: Callable, init: Callable, init_args: tuple, tasks, results) -> None:
    worker_signals()
    init(*init_args)
    while True:
        try:
            task = tasks.recv()
        except EOFError:   # the main process is gone or done: nothing left to do
            return
        if task is None:
            return
        try:
            results.send(fn(task))
        except OSError:   # the main process ended (killed): its message, if any, is its own
            return


def ordered_map(fn: Callable, tasks: Iterable, workers: int, init: Callable, init_args: tuple = (),
                ahead: int = 2) -> Iterator:
    """fn(task) for each task in `workers` processes, yielded in task order.

    A worker killed by SIGINT/SIGTERM is a stop (KeyboardInterrupt, as in the main process,
    which got the same signal from the process group); any other death is WorkerDied."""
    ctx = _context()
    procs, to_worker, from_worker = [], [], []
    try:
        with signals_blocked():   # no worker ever runs the main process's signal handler
            for _ in range(workers):
                task_r, task_w = ctx.Pipe(duplex=False)
                res_r, res_w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_serve, args=(fn, init, init_args, task_r, res_w), daemon=True)
                p.start()
                task_r.close()   # the worker's ends: closed here, so a dead worker reads as EOF
                res_w.close()
                procs.append(p)
                to_worker.append(task_w)
                from_worker.append(res_r)
        sent: deque[int] = deque()   # worker of each task in flight, oldest first
        for i, task in enumerate(tasks):
            to_worker[i % workers].send(task)
            sent.append(i % workers)
            if len(sent) >= ahead * workers:
                yield _result(sent.popleft(), procs, from_worker)
        while sent:
            yield _result(sent.popleft(), procs, from_worker)
        for c in to_worker:
            c.send(None)
        for p in procs:
            p.join()
    finally:
        for c in to_worker + from_worker:
            c.close()
        for p in procs:
            if p.is_alive():
                p.kill()   # on an error or a stop: unfinished work is thrown away anyway
            p.join()


def _result(w: int, procs: list, from_worker: list):
    try:
        return from_worker[w].recv()
    except EOFError:
        procs[w].join()
        code = procs[w].exitcode
        if code in (-signal.SIGINT, -signal.SIGTERM):
            raise KeyboardInterrupt(f"worker stopped by signal {signal.Signals(-code).name}") from None
        how = f"was killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
        raise WorkerDied(f"a pack worker process {how} (out of memory? try fewer --workers); "
                         f"nothing was written") from None
