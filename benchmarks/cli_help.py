"""`--help` latency of every command: wall seconds of `python -m tumorseg_dist.CMD --help`.

    python benchmarks/cli_help.py --repeat 5

Each command runs in a fresh interpreter (what a user's shell does), `--repeat` times; the JSON
gives the best and the median, and whether --help imported torch (it must not: the commands
import their heavy work only once the flags are good). On a busy 2-core box the median moves
with the load; the best is the command's own cost.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import emit, provenance  # noqa: E402
from tumorseg_dist import cli  # noqa: E402
from tumorseg_dist.commands import COMMANDS  # noqa: E402

# Runs the command's --help in-process, then reports whether torch was imported.
PROBE = ("import runpy, sys; sys.argv = [{mod!r}, '--help']\n"
         "try:\n    runpy.run_module({mod!r}, run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")


@dataclass
class HelpBenchArgs:
    """Time `--help` of every command."""

    repeat: int = 5
    """Fresh interpreters per command."""
    commands: str = ",".join(COMMANDS)
    """Comma list of the commands to time."""
    json: cli.optional(Path, "none") = None
    """Also write the JSON here."""


def time_help(module: str, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise SystemExit(f"{module} --help exited {p.returncode}: {p.stderr[-500:]}")
    probe = subprocess.run([sys.executable, "-c", PROBE.format(mod=module)], cwd=REPO, capture_output=True, text=True)
    return {"best_s": round(min(times), 3), "median_s": round(statistics.median(times), 3),
            "imports_torch": probe.stderr.strip().endswith("TORCH") and "NO-TORCH" not in probe.stderr}


def main(argv: list[str] | None = None) -> int:
    import torch
    argv = sys.argv[1:] if argv is None else argv
    a = cli.parse(HelpBenchArgs, argv, name="cli-bench", prog="python benchmarks/cli_help.py", description=__doc__)
    doc = {**provenance(argv, torch.device("cpu"), script="benchmarks/cli_help.py"), "repeat": a.repeat,
           "commands": {}}
    for name in a.commands.split(","):
        if name not in COMMANDS:
            cli.usage_error("cli-bench", f"--commands: unknown command {name!r}; choose from {', '.join(COMMANDS)}")
        doc["commands"][name] = time_help(COMMANDS[name][0], a.repeat)
    emit(doc, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
