"""Throughput benchmarks: where every millisecond of a training step goes, and how it scales.

    python benchmarks/throughput.py --stage all --synthetic --size 640 --batch-size 32 --amp bf16
    python benchmarks/throughput.py --stage model --sweep batch_size=8,16,32,64 --json out.json
    torchrun --nproc-per-node 8 benchmarks/throughput.py --stage model --size 640

Stages (one `stage_*` function each, registered in STAGES):

* `data`: the loader alone, images/s delivered to the device (decode + resize + augment +
  normalise + copy) for each `--loader` (dali, torch, and `naive`: the seeds' PIL +
  albumentations + DataLoader on a folder of PNG files, benchmarks/naive_loader.py) and, with
  `--synthetic`, each `--codec`.
* `model`: forward + loss + backward + optimizer through the real engine on synthetic tensors
  already on the device: the upper bound for training throughput.
* `train`: the real loop step (`loop.train_step`) on batches from the real loader and shards.
* `all`: the three, the ratio train/model per loader (what the input pipeline costs), and a
  breakdown of one step (data wait, H2D, forward, loss, backward, all-reduce, optimizer).

Model rows carry FLOPs per image from `torch.utils.flop_counter` and, on a GPU in the PEAK_TFLOPS
table, achieved TFLOP/s and the fraction of the device's dense peak (MFU). Under torchrun every
row has per-rank and aggregate images/s and, for model/train with `--engine ddp`, the scaling
efficiency against one rank measured in the same run. Output: a table on stdout; `--json OUT`
writes one JSON object per row with device, versions, date, commit, command and every setting.
Rows from a small shared CPU machine are only meaningful as ratios between variants measured in
the same run.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from tumorseg_dist import cli
from _provenance import provenance as _provenance   # this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]


def provenance(argv: list[str], device: torch.device) -> dict:
    """Device, versions, date, commit and command: every benchmark row carries these."""
    return _provenance(argv, device, script="benchmarks/throughput.py")


# ---------------------------------------------------------------- device peaks and FLOPs

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, per compute
# dtype. "tf32" is what fp32 convolutions run at when cuDNN may use TF32 (PyTorch's default).
# Matched against torch.cuda.get_device_name() in this order (first substring match wins).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),   # SXM5
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]


def peak_tflops(device_name: str, compute: str) -> float | None:
    """The table's peak for this device and compute dtype; None for a device not in the table."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(compute)
    return None


def compute_dtype(amp: str, device: torch.device) -> str:
    """The dtype the convolutions run in: the autocast dtype, else tf32 or fp32 (cuDNN setting)."""
    if amp in ("bf16", "fp16"):
        return amp
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"


_FLOPS_CACHE: dict[tuple, dict] = {}


def flops_per_image(arch: str, encoder: str, in_channels: int, size: int) -> dict:
    """Forward and forward+backward FLOPs for one image, from torch.utils.flop_counter.

    Counted on the meta device (shapes only, no compute). The counter counts matmuls and
    convolutions (2 FLOPs per multiply-add), not element-wise ops such as BatchNorm or ReLU: the
    usual convention for model FLOP utilisation."""
    key = (arch, encoder, in_channels, size)
    if key not in _FLOPS_CACHE:
        from torch.utils.flop_counter import FlopCounterMode
        from tumorseg_dist.config import ModelConfig
        from tumorseg_dist.models import build_model
        model = build_model(ModelConfig(arch=arch, encoder=encoder, encoder_weights="none"), in_channels)
        model = model.to("meta").train()
        x = torch.empty(1, in_channels, size, size, device="meta")
        with FlopCounterMode(display=False) as fwd:
            out = model(x)
        with FlopCounterMode(display=False) as bwd:
            out.float().sum().backward()
        f, b = fwd.get_total_flops(), bwd.get_total_flops()
        _FLOPS_CACHE[key] = {"flops_per_image_fwd": f, "flops_per_image_bwd": b,
                             "flops_per_image_fwd_bwd": f + b}
    return dict(_FLOPS_CACHE[key])


def add_flops(row: dict, args, device: torch.device) -> None:
    """FLOPs per image, achieved TFLOP/s and (known GPU) the fraction of peak into a model row."""
    if not args.flops:
        return
    fl = flops_per_image(args.arch, args.encoder, args.in_channels, args.size)
    row.update(fl)
    achieved = fl["flops_per_image_fwd_bwd"] * row["images_per_s"] / 1e12
    row["achieved_tflops"] = round(achieved, 4)
    row["compute_dtype"] = compute_dtype(row.get("amp", "off"), device)
    if device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device), row["compute_dtype"])
        if peak is not None:
            # Aggregate rows: the peak of all the ranks' GPUs together.
            total = peak * row.get("world_size", 1)
            row["peak_tflops"] = total
            row["mfu"] = round(achieved / total, 4)


# ---------------------------------------------------------------- timing and memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """CUDA: peak allocated bytes since the row started. CPU: the process's peak resident set
    (monotone over the whole run: only an upper bound for the rows after the first)."""
    if device.type == "cuda":
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda_max_allocated"}
    return {"peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_memory_kind": "process_peak_rss"}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Marks:
    """Phase boundaries within one step: CUDA events on a GPU (no sync between phases), wall
    clock on CPU (where ops run synchronously)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: list = []

    def mark(self, phase: str | None = None) -> None:
        """A boundary (the phase that just ended is implied by the order; see PHASES)."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.points.append(ev)
        else:
            self.points.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            self.points[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.points, self.points[1:])]


def timed_steps(step, warmup: int, steps: int, device: torch.device, images_per_step: int,
                profile: Path | None = None) -> dict:
    """Run `warmup` untimed then `steps` timed calls of `step()`; images/s over the timed ones.
    With `profile`, a few more steps under torch.profiler, written as a Chrome/Perfetto trace."""
    last = None
    for _ in range(warmup):
        last = step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    sync(device)
    dt = time.perf_counter() - t0
    out = {"steps": steps, "warmup": warmup, "seconds": round(dt, 4),
           "step_ms": round(dt / steps * 1e3, 3),
           "images_per_s": round(images_per_step * steps / dt, 3)}
    if torch.is_tensor(last) and last.numel() == 1:
        out["last_loss"] = float(last.float())
    if profile is not None:
        out["profile_trace"] = str(write_trace(step, device, profile, min(steps, 5)))
    return out


def write_trace(step, device: torch.device, path: Path, steps: int) -> Path:
    from torch.profiler import ProfilerActivity, profile, record_function
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=acts, profile_memory=True) as prof:
        for i in range(steps):
            with record_function(f"step_{i}"):
                step()
        sync(device)
    prof.export_chrome_trace(str(path))
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=12), file=sys.stderr)
    return path


# ---------------------------------------------------------------- data sets

def prepare_data(root: Path, n: int, size: int, codecs: list[str], naive: bool) -> dict[str, Path]:
    """Phantoms packed once per codec (all in the train split) and, for `naive`, written as the
    seeds' image/ + mask/ folders of PNG files. Cached: a second run reuses them."""
    from tumorseg_dist.data.phantoms import phantom
    from tumorseg_dist.data.synthetic import pack_synthetic
    from tumorseg_dist.data.shards import output_is_complete
    from naive_loader import write_folder
    out: dict[str, Path] = {}
    base = root / f"phantoms-n{n}-s{size}"
    for codec in codecs:
        d = base / codec
        if not output_is_complete(d):
            pack_synthetic(d, n=n, size=size, seed=0, codec=codec, split=(1.0, 0.0, 0.0))
        out[codec] = d
    if naive:
        d = base / "folders"
        if not (d / "done").is_file():
            write_folder(d, ((f"{i}", *phantom(i, size, 0)) for i in range(n)))
            (d / "done").write_text("ok\n")
        out["folders"] = d
    return out


def datasets(args, dist, loaders: list[str], codecs: list[str]) -> dict[str, Path]:
    """codec -> shard directory (+ "folders" for naive). `--data`: that one packed set; else the
    synthetic phantoms, prepared by rank 0 while the others wait."""
    if args.data is not None:
        from tumorseg_dist.data.shards import read_manifest
        return {read_manifest(args.data).get("codec", "png"): Path(args.data)}
    from tumorseg_dist import dist as distmod
    codecs = codecs if {"dali", "torch"} & set(loaders) else []
    if dist.is_main:   # rank 0 packs; the others then find the cached copy
        prepare_data(Path(args.data_dir), args.samples, args.source_size, codecs, "naive" in loaders)
    if dist.world_size > 1:   # not in the one-rank baseline, which rank 0 runs alone
        distmod.barrier()
    return prepare_data(Path(args.data_dir), args.samples, args.source_size, codecs, "naive" in loaders)


def _naive_rows_possible(args, loaders: list[str]) -> list[str]:
    if "naive" in loaders and args.data is not None:
        print("throughput: --loader naive reads a folder of PNG files written from the synthetic "
              "phantoms; it is skipped with --data", file=sys.stderr)
        return [name for name in loaders if name != "naive"]
    return loaders


def _epochs(loader, to_item):
    """Endless batches over successive epochs (set_epoch each time, as the loop does)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for b in loader:
            yield to_item(b)
        epoch += 1


def bench_precision(args, dist):
    """The Precision these settings give on this device (decided in tumorseg_dist/precision.py)."""
    from tumorseg_dist.config import TrainConfig
    from tumorseg_dist.precision import resolve_precision
    return resolve_precision(TrainConfig(amp=args.amp, channels_last=args.channels_last, compile=args.compile),
                             dist.device)


def open_loader(name: str, shard_dir: Path, args, dist, training_batch: int):
    """An endless iterator of `Batch`es from loader `name` (dali, torch or naive) on this rank:
    dali and torch are built by `build_loader` from the training Config these settings describe,
    exactly as train.py builds them."""
    from tumorseg_dist.data.batch import Batch
    from tumorseg_dist.data.loader import build_loader
    c, dev = args.in_channels, dist.device
    prec = bench_precision(args, dist)
    if name == "naive":
        from naive_loader import naive_loader
        from tumorseg_dist.data.augment import PRESETS
        fmt, dtype = prec.memory_format, prec.image_dtype   # what training would get
        dl = naive_loader(shard_dir, args.size, c, training_batch, args.workers, PRESETS[args.augment],
                          (0.5,) * c, (0.25,) * c, pin=dev.type == "cuda")

        def to_batch(b):
            img, mask = b
            return Batch(image=img.to(dev, dtype=dtype, non_blocking=True).contiguous(memory_format=fmt),
                         mask=mask.to(dev, non_blocking=True).contiguous(memory_format=fmt),
                         valid=torch.ones(img.shape[0], dtype=torch.bool, device=dev), keys=[])
        return _epochs(dl, to_batch)
    cfg = make_config(args, dist, name, shard_dir)
    cfg.train.batch_size = training_batch * dist.world_size   # build_loader splits the global batch
    return _epochs(build_loader(cfg, shard_dir, "train", dist, training=True, precision=prec), lambda b: b)


def common_settings(args, dist) -> dict:
    return {"size": args.size, "in_channels": args.in_channels, "batch_size": args.batch_size,
            "per_rank_batch_size": args.batch_size // dist.world_size, "world_size": dist.world_size,
            "channels_last": args.channels_last}


# ---------------------------------------------------------------- stage: data

def stage_data(args, dist, ctx: dict) -> list[dict]:
    loaders = _naive_rows_possible(args, args.loader.split(","))
    codecs = args.codec.split(",")
    data = datasets(args, dist, loaders, codecs)
    if args.data is not None:
        codecs = list(data)
    per_rank = args.batch_size // dist.world_size
    rows: dict[tuple[str, str], dict] = {}
    # Round-robin repeats, best of N: on a shared machine other processes come and go, and the
    # fastest repeat is the one least disturbed by them (every row gets the same chances).
    for rep in range(args.repeats):
        for name in loaders:
            for codec in (codecs if name != "naive" else ["png-files"]):
                shard_dir = data[codec] if name != "naive" else data["folders"]
                reset_peak_memory(dist.device)
                gen = open_loader(name, shard_dir, args, dist, per_rank)
                try:
                    images = (b.image for b in gen)
                    res = timed_steps(lambda: next(images), args.warmup, args.steps, dist.device, per_rank)
                finally:
                    gen.close()   # stop DataLoader workers / release the DALI pipeline before the next row
                row = rows.setdefault((name, codec), {
                    "stage": "data", "loader": name, "codec": codec, **common_settings(args, dist),
                    "source_size": args.source_size if args.data is None else None,
                    "data": str(shard_dir), "workers": args.workers, "augment": args.augment,
                    "image_dtype": str(bench_precision(args, dist).image_dtype).removeprefix("torch."),
                    "images_per_run": res["steps"] * per_rank, "runs_images_per_s": []})
                row["runs_images_per_s"].append(res["images_per_s"])
                row["images_per_s"] = max(row["runs_images_per_s"])
                row["median_images_per_s"] = round(statistics.median(row["runs_images_per_s"]), 3)
                row["step_ms"] = round(per_rank / row["images_per_s"] * 1e3, 3)
                row.update(peak_memory(dist.device))
                print(json.dumps({"repeat": rep, "loader": name, "codec": codec, **res}), file=sys.stderr, flush=True)
    return list(rows.values())


# ---------------------------------------------------------------- engine for model/train

def make_config(args, dist, loader: str = "torch", data_dir: Path | None = None):
    """The training Config these benchmark settings describe (no pretrained weights)."""
    from tumorseg_dist.config import Config
    cfg = Config()
    cfg.model.arch, cfg.model.encoder, cfg.model.encoder_weights = args.arch, args.encoder, "none"
    cfg.data.size, cfg.data.in_channels, cfg.data.num_workers = args.size, args.in_channels, args.workers
    cfg.data.loader, cfg.data.path = ("torch" if loader == "naive" else loader), data_dir
    cfg.augment.augment = args.augment
    cfg.optim.optimizer, cfg.optim.scheduler, cfg.optim.warmup_steps = args.optimizer, "none", 0
    cfg.loss.fused_loss = args.fused_loss
    cfg.train.batch_size = args.batch_size
    cfg.train.amp = args.amp   # resolved (and written back) by build_engine_for_benchmark
    cfg.train.channels_last, cfg.train.compile = args.channels_last, args.compile
    cfg.train.device = dist.device.type
    cfg.engine.engine, cfg.engine.zero_stage = args.engine, args.zero_stage
    return cfg


def make_engine(args, dist, loader: str = "torch", data_dir: Path | None = None):
    from tumorseg_dist.engines import build_engine_for_benchmark
    cfg = make_config(args, dist, loader, data_dir)
    torch.manual_seed(0)
    return cfg, build_engine_for_benchmark(cfg, dist, total_steps=args.warmup + args.steps + 10)


def engine_settings(args, cfg, engine) -> dict:
    return {"arch": args.arch, "encoder": args.encoder, "amp": cfg.train.amp, "compile": args.compile,
            "engine": args.engine, "zero_stage": args.zero_stage if args.engine == "deepspeed" else None,
            "fused_loss": args.fused_loss, "optimizer": args.optimizer,
            "torch_threads": torch.get_num_threads()}


def _trace_path(args, dist, name: str) -> Path | None:
    if args.profile is None:
        return None
    return Path(args.profile) / f"{name}-rank{dist.rank}.json"


# ---------------------------------------------------------------- stage: model

def stage_model(args, dist, ctx: dict) -> list[dict]:
    """Forward + fp32 loss + backward + optimizer step (the engine's train_step) on synthetic
    tensors already on the device, in the engine's memory format and the loaders' image dtype."""
    dev, per_rank = dist.device, args.batch_size // dist.world_size
    reset_peak_memory(dev)
    cfg, engine = make_engine(args, dist)
    g = torch.Generator(device=dev).manual_seed(dist.rank)
    image = torch.randn(per_rank, args.in_channels, args.size, args.size, device=dev, generator=g)
    mask = (torch.rand(per_rank, 1, args.size, args.size, device=dev, generator=g) > 0.7).float()
    # The dtype and layout the loaders deliver (image_dtype: bf16/fp16 under AMP).
    prec = engine.precision
    image = image.to(prec.image_dtype).contiguous(memory_format=prec.memory_format)
    mask = mask.contiguous(memory_format=prec.memory_format)
    engine.train()
    res = timed_steps(lambda: engine.train_step(image, mask), args.warmup, args.steps, dev, per_rank,
                      _trace_path(args, dist, "model"))
    row = {"stage": "model", "loader": "synthetic-on-device", **common_settings(args, dist),
           **engine_settings(args, cfg, engine), **res, **peak_memory(dev)}
    if hasattr(engine, "memory_report"):
        row["engine_memory_bytes"] = engine.memory_report()
    del engine, image, mask
    free_memory(dev)
    return [row]


# ---------------------------------------------------------------- stage: train

def _train_loaders(args) -> list[str]:
    return _naive_rows_possible(args, args.loader.split(","))


def stage_train(args, dist, ctx: dict) -> list[dict]:
    """The loop's train_step on batches from each --loader over the real shards."""
    from tumorseg_dist.loop import train_step
    loaders = _train_loaders(args)
    codec = args.codec.split(",")[0]
    data = datasets(args, dist, loaders, [codec])
    shard_key = next(iter(data)) if args.data is not None else codec
    dev, per_rank = dist.device, args.batch_size // dist.world_size
    rows = []
    for name in loaders:
        shard_dir = data["folders"] if name == "naive" else data[shard_key]
        reset_peak_memory(dev)
        cfg, engine = make_engine(args, dist, name, shard_dir)
        gen = open_loader(name, shard_dir, args, dist, per_rank)
        engine.train()
        try:
            res = timed_steps(lambda: train_step(engine, next(gen)), args.warmup, args.steps, dev,
                              per_rank, _trace_path(args, dist, f"train-{name}"))
        finally:
            gen.close()
        rows.append({"stage": "train", "loader": name, "codec": "png-files" if name == "naive" else shard_key,
                     "data": str(shard_dir), "workers": args.workers, "augment": args.augment,
                     **common_settings(args, dist), **engine_settings(args, cfg, engine), **res,
                     **peak_memory(dev)})
        del engine
        free_memory(dev)
    return rows


# ---------------------------------------------------------------- step breakdown

PHASES = ("data_wait", "h2d", "forward", "loss", "backward", "all_reduce", "optimizer")


def _timed_step(engine, batch, marks: Marks) -> None:
    """One training step through the engine's public timed step: `train_step(..., mark=)` marks
    the end of each phase (DDP then runs its all-reduce after backward, so it is its own phase;
    DeepSpeed reduces inside backward)."""
    marks.mark()
    engine.train_step(batch.image, batch.mask, mark=marks.mark)


def _h2d_ms(batch, device: torch.device, repeats: int = 5) -> float | None:
    """Time to copy a batch of this shape from pinned host memory to the GPU (None on CPU)."""
    if device.type != "cuda":
        return None
    host = [batch.image.cpu().pin_memory(), batch.mask.cpu().pin_memory()]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for h in host:
            h.to(device, non_blocking=True)
    sync(device)
    return (time.perf_counter() - t0) / repeats * 1e3


def stage_breakdown(args, dist, ctx: dict) -> list[dict]:
    """Median per-phase milliseconds of the real loop step (first --loader), over --steps."""
    name = next((n for n in _train_loaders(args) if n != "naive"), None) or _train_loaders(args)[0]
    codec = args.codec.split(",")[0]
    data = datasets(args, dist, [name], [codec])
    shard_dir = data["folders"] if name == "naive" else data[next(iter(data)) if args.data is not None else codec]
    dev, per_rank = dist.device, args.batch_size // dist.world_size
    cfg, engine = make_engine(args, dist, name, shard_dir)
    gen = open_loader(name, shard_dir, args, dist, per_rank)
    engine.train()
    per_step: list[list[float]] = []
    h2d = None
    try:
        for i in range(args.warmup + args.steps):
            sync(dev)
            t0 = time.perf_counter()
            batch = next(gen)
            sync(dev)
            data_ms = (time.perf_counter() - t0) * 1e3
            if h2d is None:
                h2d = _h2d_ms(batch, dev)
            marks = Marks(dev)
            _timed_step(engine, batch, marks)
            if i >= args.warmup:
                per_step.append([data_ms, *marks.intervals_ms()])
            else:
                marks.intervals_ms()
    finally:
        gen.close()
    from tumorseg_dist.engines.parts import PHASES as compute
    med = {p: round(statistics.median(s[k] for s in per_step), 3) for k, p in enumerate(("data_wait", *compute))}
    if dist.world_size == 1 or engine.name == "deepspeed":
        med["all_reduce"] = None
    med["h2d"] = None if h2d is None else round(h2d, 3)
    phases = {p: med[p] for p in PHASES}
    row = {"stage": "breakdown", "loader": name, "codec": "png-files" if name == "naive" else codec,
           **common_settings(args, dist), **engine_settings(args, cfg, engine),
           "steps": len(per_step), "phases_ms": phases,
           "sum_ms": round(sum(v for v in phases.values() if v is not None), 3),
           "timer": "cuda_events" if dev.type == "cuda" else "wall_clock",
           "notes": ("data_wait: host time blocked on the loader (for --loader torch it includes the "
                     "loader's own host-to-device copy); h2d: a separate pinned copy of the same bytes "
                     "(GPU only); all_reduce: DDP's gradient all-reduce run after backward as one flat "
                     "bucket (the real step overlaps it with backward; DeepSpeed: inside backward)")}
    del engine
    free_memory(dev)
    return [row]


# ---------------------------------------------------------------- stage: all

def stage_all(args, dist, ctx: dict) -> list[dict]:
    """data + model + train + breakdown, and train/model per loader."""
    rows = []
    for name in ("data", "model", "train", "breakdown"):
        rows += run_stage(name, args, dist, ctx)
    model = next((r for r in rows if r["stage"] == "model" and "images_per_s" in r), None)
    for r in rows:
        if model is not None and r["stage"] == "train" and "images_per_s" in r:
            r["train_over_model"] = round(r["images_per_s"] / model["images_per_s"], 4)
        if r["stage"] == "breakdown":
            train = next((t for t in rows if t["stage"] == "train" and t.get("loader") == r["loader"]
                          and "step_ms" in t), None)
            if train is not None:
                r["train_step_ms"] = train["step_ms"]
    return rows


STAGES = {"data": stage_data, "model": stage_model, "train": stage_train, "breakdown": stage_breakdown,
          "all": stage_all}


# ---------------------------------------------------------------- ranks: aggregate and scale

def aggregate(rows: list[dict], dist) -> list[dict]:
    """Under torchrun: per-rank images/s (all_gather), aggregate = their sum, peak memory = max."""
    if dist.world_size == 1:
        return rows
    mine = [(r.get("images_per_s"), r.get("peak_memory_mib")) for r in rows]
    every: list = [None] * dist.world_size
    torch.distributed.all_gather_object(every, mine)
    for i, r in enumerate(rows):
        if r.get("images_per_s") is None:
            continue
        per_rank = [every[k][i][0] for k in range(dist.world_size)]
        r["per_rank_images_per_s"] = per_rank
        r["images_per_s"] = round(sum(per_rank), 3)
        r["peak_memory_mib"] = max(every[k][i][1] or 0 for k in range(dist.world_size))
        r["peak_memory_scope"] = "max over ranks"
    return rows


def single_rank_baseline(name: str, args, dist, ctx: dict) -> float | None:
    """Images/s of one rank alone with the same per-rank batch (rank 0, others wait): the
    denominator of the scaling efficiency. DDP only: DeepSpeed cannot leave the process group."""
    from tumorseg_dist import dist as distmod
    from tumorseg_dist.dist import DistInfo
    value = None
    if dist.is_main:
        solo = copy.copy(args)
        solo.batch_size, solo.profile = args.batch_size // dist.world_size, None
        one = DistInfo(0, dist.local_rank, 1, dist.device)
        rows = STAGES[name](solo, one, ctx)
        value = {r.get("loader"): r["images_per_s"] for r in rows}
        print(f"throughput: single-rank baseline for {name}: {value} img/s", file=sys.stderr, flush=True)
    distmod.barrier()
    return distmod.broadcast_object(value)


def run_stage(name: str, args, dist, ctx: dict) -> list[dict]:
    if name == "all":
        return stage_all(args, dist, ctx)
    base = None
    if dist.world_size > 1 and name in ("model", "train"):
        if args.single_rank_images_per_s is not None:
            base = {None: args.single_rank_images_per_s}
        elif args.engine == "ddp" and args.scaling:
            base = single_rank_baseline(name, args, dist, ctx)
    rows = aggregate(STAGES[name](args, dist, ctx), dist)
    for r in rows:
        if r["stage"] in ("model", "train") and "images_per_s" in r:
            add_flops(r, args, dist.device)
        b = None if base is None else base.get(r.get("loader"), base.get(None))
        if b:
            r["single_rank_images_per_s"] = b
            r["scaling_efficiency"] = round(r["images_per_s"] / (dist.world_size * b), 4)
    return rows


# ---------------------------------------------------------------- sweep and out-of-memory

def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
        or isinstance(e, MemoryError))


def guarded(fn, name: str, device: torch.device) -> list[dict]:
    """Run one stage; an out-of-memory error becomes a row saying so (the limit), not a crash."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - only OOM is swallowed, the rest re-raised
        if not is_oom(e):
            raise
        free_memory(device)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"throughput: {name}: out of memory ({first})", file=sys.stderr, flush=True)
        return [{"stage": name, "status": "oom", "error": first}]


def parse_sweep(spec: str, args) -> tuple[str, list]:
    """`batch_size=8,16,32` -> ("batch_size", [8, 16, 32]), values typed like the flag."""
    key, sep, values = spec.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not values:
        cli.usage_error("throughput", f"--sweep {spec!r}: expected KEY=V1,V2,... e.g. batch_size=8,16,32")
    if not hasattr(args, key) or key in ("sweep", "stage", "json", "out", "profile"):
        cli.usage_error("throughput", f"--sweep {spec!r}: {key!r} is not a benchmark setting "
                         f"(e.g. batch_size, size, amp, channels_last, loader, workers)")
    current = getattr(args, key)

    def typed(v: str):
        if isinstance(current, bool):
            if v.lower() not in ("true", "false", "1", "0", "on", "off"):
                cli.usage_error("throughput", f"--sweep {key}: {v!r} is not true/false")
            return v.lower() in ("true", "1", "on")
        if isinstance(current, int):
            return int(v)
        if isinstance(current, float):
            return float(v)
        return v
    return key, [typed(v.strip()) for v in values.split(",") if v.strip()]


def sweep_summary(key: str, rows: list[dict]) -> dict:
    ok = [r["sweep"][key] for r in rows if r.get("status", "ok") == "ok"]
    oom = [r["sweep"][key] for r in rows if r.get("status") == "oom"]
    return {"key": key, "ran": sorted(set(ok), key=ok.index), "out_of_memory": sorted(set(oom), key=oom.index),
            "limit": (f"largest {key} that fits: {max(ok)}" if ok and oom and all(isinstance(v, (int, float)) for v in ok)
                      else ("every value fits" if not oom else "no value fits"))}


# ---------------------------------------------------------------- output

def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def table(rows: list[dict], sweep_key: str | None) -> str:
    head = (["sweep"] if sweep_key else []) + ["stage", "loader", "batch", "amp", "layout", "img/s", "ms/step",
                                               "train/model", "per-rank img/s", "scaling", "GFLOP/img",
                                               "TFLOP/s", "MFU", "peak MiB"]
    lines = []
    for r in rows:
        if r["stage"] == "breakdown":
            continue
        if r.get("status") == "oom":
            cells = ([_fmt(r["sweep"][sweep_key])] if sweep_key else []) + [r["stage"], "OUT OF MEMORY"] + [""] * 12
            lines.append(cells)
            continue
        fl = r.get("flops_per_image_fwd_bwd")
        cells = ([_fmt(r["sweep"][sweep_key])] if sweep_key else []) + [
            r["stage"], r.get("loader", "") + (f"/{r['codec']}" if r.get("codec") and r["stage"] != "model" else ""),
            _fmt(r.get("batch_size")), _fmt(r.get("amp")), "NHWC" if r.get("channels_last") else "NCHW",
            _fmt(r.get("images_per_s"), ".1f"), _fmt(r.get("step_ms"), ".1f"), _fmt(r.get("train_over_model"), ".3f"),
            ",".join(f"{v:.1f}" for v in r["per_rank_images_per_s"]) if r.get("per_rank_images_per_s") else "-",
            _fmt(r.get("scaling_efficiency"), ".3f"), _fmt(None if fl is None else fl / 1e9, ".1f"),
            _fmt(r.get("achieved_tflops"), ".2f"), _fmt(r.get("mfu"), ".3f"), _fmt(r.get("peak_memory_mib"), ".0f")]
        lines.append(cells)
    width = [max(len(str(c)) for c in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, width)).rstrip() for row in [head, *lines]]
    for r in rows:
        if r["stage"] == "breakdown":
            ph = "  ".join(f"{k} {_fmt(v, '.2f')}" for k, v in r["phases_ms"].items())
            out.append(f"step breakdown ({r['loader']}, ms, median of {r['steps']}, {r['timer']}): {ph}"
                       f"  | sum {r['sum_ms']:.2f}" + (f"  | real step {r['train_step_ms']:.2f}"
                                                        if r.get("train_step_ms") else ""))
    return "\n".join(out)


def settings_of(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}


# ---------------------------------------------------------------- command line

@dataclass
class ThroughputArgs:
    """What to measure (see docs/benchmarks.md)."""

    stage: Literal["data", "model", "train", "all"] = "all"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: cli.optional(Path, "--synthetic") = None
    """Packed shard directory (shards/NAME)."""
    synthetic: bool = False
    """Phantoms packed once under --data-dir (what runs without --data)."""
    size: int = 640
    """Training side (the loader's resize target)."""
    batch_size: int = 16
    """GLOBAL batch (per rank = batch / world size)."""
    in_channels: int = 3
    steps: Annotated[int, tyro.conf.arg(aliases=("--batches",))] = 20
    """Timed steps (batches)."""
    warmup: int = 3
    """Untimed steps first (compilation, cuDNN autotune)."""
    channels_last: bool = True
    loader: str = "dali,torch,naive"
    """Data and train stages: comma list of dali, torch, naive."""
    codec: str = "png"
    """--synthetic: comma list of png, jp2, raw, jpeg (data stage: each; train stage: the first)."""
    source_size: int = 512
    """--synthetic: side of the stored phantoms."""
    samples: int = 128
    """--synthetic: phantoms in the benchmark data set."""
    data_dir: str = str(REPO / "shards" / "bench")
    """--synthetic: where they are packed."""
    workers: int = min(os.cpu_count() or 1, 8)
    """DataLoader workers / DALI threads per rank (default: this machine's cores, at most 8)."""
    augment: Literal["none", "light", "standard", "strong"] = "standard"
    repeats: int = 1
    """Data stage: measure every row N times, round-robin; report the best."""
    arch: str = "unet"
    encoder: str = "resnet34"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """auto: bf16 (or fp16) on a GPU, off on CPU; bf16 autocast also runs on CPU."""
    compile: bool = False
    """torch.compile the model."""
    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 0
    """--engine deepspeed: ZeRO stage 0, 1 or 2."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    flops: bool = True
    """Count FLOPs per image with torch.utils.flop_counter (meta device)."""
    scaling: bool = True
    """Under torchrun: also time one rank alone for the scaling efficiency."""
    single_rank_images_per_s: cli.optional(float, "measured with --scaling") = None
    """Under torchrun: one rank's img/s from a separate run (instead of --scaling)."""
    threads: cli.optional(int, "torch's choice") = None
    """torch.set_num_threads for this process."""
    sweep: cli.optional(str, "one run") = None
    """KEY=V1,V2,... e.g. batch_size=8,16,32: one run per value; out-of-memory is reported as
    the limit."""
    json: cli.optional(Path, "none") = None
    """Write one JSON object per row (JSON lines)."""
    out: cli.optional(Path, "none") = None
    """Append the whole JSON document as one line."""
    print_json: bool = False
    """Also print the JSON document on stdout."""
    profile: cli.optional(Path, "no traces") = None
    """Write torch.profiler traces (Perfetto) here."""


def parse(argv: list[str]) -> ThroughputArgs:
    args = cli.parse(ThroughputArgs, argv, name="throughput", prog="python benchmarks/throughput.py",
                     description=__doc__.split("\n\n")[0])
    if args.data is not None and args.synthetic:
        cli.usage_error("throughput", "--data and --synthetic exclude each other")
    for flag, value, known in (("--loader", args.loader, {"dali", "torch", "naive"}),
                               ("--codec", args.codec, {"png", "jp2", "raw", "jpeg"})):
        bad = set(value.split(",")) - known
        if bad:
            cli.usage_error("throughput", f"{flag}: unknown {', '.join(sorted(bad))}; "
                            f"choose from {', '.join(sorted(known))}")
    if args.data is not None and args.loader == "naive" and args.stage != "model":
        cli.usage_error("throughput", "--loader naive reads PNG folders written from the phantoms: use it "
                        "with --synthetic (or add --loader dali,torch to measure --data)")
    if args.data is not None and not (args.data / "manifest.json").is_file():
        cli.usage_error("throughput", f"--data {args.data}: no manifest.json there; pack it first "
                        f"(python -m tumorseg_dist.pack ... --out {args.data}) or use --synthetic")
    if args.steps < 1 or args.warmup < 0:
        cli.usage_error("throughput", "--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    from tumorseg_dist import dist as distmod
    if args.device == "cuda" and not torch.cuda.is_available():
        cli.usage_error("throughput", "--device cuda: no CUDA GPU visible; use --device cpu or auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = distmod.init(args.device)
    if args.batch_size % dist.world_size:
        cli.usage_error("throughput", f"--batch-size {args.batch_size} is the GLOBAL batch and must be divisible by "
                         f"the world size {dist.world_size}")
    prov = provenance(argv, dist.device)   # at the start: date and load average before the run
    prov["world_size"] = dist.world_size
    ctx: dict = {}
    sweep_key, values = parse_sweep(args.sweep, args) if args.sweep else (None, [None])
    rows: list[dict] = []
    for value in values:
        run_args = copy.copy(args)
        if sweep_key is not None:
            setattr(run_args, sweep_key, value)
            if run_args.batch_size % dist.world_size:
                cli.usage_error("throughput", f"--sweep batch_size={value}: not divisible by the world size {dist.world_size}")
        got = guarded(lambda: run_stage(args.stage, run_args, dist, ctx), args.stage, dist.device)
        for r in got:
            r.setdefault("status", "ok")
            if sweep_key is not None:
                r["sweep"] = {sweep_key: value}
        rows += got
    if dist.world_size > 1:   # launched by torchrun (or Slurm): record how
        local = os.environ.get("LOCAL_WORLD_SIZE", "?")
        prov["command"] = prov["command"].replace(
            "python ", f"torchrun --nproc-per-node {local} --nnodes {dist.world_size // int(local) if local.isdigit() else '?'} ", 1)
    doc = {**prov, "stage": args.stage, "settings": settings_of(args), "results": rows}
    if sweep_key is not None:
        doc["sweep_summary"] = sweep_summary(sweep_key, rows)
    if dist.is_main:
        print(table(rows, sweep_key))
        if sweep_key is not None:
            print(f"sweep {sweep_key}: {doc['sweep_summary']['limit']}")
        if args.print_json:
            print(json.dumps(doc, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as f:
                for r in rows:
                    f.write(json.dumps({**prov, "settings": doc["settings"], **r}) + "\n")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(doc) + "\n")
    distmod.cleanup()
    return doc


if __name__ == "__main__":
    main()
