"""Train a segmentation model: `python -m tumorseg_dist.train [--config recipe.toml] [flags]`.

Runs as one process or under torchrun / Slurm (one process per GPU, or N CPU processes).
With no --data it packs the built-in synthetic set once and trains on it.
"""
from __future__ import annotations

from . import threads
from .cli import exit_with, guarded
from .config import parse


def _run(argv: list[str] | None) -> int:
    cfg, preset = parse(argv)
    from .jobs.train import run   # torch, DALI, DeepSpeed: only once the flags are good
    return run(cfg, preset)


def main(argv: list[str] | None = None) -> int:
    threads.prefer_passive_waits()   # before anything imports torch (the flags may: CUDA or not)
    return guarded("train", _run, argv)


if __name__ == "__main__":
    exit_with(main())
