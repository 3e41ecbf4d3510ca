"""Run `python -m MODULE ARGS...` in this process and record its exit status in a file.

torchrun reports 1 whenever a worker fails or the agent is signalled, so a worker's own exit
status (75 = "checkpoint saved, requeue me", see tumorseg_dist.dist.REQUEUE_EXIT_CODE) does
not reach the Slurm script through it. slurm/train.sh runs each worker as

    torchrun ... launch/record_exit.py tumorseg_dist.train --flags...

with EXIT_CODE_DIR set; each worker writes EXIT_CODE_DIR/rank<RANK> (its status as text) as it
exits. The module runs in this very process (runpy), so signals reach its handlers unchanged.
"""
from __future__ import annotations

import atexit
import os
import runpy
import sys
from pathlib import Path


def _status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    return 1  # sys.exit("message") prints the message and exits 1


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: record_exit.py MODULE [ARGS...]  (EXIT_CODE_DIR=dir to record the status)")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    sys.path[0] = os.getcwd()  # what `python -m` puts first, instead of this script's folder
    status = {"code": 1}   # an uncaught exception: Python exits 1

    def record() -> None:
        # An atexit handler, not a `finally`: a tumorseg_dist command ends its process with
        # cli.exit_with (os._exit after the atexit handlers), which no `finally` here outlives.
        out = os.environ.get("EXIT_CODE_DIR")
        if not out:
            return
        cli = sys.modules.get("tumorseg_dist.cli")
        code = status["code"] if cli is None or cli.exit_status is None else cli.exit_status
        Path(out).mkdir(parents=True, exist_ok=True)
        tmp = Path(out) / f".rank{os.environ.get('RANK', '0')}.{os.getpid()}"
        tmp.write_text(f"{code}\n")
        tmp.replace(Path(out) / f"rank{os.environ.get('RANK', '0')}")

    atexit.register(record)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status["code"] = 0
    except SystemExit as e:
        status["code"] = _status(e.code)
        raise


if __name__ == "__main__":
    main()
