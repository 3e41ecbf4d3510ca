"""Dice+BCE loss forward+backward: PyTorch reference vs torch.compile(reference) vs fused Triton.

    python benchmarks/loss.py [--size 640] [--batch-size 32] [--dtype bf16] [--classes 1] [--json]

Synthetic logits (N×1×S×S, --dtype, optionally --channels-last) and uint8 masks. With
--classes K > 1 the K-class softmax Dice + cross-entropy instead (losses.reference_dice_ce and
fused_dice_ce): N×K×S×S logits and N×S×S uint8 label maps (80 % background, the rest spread
evenly over classes 1..K-1); K = 1 is the binary loss, with the same output as before the flag. Each timed
iteration is one forward and one backward of the loss alone; variants are warmed up (compiled)
first, then timed interleaved, round robin, so a busy machine slows them alike. Prints one JSON object (--json) or a
short table followed by it: device, versions, date, git commit, the full command, settings, per
variant median/min time and peak memory above the inputs, and a roofline line (bytes a single
fused forward+backward must move, and the fraction of the GPU's memory bandwidth achieved).

On CPU it times reference vs compiled and records the fused kernel as skipped: compiled Triton
needs a CUDA GPU, and the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool only.
CPU numbers from a small shared machine are only meaningful as ratios between variants measured
in the same run.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tumorseg_dist import cli
from tumorseg_dist.losses import reference_dice_bce, reference_dice_ce

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LossBenchArgs:
    """What to time (see docs/benchmarks.md)."""

    size: int = 640
    """Image side S (N×1×S×S)."""
    batch_size: int = 32
    dtype: Literal["fp32", "fp16", "bf16"] = "bf16"
    """Logits dtype."""
    channels_last: bool = False
    """Logits in channels_last format."""
    dice_reduction: Literal["batch", "image"] = "batch"
    pos_weight: cli.optional(float, "none") = None
    """Binary loss only (--classes 1)."""
    classes: int = 1
    """K: 1 = the binary sigmoid Dice+BCE; K ≥ 2 = the K-class softmax Dice + cross-entropy."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    iters: int = 20
    """Timed iterations per variant."""
    warmup: int = 3
    """Untimed iterations (compilation) first."""
    variants: str = "reference,compiled,fused"
    """Comma list of reference, compiled, fused."""
    threads: cli.optional(int, "torch's choice") = None
    """CPU: torch.set_num_threads (1 avoids OpenMP stalls on a busy shared box)."""
    peak_bandwidth_gbs: cli.optional(float, "from CUDA properties") = None
    """Device memory bandwidth for the roofline."""
    json: bool = False
    """Print only the JSON object."""


def parse_args(argv=None) -> LossBenchArgs:
    return cli.parse(LossBenchArgs, argv, name="loss", prog="python benchmarks/loss.py",
                     description=__doc__.split("\n\n")[0])


def git_commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--", "tumorseg_dist", "benchmarks"))}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        bw = 2 * prop.memory_clock_rate * 1e3 * prop.memory_bus_width / 8 / 1e9  # DDR, GB/s
        return {"name": prop.name, "type": "cuda", "sms": prop.multi_processor_count,
                "memory_gib": round(prop.total_memory / 2**30, 1), "peak_bandwidth_gbs": round(bw, 1),
                "cuda": torch.version.cuda}
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"name": cpu, "type": "cpu", "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "peak_bandwidth_gbs": None}


def make_inputs(args, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    if args.classes > 1:
        return make_multiclass_inputs(args, device, gen)
    shape = (args.batch_size, 1, args.size, args.size)
    x = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=DTYPES[args.dtype])
    t = (torch.rand(shape, generator=gen) < 0.2).to(device=device, dtype=torch.uint8)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        t = t.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), t


def make_multiclass_inputs(args, device, gen):
    k, shape = args.classes, (args.batch_size, args.size, args.size)
    x = (torch.randn((shape[0], k, *shape[1:]), generator=gen) * 3).to(device=device,
                                                                         dtype=DTYPES[args.dtype])
    fg = torch.rand(shape, generator=gen) < 0.2
    t = torch.where(fg, torch.randint(1, k, shape, generator=gen), 0).to(device=device,
                                                                          dtype=torch.uint8)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), t


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_bytes(step) -> int:
    """Peak CPU bytes allocated by torch above the level before `step()` (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def make_step(fn, x, t, args):
    kw = dict(dice_reduction=args.dice_reduction)
    if args.classes == 1:
        kw["pos_weight"] = args.pos_weight

    def step():
        x.grad = None
        loss = fn(x, t, **kw)
        loss.backward()
        return loss
    return step


def time_once(step, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def peak_extra_bytes(step, x, device) -> int:
    x.grad = None
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = cpu_peak_bytes(step)
    x.grad = None
    return int(peak)


def measure_all(fns: dict, x, t, args, device) -> dict:
    """Warm up every variant, then time them interleaved (round robin), so that a busy shared
    machine slows all variants alike and the ratios stay meaningful."""
    steps = {name: make_step(fn, x, t, args) for name, fn in fns.items()}
    out = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(max(1, args.warmup)):
            loss = step()
        sync(device)
        out[name] = {"warmup_s": round(time.perf_counter() - t0, 3), "loss": float(loss.detach()),
                     "times": []}
    for _ in range(args.iters):
        for name, step in steps.items():
            out[name]["times"].append(time_once(step, device))
    full_fp32 = x.numel() * 4
    for name, step in steps.items():
        times = out[name].pop("times")
        peak = peak_extra_bytes(step, x, device)
        out[name].update({"median_ms": round(statistics.median(times), 4),
                          "min_ms": round(min(times), 4), "mean_ms": round(statistics.fmean(times), 4),
                          "iters": len(times), "peak_extra_bytes": peak,
                          "peak_extra_in_full_fp32_tensors": round(peak / full_fp32, 3)})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        cli.usage_error("loss", "--device cuda requested but torch.cuda.is_available() is False")
    if args.classes < 1:
        cli.usage_error("loss", f"--classes must be ≥ 1, got {args.classes}")
    if args.classes > 1 and args.pos_weight is not None:
        cli.usage_error("loss", "--pos-weight is for the binary loss (--classes 1); the K-class "
                                "loss weights classes instead")

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    x, t = make_inputs(args, device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    fns, results = {}, {}
    reference = reference_dice_bce if args.classes == 1 else reference_dice_ce
    for name in variants:
        if name == "reference":
            fns[name] = reference
        elif name == "compiled":
            fns[name] = torch.compile(reference)
        elif name == "fused":
            if device.type != "cuda":
                results[name] = {"skipped": "the fused Triton kernel needs a CUDA GPU; on CPU it "
                                            "only runs under TRITON_INTERPRET=1, which is for "
                                            "correctness tests, not timing"}
                continue
            from tumorseg_dist.losses import fused_dice_bce, fused_dice_ce
            fns[name] = fused_dice_bce if args.classes == 1 else fused_dice_ce
        else:
            sys.exit(f"unknown variant {name!r}: use reference, compiled, fused")
    results = {**measure_all(fns, x, t, args, device), **results}

    ref = results.get("reference", {}).get("median_ms")
    for r in results.values():
        if ref and "median_ms" in r:
            r["speedup_vs_reference"] = round(ref / r["median_ms"], 3)

    info = device_info(device)
    peak_bw = args.peak_bandwidth_gbs or info["peak_bandwidth_gbs"]
    n = x.numel()
    logits_b, target_b = n * x.element_size(), n * t.element_size()
    # fused forward reads logits+targets once; backward reads them again and writes the gradient
    # (K classes: the logits are K times larger, the label map is one byte per pixel)
    min_bytes = 2 * (logits_b + target_b) + logits_b
    roofline = {"bytes_per_call": min_bytes,
                "definition": "fwd reads logits+targets, bwd reads logits+targets and writes "
                              "grad (logits dtype): 3*logits + 2*targets bytes",
                "peak_bandwidth_gbs": peak_bw}
    for name, r in results.items():
        if "median_ms" in r:
            gbs = min_bytes / (r["median_ms"] * 1e-3) / 1e9
            roofline[f"{name}_achieved_gbs"] = round(gbs, 2)
            roofline[f"{name}_fraction_of_peak"] = round(gbs / peak_bw, 4) if peak_bw else None

    report = {
        "benchmark": "loss",
        "device": info,
        "versions": {"torch": torch.__version__, "triton": triton_version,
                     "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "settings": {"size": args.size, "batch_size": args.batch_size, "dtype": args.dtype,
                     "channels_last": args.channels_last, "dice_reduction": args.dice_reduction,
                     "pos_weight": args.pos_weight, "target_dtype": "uint8",
                     "threads": torch.get_num_threads(), "iters": args.iters, "warmup": args.warmup, "shape": list(x.shape)},
        "results": results,
        "roofline": roofline,
    }
    if args.classes > 1:       # K = 1 reports exactly what it did before --classes existed
        report["settings"].update({"classes": args.classes, "loss": "dice_ce",
                                   "target_shape": list(t.shape)})
    if not args.json:
        print(f"loss fwd+bwd  {info['name']}  {tuple(x.shape)} {args.dtype}"
              f"{' channels_last' if args.channels_last else ''}"
              f"{f'  {args.classes} classes (softmax Dice + CE)' if args.classes > 1 else ''}")
        for name, r in results.items():
            if "skipped" in r:
                print(f"  {name:<10} skipped: {r['skipped']}")
            else:
                print(f"  {name:<10} median {r['median_ms']:9.3f} ms  min {r['min_ms']:9.3f} ms"
                      f"  x{r.get('speedup_vs_reference', 1):.2f}"
                      f"  peak +{r['peak_extra_bytes'] / 2**20:.1f} MiB"
                      f" ({r['peak_extra_in_full_fp32_tensors']} full fp32 tensors)")
        print(f"  roofline: {min_bytes / 2**20:.1f} MiB per call; peak bandwidth "
              f"{peak_bw if peak_bw else 'unknown (CPU)'} GB/s")
    print(json.dumps(report, indent=None if args.json else 2))
    return report


if __name__ == "__main__":
    main()
