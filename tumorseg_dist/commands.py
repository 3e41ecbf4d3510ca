"""The command table: every command's name, its module and one line saying what it does.

`python -m tumorseg_dist` prints it, `python -m tumorseg_dist CMD ...` runs CMD, and the console
scripts in setup.cfg (`tumorseg-CMD`) are the same `main` functions.
"""
from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "pack": ("tumorseg_dist.pack", "pack a dataset (folders, suffix, COCO, LIDC, volumes) into verified shards"),
    "train": ("tumorseg_dist.train", "train a model (one process, torchrun or Slurm; DDP or DeepSpeed)"),
    "evaluate": ("tumorseg_dist.evaluate", "score a checkpoint on a packed split (metrics.json, per_image.csv)"),
    "predict": ("tumorseg_dist.predict", "masks, overlays and areas for images, folders or shards"),
    "export": ("tumorseg_dist.export", "write an ONNX model, checked against PyTorch with onnxruntime"),
    "bench": ("tumorseg_dist.bench", "run a benchmark from benchmarks/ (throughput, loss, pack, cli, contention)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}   (tumorseg-{name})" for name, (_, what) in COMMANDS.items())
    return ("usage: python -m tumorseg_dist COMMAND [flags]   (or tumorseg-COMMAND [flags])\n\n"
            f"commands:\n{rows}\n\n`python -m tumorseg_dist COMMAND --help` lists a command's flags.")
