"""Pack throughput: images/s for --workers 1 vs N, per codec, and shard bytes per image; and
volumes: slices/s and bytes per 16-bit slice for png (16-bit PNG), jp2 and raw.

    python benchmarks/pack.py --images 96 --size 640 --workers 1,2 --codec png,jp2,raw,jpeg --volumes 8

Generates a `folders` dataset of phantom images (640×640 grey by default, `--channels 3` for
RGB) once under a temp dir, then times the real CLI path (`tumorseg_dist.pack` scan -> workers
-> tar writer) for every (codec, workers) pair, best of `--repeat`. Prints one JSON document with
the machine, date, commit and command. The volume rows (`--volumes N` CT-like phantom cases,
`tumorseg_dist.data.volume_phantoms`, int16 HU, nnU-Net layout) pack every slice with
`--intensity raw`. On a 2-core machine only the ratios within one run mean
anything (other processes share the cores); `cpu_ms_per_image` (this process and its workers)
does not depend on the load, and `cpu_utilisation` shows how many cores the run actually got.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tumorseg_dist import cli  # noqa: E402
from tumorseg_dist.data.formats import Options  # noqa: E402
from tumorseg_dist.packing.pipeline import PackConfig, run  # noqa: E402
from tumorseg_dist.data.phantoms import phantom  # noqa: E402


def provenance(argv: list[str]) -> dict:
    """The shared benchmark provenance (device, versions, date, commit, command, load)."""
    import torch
    from _provenance import provenance as base
    doc = base(argv, torch.device("cpu"), script="benchmarks/pack.py")
    import PIL
    doc["versions"].update(numpy=np.__version__, pillow=PIL.__version__)
    return doc


def make_dataset(root: Path, n: int, size: int, channels: int) -> None:
    for i in range(n):
        img, mask = phantom(i, size, seed=0)
        if channels == 3:
            img = np.stack([img, np.roll(img, 3, axis=0), np.roll(img, 3, axis=1)], axis=2)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{i}.png")


def _cpu_seconds() -> float:
    """User+system CPU of this process and its reaped children (the pool's workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def time_pack(root: Path, out: Path, codec: str, workers: int, repeat: int) -> tuple[float, float, int]:
    """Best wall time, the CPU seconds of that run, and the total tar bytes."""
    best, cpu = float("inf"), 0.0
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        cfg = PackConfig(root, out, format="folders", options=Options(), codec=codec, workers=workers,
                         progress=False)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        run(cfg, log=lambda m: None)
        dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
        if dt < best:
            best, cpu = dt, dc
    size = sum(p.stat().st_size for p in out.glob("*.tar"))
    return best, cpu, size


@dataclass
class PackBenchArgs:
    """What to time (see docs/benchmarks.md)."""

    images: int = 96
    size: int = 640
    channels: Literal[1, 3] = 1
    workers: str = f"1,{os.cpu_count() or 1}"
    """Comma list of --workers values to time (1 and this machine's cores)."""
    codec: str = "png,jp2,raw,jpeg"
    """Comma list of codecs."""
    repeat: int = 1
    """Best of this many runs per (codec, workers)."""
    volumes: int = 4
    """Phantom CT cases for the volume rows (0: none)."""
    volume_shape: str = "256,256,32"
    """X,Y,Z voxels of each phantom case."""
    volume_codec: str = "png,jp2,raw"
    """Comma list of codecs for the volume rows (16-bit: no jpeg)."""
    json: cli.optional(Path, "none") = None
    """Also write the JSON here."""


def time_volumes(root: Path, out: Path, codec: str, workers: int, repeat: int) -> tuple[float, float, int, int]:
    """Best wall time, its CPU seconds, the total tar bytes and the slices packed."""
    from tumorseg_dist.data.shards import read_manifest
    best, cpu = float("inf"), 0.0
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        cfg = PackConfig(root, out, format="nnunet", options=Options(intensity="raw"), codec=codec,
                         workers=workers, progress=False)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        run(cfg, log=lambda m: None)
        dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
        if dt < best:
            best, cpu = dt, dc
    slices = sum(v["samples"] for v in read_manifest(out)["splits"].values())
    return best, cpu, sum(p.stat().st_size for p in out.glob("*.tar")), slices


def volume_rows(a: PackBenchArgs, workers: list[int], tmp: Path) -> tuple[dict, list[dict]]:
    from tumorseg_dist.data.volume_phantoms import write_dataset
    shape = tuple(int(x) for x in a.volume_shape.split(","))
    root = write_dataset(tmp / "volumes", a.volumes, shape)
    info = {"cases": a.volumes, "shape": list(shape), "raw16_bytes_per_slice": shape[0] * shape[1] * 2,
            "nifti_gz_bytes_per_slice": round(sum(f.stat().st_size for f in (root / "imagesTr").iterdir())
                                              / (a.volumes * shape[2]))}
    rows = []
    for codec in a.volume_codec.split(","):
        base = None
        for w in workers:
            dt, cpu, size, n = time_volumes(root, tmp / f"vout-{codec}-{w}", codec, w, a.repeat)
            sps = n / dt
            base = base or sps
            rows.append({"kind": "volume", "codec": codec, "workers": w, "slices": n, "seconds": round(dt, 3),
                         "slices_per_s": round(sps, 2), "speedup_vs_1_worker": round(sps / base, 2),
                         "cpu_ms_per_slice": round(1000 * cpu / n, 1), "bytes_per_slice": round(size / n)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return info, rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = cli.parse(PackBenchArgs, argv, name="pack-bench", prog="python benchmarks/pack.py", description=__doc__)
    workers = sorted({int(w) for w in a.workers.split(",")})
    doc = {**provenance(argv), "images": a.images, "size": a.size, "channels": a.channels, "rows": []}
    with tempfile.TemporaryDirectory(prefix="pack-bench-") as tmp:
        root = Path(tmp) / "data"
        make_dataset(root, a.images, a.size, a.channels)
        src_bytes = sum(f.stat().st_size for f in (root / "images").iterdir())
        doc["source_png_bytes_per_image"] = round(src_bytes / a.images)
        for codec in a.codec.split(","):
            base = None
            for w in workers:
                dt, cpu, size = time_pack(root, Path(tmp) / f"out-{codec}-{w}", codec, w, a.repeat)
                ips = a.images / dt
                base = base or ips
                row = {"codec": codec, "workers": w, "seconds": round(dt, 3), "images_per_s": round(ips, 2),
                       "speedup_vs_1_worker": round(ips / base, 2),
                       "cpu_ms_per_image": round(1000 * cpu / a.images, 1),
                       "cpu_utilisation": round(cpu / dt, 2),
                       "shard_bytes_per_image": round(size / a.images)}
                doc["rows"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        if a.volumes:
            doc["volumes"], rows = volume_rows(a, workers, Path(tmp))
            doc["rows"] += rows
    from _provenance import emit
    emit(doc, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
