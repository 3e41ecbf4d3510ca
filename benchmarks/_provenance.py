"""Provenance shared by every benchmark: device, versions, date, git commit, command, load.

    from _provenance import provenance
    doc = provenance(sys.argv[1:], device, script="benchmarks/loss.py")

Every row in benchmarks/RESULTS.md is built from JSON that carries these fields.
"""
from __future__ import annotations

import datetime
import importlib
import json
import importlib.metadata
import os
import platform
import shlex
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def version(mod: str, dist: str | None = None) -> str | None:
    """The installed version of distribution `dist` (read from its metadata, no import), else
    `mod.__version__`; None when the package is not installed."""
    if dist is not None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    try:
        return importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001 - optional packages (DALI, deepspeed) may be absent or broken
        return None


def git_state() -> tuple[str | None, bool | None]:
    """(short commit, whether tracked files differ from it)."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], text=True,
                                capture_output=True, check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    text=True, capture_output=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def provenance(argv: list[str], device: torch.device, script: str = "benchmarks/throughput.py") -> dict:
    """Device, versions, date, commit and the full command of this benchmark run."""
    commit, dirty = git_state()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "device": device_name(device), "cpu_count": os.cpu_count(), "load_average_1min_at_start": load,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit, "git_dirty": dirty,
        "command": shlex.join(["python", script, *argv]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                     "dali": version("nvidia.dali"), "deepspeed": version("deepspeed", "deepspeed"),
                     "smp": version("segmentation_models_pytorch", "segmentation-models-pytorch"), "torchvision": version("torchvision"),
                     "albumentations": version("albumentations")},
    }


def emit(doc: dict, path: Path | None) -> None:
    """Print the benchmark's JSON document, and write it to `path` (--json) when given."""
    text = json.dumps(doc, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
