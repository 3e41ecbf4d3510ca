"""One CPU thread budget: torch threads + loader workers fit the cores this process may use
(affinity, Slurm's per-task CPUs, shared among the local ranks), and every command applies it."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import PY, TINY, run_cli
from tumorseg_dist import threads

CORES = len(os.sched_getaffinity(0))


def test_affinity_is_the_budget_and_the_main_process_keeps_a_core():
    b = threads.plan(8, env={})
    assert b.cores == CORES and b.source == "CPU affinity"
    assert b.workers == min(8, CORES - 1) and b.torch_threads == CORES
    assert threads.plan(0, env={}).workers == 0


def test_slurm_cpus_per_task_caps_and_local_ranks_share():
    b = threads.plan(4, env={"SLURM_CPUS_PER_TASK": "1"})
    assert (b.cores, b.workers, b.torch_threads) == (1, 0, 1) and b.source == "SLURM_CPUS_PER_TASK"
    assert "capped" in b.describe() and "asked 4" in b.describe()
    b = threads.plan(2, env={"SLURM_CPUS_PER_TASK": "64", "LOCAL_WORLD_SIZE": str(CORES)})
    assert b.cores == 1 and f"shared by {CORES} local ranks" in b.source   # 64 > affinity: affinity wins
    b = threads.plan(0, env={"LOCAL_WORLD_SIZE": str(4 * CORES)})
    assert b.cores == 1 and b.torch_threads == 1   # never below one core


def test_omp_num_threads_caps_torch_and_dali_keeps_one_thread():
    b = threads.plan(0, env={"OMP_NUM_THREADS": "1"})
    assert b.torch_threads == 1 and "OMP_NUM_THREADS=1" in b.source
    b = threads.plan(0, min_workers=1, env={"SLURM_CPUS_PER_TASK": "1"})
    assert (b.workers, b.torch_threads) == (1, 1)
    assert threads.plan(0, env={"OMP_NUM_THREADS": "junk"}).torch_threads == CORES   # ignored, not a crash


# The child pins itself to one core (as taskset or a Slurm cpuset would), then runs the command.
PINNED = ("import os, runpy, sys; os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}}); "
          "sys.argv = [{mod!r}, *sys.argv[1:]]; runpy.run_module({mod!r}, run_name='__main__')")


def test_train_on_one_pinned_core_uses_one_thread_and_no_worker(tmp_path, synthetic_shards):
    out = tmp_path / "run"
    p = run_cli([PY, "-c", PINNED.format(mod="tumorseg_dist.train"), *TINY, "--data", str(synthetic_shards),
                 "--out", str(out), "--epochs", "1", "--max-steps", "1", "--batch-size", "4",
                 "--num-workers", "2", "--loader", "torch"], cwd=tmp_path, env={"OMP_NUM_THREADS": ""})
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("threads: "))
    assert line.startswith("threads: 1 core(s) for this process (CPU affinity): torch 1 thread(s), "
                           "0 loader worker(s) (asked 2"), line
    assert line in (out / "train.log").read_text()


@pytest.mark.skipif(CORES < 2, reason="needs two cores for a worker beside the main process")
def test_evaluate_applies_the_budget(tmp_path, synthetic_shards):
    from inference_testing import make_checkpoint, tiny_config
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt",
                           tiny_config(size=32, data=synthetic_shards))
    p = run_cli([PY, "-m", "tumorseg_dist.evaluate", "--checkpoint", str(ckpt), "--workers", "1",
                 "--device", "cpu"], cwd=tmp_path, env={"OMP_NUM_THREADS": ""})
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("evaluate: threads: "))
    assert f"{CORES} core(s)" in line and f"torch {CORES} thread(s), 1 loader worker(s)" in line, line


def test_every_command_sets_passive_waits_before_torch_loads():
    """OMP_WAIT_POLICY=PASSIVE must be in the environment when libgomp loads (with torch), and a
    user's own choice is kept."""
    code = ("import os, sys; import tumorseg_dist.{mod} as m\n"
            "try:\n    m.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    for mod in ("train", "evaluate", "predict"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        p = subprocess.run([PY, "-c", code.format(mod=mod)], capture_output=True, text=True, env=env, timeout=120)
        assert p.stdout.strip().splitlines()[-1] == "PASSIVE False", (mod, p.stdout[-300:], p.stderr[-500:])
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    p = subprocess.run([PY, "-c", code.format(mod="train")], capture_output=True, text=True, env=env, timeout=120)
    assert p.stdout.strip().splitlines()[-1] == "ACTIVE False"
