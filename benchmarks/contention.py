"""The built-in run alone and beside a competing CPU job: wall and CPU seconds of each.

    python benchmarks/contention.py --epochs 2

Runs `python -m tumorseg_dist.train` on the built-in synthetic set (what `make run` runs, here
with `--epochs`), in a scratch folder, twice: alone, then beside a competitor that keeps every
core busy with torch matrix products (another training job on the same box). A process whose
threads oversubscribe the cores (torch's one-per-core OpenMP pool + loader workers + the
competitor) spends CPU spinning: its `cpu_s` grows far beyond `wall_s` of the alone run. The
synthetic set is packed once by a warm-up run that is not timed. Prints one JSON document.
`--repo` runs another checkout (e.g. a `git worktree` of an earlier commit: before/after).
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _provenance import emit, provenance  # noqa: E402
from tumorseg_dist import cli  # noqa: E402

COMPETITOR = ("import torch\na = torch.randn(768, 768)\nwhile True:\n    a = (a @ a).tanh()")


@dataclass
class ContentionArgs:
    """Time the built-in run alone and beside a competing CPU job."""

    epochs: int = 2
    """Epochs of the built-in run (make run: the preset's 6)."""
    repo: Path = HERE.parent
    """The checkout whose tumorseg_dist runs."""
    json: cli.optional(Path, "none") = None
    """Also write the JSON here."""


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    before, t0 = children_cpu(), time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - before
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}\n{p.stderr[-2000:]}")
    threads = next((ln for ln in p.stdout.splitlines() if ln.startswith("threads: ")), None)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads_line": threads}


def main(argv: list[str] | None = None) -> int:
    import torch
    argv = sys.argv[1:] if argv is None else argv
    a = cli.parse(ContentionArgs, argv, name="contention", prog="python benchmarks/contention.py",
                  description=__doc__)
    env = {**os.environ, "PYTHONPATH": str(a.repo.resolve())}
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):   # as a user's shell has them
        env.pop(var, None)
    doc = {**provenance(argv, torch.device("cpu"), script="benchmarks/contention.py"),
           "repo": str(a.repo.resolve()), "epochs": a.epochs}
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        cwd = Path(tmp)
        train = [sys.executable, "-m", "tumorseg_dist.train", "--device", "cpu"]
        timed([*train, "--epochs", "1", "--max-steps", "1", "--out", str(cwd / "warm")], cwd, env)
        doc["alone"] = timed([*train, "--epochs", str(a.epochs), "--out", str(cwd / "alone")], cwd, env)
        comp = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
        try:
            time.sleep(2)   # the competitor's thread pool is up
            doc["beside_competitor"] = timed([*train, "--epochs", str(a.epochs), "--out", str(cwd / "beside")],
                                             cwd, env)
        finally:
            comp.kill()
            comp.wait()
        shutil.rmtree(cwd / "shards", ignore_errors=True)
    doc["slowdown"] = round(doc["beside_competitor"]["wall_s"] / doc["alone"]["wall_s"], 2)
    emit(doc, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
