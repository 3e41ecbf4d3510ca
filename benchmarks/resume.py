"""The cost of a resume: seconds from process start to the first training step, 1 vs 2 ranks.

    python benchmarks/resume.py --loader dali --repeats 3

Packs a synthetic set in a scratch folder, trains it on 2 ranks (torchrun --standalone, gloo,
CPU) and SIGTERMs the run mid-epoch, which saves last.pt at a global position. Then, `--repeats`
times each, on 1 rank (python -m) and on 2 ranks (torchrun): a fresh start of the same training
and a resume of a copy of the stopped run (on 1 rank that is a resume onto another world size).
Each is timed from launch until the first "step N loss" line on stdout, then killed. The
resume's extra cost over a fresh start is reading the checkpoint and the loader's way to the
saved position (the loop steps over the epoch's earlier batches). Prints one JSON document.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
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

STEP = re.compile(r"^\s+step (\d+) loss")
STOPPED = re.compile(r"stop requested: .* sample (\d+) of (\d+)")


@dataclass
class ResumeArgs:
    """Time a fresh start and a resume, to the first training step, on 1 and 2 ranks."""

    loader: str = "dali"
    """--loader of the runs (torch or dali)."""
    samples: int = 400
    """Synthetic samples packed (about 70% of them train)."""
    size: int = 64
    """--size of the runs."""
    batch_size: int = 4
    """Global --batch-size (2 ranks: 2 per rank; a 1-rank resume keeps the per-rank batch)."""
    stop_after: int = 30
    """The 2-rank run is stopped at the first optimizer step after this logged step."""
    repeats: int = 3
    """Timed runs of each kind (the median is reported)."""
    json: cli.optional(Path, "none") = None
    """Also write the JSON here."""


def launch(world: int) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "tumorseg_dist.train"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc-per-node", str(world), "-m", "tumorseg_dist.train"]


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it: torchrun starts its workers in their own
    sessions, so killing its process group would leave them training on as orphans."""
    def below(p: int) -> list[int]:
        try:
            kids = [int(c) for t in Path(f"/proc/{p}/task").iterdir() for c in (t / "children").read_text().split()]
        except FileNotFoundError:
            return []
        return kids + [g for k in kids for g in below(k)]
    for p in [pid, *below(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def until_first_step(cmd: list[str], cwd: Path, env: dict, stop_after: int | None = None) -> tuple[float, str]:
    """Seconds from launch to the first logged step (killed then), or with `stop_after`: SIGTERM
    once that step is logged and wait for the saved stop. Returns (seconds, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines, first = [], None
    try:
        for line in p.stdout:
            lines.append(line)
            m = STEP.match(line)
            if m and first is None:
                first = time.perf_counter() - t0
                if stop_after is None:
                    break
            if m and stop_after is not None and int(m.group(1)) == stop_after:
                os.killpg(p.pid, signal.SIGTERM)
        if stop_after is not None:
            p.wait(timeout=300)
    finally:
        if p.poll() is None:
            kill_tree(p.pid)
            p.wait()
    if first is None:
        raise SystemExit(f"{' '.join(cmd)} logged no step\n{''.join(lines)[-3000:]}")
    return first, "".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch
    from tumorseg_dist.data.synthetic import pack_synthetic
    argv = sys.argv[1:] if argv is None else argv
    a = cli.parse(ResumeArgs, argv, name="resume", prog="python benchmarks/resume.py", description=__doc__)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    doc = {**provenance(argv, torch.device("cpu"), script="benchmarks/resume.py"),
           "loader": a.loader, "samples": a.samples, "size": a.size, "global_batch": a.batch_size,
           "repeats": a.repeats, "statistic": "median seconds from launch to the first logged step"}
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        cwd = Path(tmp)
        pack_synthetic(cwd / "shards", n=a.samples, size=a.size, seed=0)
        flags = ["--device", "cpu", "--data", str(cwd / "shards"), "--size", str(a.size), "--in-channels", "1",
                 "--encoder", "resnet18", "--encoder-weights", "none", "--loader", a.loader, "--epochs", "1",
                 "--batch-size", str(a.batch_size), "--log-every", "1", "--augment", "light"]
        _, out = until_first_step([*launch(2), *flags, "--out", str(cwd / "stopped")], cwd, env, a.stop_after)
        m = STOPPED.search(out)
        if m is None:
            raise SystemExit(f"the 2-rank run did not stop mid-epoch\n{out[-3000:]}")
        doc["resumed_at_sample"], doc["epoch_samples"] = int(m.group(1)), int(m.group(2))
        for world in (1, 2):
            fresh, resumed = [], []
            for i in range(a.repeats):
                fresh.append(until_first_step([*launch(world), *flags, "--out", str(cwd / f"fresh{world}-{i}")], cwd, env)[0])
                run = cwd / f"resume{world}-{i}"
                shutil.copytree(cwd / "stopped", run)
                s, text = until_first_step([*launch(world), *flags, "--out", str(run)], cwd, env)
                if "resumed from" not in text:
                    raise SystemExit(f"the run in {run} did not resume\n{text[-3000:]}")
                resumed.append(s)
            doc[f"ranks_{world}"] = {
                "fresh_start_s": round(statistics.median(fresh), 2), "resume_s": round(statistics.median(resumed), 2),
                "resume_extra_s": round(statistics.median(resumed) - statistics.median(fresh), 2),
                "fresh_all_s": [round(x, 2) for x in fresh], "resume_all_s": [round(x, 2) for x in resumed]}
    emit(doc, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
