"""Shared fixtures: small packed synthetic sets and a helper to run the CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# Small, fast settings every end-to-end test starts from (CPU, 64 px, resnet18, no weights; no
# end-of-run test evaluation: a test about it appends TEST_EVAL, the last flag wins).
TINY = ["--device", "cpu", "--size", "64", "--in-channels", "1", "--encoder", "resnet18",
        "--encoder-weights", "none", "--num-workers", "0", "--amp", "off", "--no-channels-last",
        "--log-every", "2", "--lr", "3e-3", "--augment", "light", "--no-test-eval"]
TEST_EVAL = ["--test-eval"]


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    from tumorseg_dist.data.synthetic import pack_synthetic
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    pack_synthetic(out, n=48, size=64, seed=0)
    return out


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(map(str, args))}\n"
                             f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


# `make test` runs two workers (pytest-xdist, --dist loadgroup). A test file stays on one worker,
# so its module fixtures (a finished run, a DeepSpeed checkpoint, a local Slurm cluster) are
# made once; the docs pages are independent and the longest file, so they spread out.
SPREAD = {"test_docs_commands"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(module))
