"""Pack a dataset into WebDataset shards: `python -m tumorseg_dist.pack INPUT --out shards/NAME`.

The built-in synthetic set needs no INPUT: `python -m tumorseg_dist.pack --format synthetic
--out shards/synthetic --samples 400 --size 256`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data.shards import CODECS, ShardError
from .data.synthetic import pack_synthetic


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    unit = t[len(num):]
    if unit not in units or not num:
        raise argparse.ArgumentTypeError(f"--shard-size {text!r}: use a number with KB, MB or GB, e.g. 256MB")
    return int(float(num) * units[unit])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tumorseg_dist.pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", type=Path, help="dataset root (not needed for --format synthetic)")
    p.add_argument("--out", type=Path, required=True, help="output shard directory, e.g. shards/NAME")
    p.add_argument("--format", default="synthetic", choices=["synthetic"])
    p.add_argument("--samples", type=int, default=400, help="synthetic: number of phantoms")
    p.add_argument("--size", type=int, default=256, help="synthetic: phantom side length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", default="png", choices=CODECS)
    p.add_argument("--shard-size", type=parse_size, default=256 << 20)
    p.add_argument("--overwrite", action="store_true", help="replace an existing packed dataset")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        m = pack_synthetic(args.out, args.samples, args.size, args.seed, args.codec,
                           shard_size=args.shard_size, overwrite=args.overwrite)
    except (ShardError, ValueError) as e:
        print(f"pack: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v['samples']}" for k, v in m["splits"].items())
    print(f"packed {args.format} -> {args.out} ({counts}; codec {m['codec']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
