"""One CPU thread budget per process: loader workers (or DALI's CPU threads) fit the cores this
process may use, torch's threads use those cores, and no thread spins while it waits.

Without it every piece sized itself to the whole machine: torch one OpenMP thread per core,
each loader worker or DALI thread a core too, two ranks on one node each thinking they own it,
and OpenMP's threads spin-waiting between parallel regions. Beside any other busy process (a
competing job, another rank, our own workers) the spinning threads burn the cores the work
needs: on a 2-core machine `make run` took 72 s alone and 22 minutes beside one competing job.

The cores: this process's CPU affinity (taskset, Slurm's cpuset, a container's cpuset), capped
by SLURM_CPUS_PER_TASK when Slurm gives fewer, divided among the ranks torchrun started on this
node (LOCAL_WORLD_SIZE: they share one affinity set). The loader keeps at most cores - 1 workers
(the main process keeps a core). torch's intra-op pool gets the process's cores: the workers
mostly wait for I/O or a free prefetch slot, and measured on 2 cores, one torch thread beside one
worker was 1.5x slower alone than two (benchmarks/RESULTS.md, "CPU thread budget"). What makes
sharing a core cheap is `OMP_WAIT_POLICY=PASSIVE`, which every command sets before torch is
imported (unless the environment already says otherwise): a thread that waits sleeps instead
of spinning. An OMP_NUM_THREADS in the environment caps torch's threads: it is a user's (or
torchrun's, which sets 1 when it starts several ranks) explicit choice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Budget:
    cores: int           # this process's share
    source: str          # where that number came from, for the log
    workers: int         # loader worker processes (DALI: CPU threads) to start
    asked_workers: int   # what --num-workers / --workers asked for
    torch_threads: int

    def describe(self) -> str:
        capped = (f" (asked {self.asked_workers}: capped so that the main process keeps a core)"
                  if self.workers < self.asked_workers else "")
        return (f"{self.cores} core(s) for this process ({self.source}): torch {self.torch_threads} "
                f"thread(s), {self.workers} loader worker(s){capped}")


def available_cores(env: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """(cores this process may use, how that was found)."""
    try:
        n, source = len(os.sched_getaffinity(0)), "CPU affinity"
    except AttributeError:  # not Linux
        n, source = os.cpu_count() or 1, "cpu_count"
    slurm = _positive(env.get("SLURM_CPUS_PER_TASK"))
    if slurm is not None and slurm < n:
        n, source = slurm, "SLURM_CPUS_PER_TASK"
    local = _positive(env.get("LOCAL_WORLD_SIZE")) or 1
    if local > 1:
        return max(1, n // local), f"{source}: {n} shared by {local} local ranks"
    return n, source


def plan(workers: int, *, min_workers: int = 0, env: Mapping[str, str] = os.environ) -> Budget:
    """The budget for `workers` asked loader workers; `min_workers` is 1 for DALI (its pipeline
    needs a CPU thread even when --num-workers is 0)."""
    cores, source = available_cores(env)
    kept = max(min_workers, min(workers, cores - 1))
    torch_threads = cores
    omp = _positive(env.get("OMP_NUM_THREADS"))
    if omp is not None and omp < torch_threads:
        torch_threads, source = omp, f"{source}; OMP_NUM_THREADS={omp} caps torch"
    return Budget(cores=cores, source=source, workers=kept, asked_workers=workers, torch_threads=torch_threads)


def prefer_passive_waits(env=os.environ) -> None:
    """OpenMP threads sleep while they wait instead of spinning: set before torch is imported
    (libgomp reads it once, when it loads); an explicit OMP_WAIT_POLICY is left alone."""
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def apply(budget: Budget) -> None:
    """Set torch's intra-op thread count (the loaders read `budget.workers` themselves)."""
    import torch
    torch.set_num_threads(budget.torch_threads)


def _positive(text: str | None) -> int | None:
    try:
        value = int(text) if text else None
    except ValueError:
        return None
    return value if value and value > 0 else None
