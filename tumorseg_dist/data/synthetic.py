"""The `synthetic` format: phantoms packed through the same shard writer as real data."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from .phantoms import phantom, phantom_group
from .shards import Sample, assign_splits, output_is_complete, read_manifest, write_dataset

DEFAULT_SPLIT = (0.7, 0.2, 0.1)


def synthetic_samples(n: int, size: int, seed: int,
                      split: tuple[float, float, float] = DEFAULT_SPLIT) -> Iterator[Sample]:
    groups = [phantom_group(i) for i in range(n)]
    split_of = assign_splits(groups, split, seed)
    for i in range(n):
        image, mask = phantom(i, size, seed)
        yield Sample(key=f"phantom_{i:06d}", image=image, mask=mask, source=f"phantom/{i:06d}",
                     mask_sources=[f"phantom/{i:06d}"], group=groups[i], dataset="synthetic",
                     split=split_of[groups[i]])


def synthetic_fingerprint(n: int, size: int, seed: int, split, codec: str) -> str:
    spec = {"format": "synthetic", "samples": n, "size": size, "seed": seed,
            "split": list(split), "codec": codec}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def pack_synthetic(out: Path, n: int = 400, size: int = 256, seed: int = 0, codec: str = "png",
                   split=DEFAULT_SPLIT, shard_size: int = 256 << 20, overwrite: bool = False,
                   progress=None) -> dict:
    if n < 10:
        raise ValueError(f"--samples must be at least 10 so every split gets a sample, got {n}")
    return write_dataset(synthetic_samples(n, size, seed, split), out, fmt="synthetic",
                         input_root="<synthetic>", codec=codec, shard_size=shard_size,
                         fingerprint=synthetic_fingerprint(n, size, seed, split, codec),
                         extra={"synthetic": {"samples": n, "size": size, "seed": seed}},
                         overwrite=overwrite, progress=progress)


def default_synthetic_dir(root: Path, n: int, size: int, seed: int = 0) -> Path:
    return Path(root) / f"synthetic-n{n}-s{size}-seed{seed}"


def ensure_synthetic(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """The built-in data set, packed once and cached under `root`."""
    out = default_synthetic_dir(root, n, size, seed)
    if not output_is_complete(out) or read_manifest(out).get("fingerprint") != synthetic_fingerprint(
            n, size, seed, DEFAULT_SPLIT, "png"):
        pack_synthetic(out, n, size, seed, overwrite=True)
    return out
