"""Throughput benchmarks, one function per stage; prints one JSON document with provenance.

    python benchmarks/throughput.py --stage data --loader dali,torch,naive --codec png,jp2,raw,jpeg

`--stage data`: images/s delivered to the device by each loader (decode + resize + augment +
normalise + copy), on synthetic phantoms packed once per codec under `--data-dir`. `naive` is the
seeds' way (PIL + albumentations + DataLoader on a folder of PNG files, benchmarks/naive_loader.py)
with the same number of workers; `torch` and `dali` are our `--loader torch|dali`. Rows from a
2-core CPU machine are only meaningful as ratios between loaders measured in the same run.

Other stages (model, train) plug in as further `stage_*` functions registered in STAGES.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ---------------------------------------------------------------- provenance

def _version(mod: str) -> str | None:
    try:
        import importlib
        return importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001 - optional packages
        return None


def provenance(argv: list[str], device: torch.device) -> dict:
    """Device, versions, date, commit and command: every benchmark row carries these."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    text=True, capture_output=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {
        "device": dev, "cpu_count": os.cpu_count(), "load_average_1min_at_start": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit, "git_dirty": dirty,
        "command": " ".join(["python", "benchmarks/throughput.py", *argv]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "dali": _version("nvidia.dali"),
                     "torchvision": _version("torchvision"), "albumentations": _version("albumentations")},
    }


# ---------------------------------------------------------------- stage: data

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


def _time_batches(batches, warmup: int, measure: int, device: torch.device) -> dict:
    """Consume `warmup` then `measure` batches; images/s over the measured ones."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    sync()
    t0, images = time.perf_counter(), 0
    for _ in range(measure):
        img = next(it)
        images += img.shape[0]
    sync()
    dt = time.perf_counter() - t0
    return {"images": images, "seconds": round(dt, 3), "images_per_s": round(images / dt, 2)}


def _epochs(loader, to_image):
    """Endless batches over successive epochs (set_epoch each time, as the loop does)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for b in loader:
            yield to_image(b)
        epoch += 1


def stage_data(args, device: torch.device) -> list[dict]:
    from tumorseg_dist.data.augment import PRESETS
    from tumorseg_dist.dist import DistInfo
    loaders, codecs = args.loader.split(","), args.codec.split(",")
    data = prepare_data(Path(args.data_dir), args.samples, args.source_size,
                        [c for c in codecs if {"dali", "torch"} & set(loaders)], "naive" in loaders)
    aug = PRESETS[args.augment]
    dist = DistInfo(0, 0, 1, device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    rows: dict[tuple[str, str], dict] = {}
    # Round-robin repeats, best of N: on a shared machine other processes come and go, and the
    # fastest repeat is the one least disturbed by them (every row gets the same chances).
    for rep in range(args.repeats):
        for name in loaders:
            for codec in (codecs if name != "naive" else ["png-files"]):
                res = _measure(name, codec, data, aug, dist, fmt, args, device)
                row = rows.setdefault((name, codec), {
                    "stage": "data", "loader": name, "codec": codec, "size": args.size,
                    "source_size": args.source_size, "in_channels": args.in_channels,
                    "batch_size": args.batch_size, "workers": args.workers, "augment": args.augment,
                    "images_per_run": res["images"], "runs_images_per_s": []})
                row["runs_images_per_s"].append(res["images_per_s"])
                row["images_per_s"] = max(row["runs_images_per_s"])
                print(json.dumps({"repeat": rep, "loader": name, "codec": codec, **res}), file=sys.stderr, flush=True)
    return list(rows.values())


def _measure(name, codec, data, aug, dist, fmt, args, device) -> dict:
    from tumorseg_dist.data.loader import LoaderSpec, TorchLoader, norm_stats
    from tumorseg_dist.data.shards import read_manifest
    shard_dir = data[codec] if name != "naive" else data["folders"]
    c = args.in_channels
    mean, std = (norm_stats(read_manifest(shard_dir), c) if (shard_dir / "manifest.json").is_file()
                 else ((0.5,) * c, (0.25,) * c))
    if name == "naive":
        from naive_loader import naive_loader
        dl = naive_loader(shard_dir, args.size, c, args.batch_size, args.workers, aug, mean, std,
                          pin=device.type == "cuda")

        def to_image(b):
            return b[0].to(device, non_blocking=True).contiguous(memory_format=fmt)
    else:
        spec = LoaderSpec(shard_dir=shard_dir, split="train", training=True, size=args.size,
                          in_channels=c, batch_size=args.batch_size, mean=mean, std=std, augment=aug,
                          seed=0, num_workers=args.workers, channels_last=args.channels_last)
        if name == "dali":
            from tumorseg_dist.data.dali import DaliLoader
            dl = DaliLoader(spec, dist)
        else:
            dl = TorchLoader(spec, dist)

        def to_image(b):
            return b.image
    gen = _epochs(dl, to_image)
    try:
        return _time_batches(gen, args.warmup, args.batches, device)
    finally:
        gen.close()   # stop DataLoader workers / release the DALI pipeline before the next row


STAGES = {"data": stage_data}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=sorted(STAGES), default="data")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g = p.add_argument_group("data stage")
    g.add_argument("--loader", default="dali,torch,naive", help="comma list of dali, torch, naive")
    g.add_argument("--codec", default="png,jp2,raw,jpeg", help="comma list of shard codecs (dali/torch)")
    g.add_argument("--size", type=int, default=640, help="loader output side (resize target)")
    g.add_argument("--source-size", type=int, default=512, help="side of the stored phantoms")
    g.add_argument("--in-channels", type=int, default=3)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="DataLoader workers / DALI threads")
    g.add_argument("--augment", default="standard", choices=["none", "light", "standard", "strong"])
    g.add_argument("--samples", type=int, default=128, help="phantoms in the benchmark data set")
    g.add_argument("--warmup", type=int, default=3, help="batches before timing")
    g.add_argument("--batches", type=int, default=20, help="timed batches")
    g.add_argument("--repeats", type=int, default=1, help="measure every row N times, round-robin; report the best")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--data-dir", default=str(REPO / "shards" / "bench"))
    p.add_argument("--out", type=Path, default=None, help="also append the JSON document to this file")
    args = p.parse_args(argv)
    bad = set(args.loader.split(",")) - {"dali", "torch", "naive"}
    if bad:
        p.error(f"--loader: unknown {', '.join(sorted(bad))}; choose from dali, torch, naive")
    bad = set(args.codec.split(",")) - {"png", "jp2", "raw", "jpeg"}
    if bad:
        p.error(f"--codec: unknown {', '.join(sorted(bad))}; choose from png, jp2, raw, jpeg")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible; use --device cpu or auto")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    doc = {**provenance(argv, device), "stage": args.stage, "results": STAGES[args.stage](args, device)}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(doc) + "\n")
    return doc


if __name__ == "__main__":
    main()
