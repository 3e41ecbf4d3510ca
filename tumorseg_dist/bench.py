"""Run a benchmark: `python -m tumorseg_dist.bench NAME [flags]` (console script `tumorseg-bench`).

NAME is a script in the repository's benchmarks/ folder: throughput, loss, pack, cli (the
--help timings), contention (the built-in run alone and beside a competing job), predict (the
predictor's images/s and memory, whole vs sliding, PyTorch vs onnxruntime) or resume (launch to
the first step, fresh and resumed onto another world size). Each prints one JSON document;
`NAME --help` lists its flags. The benchmarks
ship with the repository, not inside the package: this runs them from a clone (an editable
install, `pip install -e .`, which `make setup` does).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NAMES = {"throughput": "throughput.py", "loss": "loss.py", "pack": "pack.py", "cli": "cli_help.py",
         "contention": "contention.py", "predict": "predict.py", "resume": "resume.py"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in NAMES:
        print(f"bench: error: unknown benchmark {name!r}; choose one of {', '.join(NAMES)}", file=sys.stderr)
        return 2
    script = BENCHMARKS / NAMES[name]
    if not script.is_file():
        print(f"bench: error: {script} not found: the benchmarks ship with the repository; run from a "
              f"clone installed with `pip install -e .` (make setup)", file=sys.stderr)
        return 2
    old = sys.argv
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:   # a benchmark's own sys.exit(code or message)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    sys.exit(main())
