"""Predictor speed and memory: images/s of one image -> mask at its own size, whole vs sliding,
PyTorch vs onnxruntime (predict --onnx's predictor), on a 640×640 and a 2048×1536 image.

    python benchmarks/predict.py --checkpoint runs/NAME/checkpoints/best.pt --repeat 3

Each (backend, mode, image) runs in a fresh interpreter, so its peak RSS (VmHWM) is its
own and the onnxruntime rows never load torch (the JSON says whether they did). A row times
`--repeat` calls of `predict_image` after one warm-up call; `peak_rss_mib` is the process's
high-water mark (VmHWM: model, image and inference), `rss_loaded_mib` the RSS once the model
and image are loaded,
`tracemalloc_peak_mib` the peak of Python/numpy allocations during the timed calls (torch's
own allocator is not traced by tracemalloc, so for the PyTorch rows it counts only numpy work).
OMP_WAIT_POLICY=PASSIVE as in every command: on a busy machine spinning OpenMP threads made
the PyTorch rows up to 10x slower.
Without --checkpoint a resnet18 U-Net with random weights (encoder weights none) at --size is
written to a temporary folder; without --onnx the checkpoint is exported (`export`, full graph).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tumorseg_dist import cli, threads  # noqa: E402

COCO = REPO.parent / "shared" / "data" / "brain_tumor_coco" / "archive" / "test"
SIZES = {"640": (640, 640), "2048x1536": (1536, 2048)}   # name -> (height, width)


@dataclass
class PredictBenchArgs:
    """Time the predictor: whole vs sliding, torch vs onnxruntime, 640² and 2048×1536."""

    checkpoint: cli.optional(Path, "a random resnet18 U-Net at --size") = None
    onnx: cli.optional(Path, "exported from the checkpoint") = None
    image: cli.optional(Path, "the first COCO brain test image (640×640), else noise") = None
    """Picture to predict; resized to 640×640 and 2048×1536."""
    size: int = 128
    """Training size of the random model (without --checkpoint)."""
    repeat: int = 3
    """Timed calls per row (after one warm-up)."""
    overlap: float = 0.5
    backends: str = "torch,onnxruntime"
    modes: str = "whole,sliding"
    images: str = ",".join(SIZES)
    threads: int = 0
    """torch / onnxruntime intra-op threads (0: the process's cores)."""
    json: cli.optional(Path, "none") = None
    """Also write the JSON here."""


def random_checkpoint(folder: Path, size: int) -> Path:
    """A checkpoint as training writes it, resnet18 U-Net, random weights, 3 channels."""
    import torch
    from tumorseg_dist.checkpoint import atomic_save
    from tumorseg_dist.config import Config, ModelConfig
    from tumorseg_dist.dist import DistInfo
    from tumorseg_dist.engines import build_engine
    from tumorseg_dist.loop import TrainState, checkpoint_state
    from tumorseg_dist.models import build_model
    cfg = Config()
    cfg.model = ModelConfig(arch="unet", encoder="resnet18", encoder_weights="none")
    cfg.data.size, cfg.data.in_channels, cfg.data.mean, cfg.data.std = size, 3, (0.3,) * 3, (0.2,) * 3
    cfg.train.device, cfg.train.amp, cfg.train.channels_last = "cpu", "off", False
    torch.manual_seed(0)
    engine = build_engine(cfg, build_model(cfg.model, 3), DistInfo(0, 0, 1, torch.device("cpu")),
                          lambda a, b: a.sum(), 1)
    path = folder / "random-unet-resnet18.pt"
    atomic_save(checkpoint_state(cfg, engine, TrainState()), path)
    return path


def make_images(src: Path | None, folder: Path, names: list[str]) -> dict[str, Path]:
    """The benchmark pictures as PNG files: src (or noise) resized to each size."""
    import numpy as np
    from PIL import Image
    if src is None and COCO.is_dir():
        src = sorted(COCO.glob("*.jpg"))[0]
    base = (Image.open(src).convert("RGB") if src is not None else
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)))
    out = {}
    for name in names:
        h, w = SIZES[name]
        out[name] = folder / f"{name}.png"
        base.resize((w, h), Image.BICUBIC).save(out[name])
    return out


def proc_status(key: str) -> float:
    """MiB from /proc/self/status: VmHWM is this process's peak RSS since its exec (ru_maxrss
    would carry over the parent's peak across exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: dict) -> dict:
    """One row, in this (fresh) process."""
    threads = spec["threads"] or len(os.sched_getaffinity(0))
    if spec["backend"] == "onnxruntime":
        from tumorseg_dist.onnx_predictor import load_onnx
        model = load_onnx(spec["onnx"], threads)
    else:
        import torch
        torch.set_num_threads(threads)
        from tumorseg_dist.inference import load_model
        model = load_model(spec["checkpoint"], "cpu")
    from tumorseg_dist.imageio import read_image
    image = read_image(Path(spec["image"]))
    rss_loaded = proc_status("VmRSS")
    run = lambda: model.predict_image(image, inference=spec["mode"], overlap=spec["overlap"])  # noqa: E731
    mask = run()   # warm-up: first-call allocations and kernel selection
    tracemalloc.start()
    t0 = time.perf_counter()
    for _ in range(spec["repeat"]):
        mask = run()
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return {"backend": spec["backend"], "mode": spec["mode"], "image": spec["name"],
            "height": int(image.shape[0]), "width": int(image.shape[1]), "threads": threads,
            "images_per_s": round(spec["repeat"] / seconds, 3), "seconds_per_image": round(seconds / spec["repeat"], 3),
            "peak_rss_mib": round(proc_status("VmHWM"), 1),
            "rss_loaded_mib": round(rss_loaded, 1), "tracemalloc_peak_mib": round(traced, 1),
            "mask_pixels": int(mask.sum()), "torch_imported": "torch" in sys.modules}


def main(argv: list[str] | None = None) -> int:
    threads.prefer_passive_waits()  # as every command does, before torch loads (inherited by the rows)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(json.loads(argv[1]))))
        return 0
    args = cli.parse(PredictBenchArgs, argv, name="benchmarks/predict.py", description=__doc__)
    import torch
    from _provenance import emit, provenance
    from tumorseg_dist import export
    import onnxruntime
    doc = provenance(argv, torch.device("cpu"), script="benchmarks/predict.py")  # the load before the rows
    doc["versions"]["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint or random_checkpoint(tmp, args.size)
        onnx = args.onnx
        if onnx is None:
            onnx = tmp / "model.onnx"
            if export.main(["--checkpoint", str(ckpt), "--onnx", str(onnx)]) != 0:
                raise SystemExit("benchmarks/predict.py: the export failed")
        images = make_images(args.image, tmp, args.images.split(","))
        rows = []
        for name, path in images.items():
            for mode in args.modes.split(","):
                for backend in args.backends.split(","):
                    spec = {"backend": backend, "mode": mode, "name": name, "image": str(path),
                            "checkpoint": str(ckpt), "onnx": str(onnx), "repeat": args.repeat,
                            "overlap": args.overlap, "threads": args.threads}
                    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=REPO,
                                       capture_output=True, text=True)
                    if p.returncode != 0:
                        raise SystemExit(f"benchmarks/predict.py: {backend} {mode} {name} failed:\n{p.stderr[-2000:]}")
                    rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
                    print(json.dumps(rows[-1]), file=sys.stderr)
        doc.update({"checkpoint": str(args.checkpoint) if args.checkpoint else
                    f"random unet/resnet18, size {args.size}", "image_source": str(args.image or "COCO test image 0"),
                    "overlap": args.overlap, "repeat": args.repeat, "rows": rows})
    emit(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
