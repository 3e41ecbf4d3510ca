"""Pack a dataset into WebDataset shards: `python -m tumorseg_dist.pack INPUT --out shards/NAME`.

Formats (--format auto recognises them from the folder structure and says why):
  folders    ROOT/<images dir>/X + ROOT/<masks dir>/X     (image/+mask/, data/temp/+mask/temp/ ...)
  suffix     X.ext + X_mask.ext (+ X_mask_1.ext ...) side by side, any depth   (LGG, BUSI)
  coco       ROOT/{train,valid,test}/_annotations.coco.json + images   (splits kept, valid -> val)
  lidc       PATIENT/nodule-K/images/slice-S.png + PATIENT/nodule-K/mask-R/slice-S.png
  synthetic  built-in phantoms, no INPUT: --format synthetic --out shards/synthetic --samples 400 --size 256

Output: OUT/{train,val,test}-NNNNNN.tar (+ DALI .idx) and OUT/manifest.json, written atomically.
Slurm: slurm/pack.sh runs one slice per array task (--task-index/--num-tasks), then --merge.
See docs/pack.md.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

# Only light imports here: main() installs the stop-signal handler first and then imports the
# rest (numpy, Pillow, scipy: about 2 s), so a Ctrl-C during start-up is one message too.
from .packing.signals import stop_on_signals


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    unit = t[len(num):]
    try:
        value = int(float(num) * units[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"--shard-size {text!r}: use a number with KB, MB or GB, e.g. 256MB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--shard-size {text!r} must be positive")
    return value


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"--split {text!r}: give train,val,test fractions summing to 1, e.g. 0.7,0.2,0.1")
    return parts  # type: ignore[return-value]


def parse_fusion(text: str) -> str:
    if text in ("any", "majority") or (text.startswith("reader:") and text[7:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"--mask-fusion {text!r}: use any, majority or reader:K (e.g. reader:0)")


def parse_workers(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("--workers must be >= 0 (0 = one per CPU core)")
    return n or (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    from .data.formats import ALL_FORMATS
    from .data.shards import CODECS
    p = argparse.ArgumentParser(prog="python -m tumorseg_dist.pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", type=Path, help="dataset root folder (not needed for --format synthetic)")
    p.add_argument("--out", type=Path, required=True, help="output shard directory, e.g. shards/NAME")
    p.add_argument("--format", default=None, choices=ALL_FORMATS,
                   help="layout of INPUT (default: auto with INPUT, synthetic without)")
    g = p.add_argument_group("layout")
    g.add_argument("--images-dir", help="folders: the images folder, relative to INPUT")
    g.add_argument("--masks-dir", help="folders: the masks folder, relative to INPUT")
    g.add_argument("--mask-suffix", default="_mask", help="suffix: X.ext pairs with X<SUFFIX>.ext (default _mask)")
    g.add_argument("--mask-fusion", default="any", type=parse_fusion,
                   help="lidc: any (default), majority (more than half of the readers) or reader:K")
    g.add_argument("--categories", help="coco: comma-separated category names, or id:N; default all")
    g.add_argument("--follow-links", action="store_true",
                   help="folders/suffix/lidc: read files that links inside INPUT lead to outside it "
                        "(default: such a pair is bad input, refused like any other)")
    g.add_argument("--groups", default="auto",
                   help="auto (patient/case folder from the layout, else one per image), none, or FILE.csv "
                        "with columns source,group")
    s = p.add_argument_group("splits and output")
    s.add_argument("--split", type=parse_split, default=(0.7, 0.2, 0.1),
                   help="train,val,test fractions by group (default 0.7,0.2,0.1; ignored for given splits)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--codec", default="png", choices=CODECS,
                   help="image codec: png (default), jp2 (lossless JPEG 2000), raw (.npy), jpeg (lossy, opt-in)")
    s.add_argument("--jpeg-quality", type=int, default=95)
    s.add_argument("--shard-size", type=parse_size, default=256 << 20, help="bytes per tar (default 256MB)")
    r = p.add_argument_group("running")
    r.add_argument("--workers", type=parse_workers, default=1, help="decode/encode processes (0 = all cores)")
    r.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="fail (default): stop at the first bad pair; skip: leave it out, list it in manifest.json")
    r.add_argument("--dry-run", action="store_true", help="detect, pair, split and decode every pair; write nothing")
    r.add_argument("--overwrite", action="store_true", help="replace an existing packed dataset")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--task-index", type=int, help="Slurm array: this task's index (writes OUT.parts/)")
    r.add_argument("--num-tasks", type=int, help="Slurm array: number of tasks")
    r.add_argument("--merge", action="store_true", help="Slurm array: merge OUT.parts/ into OUT")
    syn = p.add_argument_group("synthetic")
    syn.add_argument("--samples", type=int, default=400, help="synthetic: number of phantoms")
    syn.add_argument("--size", type=int, default=256, help="synthetic: phantom side length")
    return p


def _pack(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .data.formats import LayoutError, Options
    from .packing.pipeline import PackConfig, run
    fmt = args.format or ("auto" if args.input is not None else "synthetic")
    if args.merge:
        from .packing.merge import merge_parts
        merge_parts(args.out, overwrite=args.overwrite)
        return 0
    if fmt == "synthetic":
        from .data.synthetic import pack_synthetic
        try:
            m = pack_synthetic(args.out, args.samples, args.size, args.seed, args.codec,
                               split=args.split, shard_size=args.shard_size, overwrite=args.overwrite)
        except ValueError as e:
            raise LayoutError(str(e)) from e
        counts = ", ".join(f"{k} {v['samples']}" for k, v in m["splits"].items())
        print(f"packed synthetic -> {args.out} ({counts}; codec {m['codec']})")
        return 0
    if args.input is None:
        parser.error(f"INPUT is required for --format {fmt}")
    if (args.task_index is None) != (args.num_tasks is None):
        parser.error("--task-index and --num-tasks go together")
    cfg = PackConfig(input=args.input, out=args.out, format=fmt,
                     options=Options(args.images_dir, args.masks_dir, args.mask_suffix, args.mask_fusion,
                                     args.categories),
                     groups=args.groups, split=args.split, seed=args.seed, codec=args.codec,
                     jpeg_quality=args.jpeg_quality, shard_size=args.shard_size, workers=args.workers,
                     on_error=args.on_error, dry_run=args.dry_run, overwrite=args.overwrite,
                     task_index=args.task_index, num_tasks=args.num_tasks,
                     progress=not args.no_progress, follow_links=args.follow_links)
    run(cfg)
    return 0


def _target(args: argparse.Namespace) -> Path:
    """The folder this command publishes (a Slurm array task: its part folder)."""
    if args.task_index is not None and args.num_tasks is not None and not args.merge:
        from .packing.merge import part_dir
        return part_dir(args.out, args.task_index, args.num_tasks)
    return Path(args.out)


def _stamp(out: Path) -> tuple[int, int] | None:
    """Identity of OUT's manifest: a new one appears only when a pack is published."""
    from .data.shards import MANIFEST
    try:
        st = (out / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def main(argv: list[str] | None = None, *, restore_signals: bool = True) -> int:
    # One handler for the whole command, so a stop signal at any moment (start-up, planning,
    # packing, the publish, this function's last lines) ends in one of the two messages below.
    with stop_on_signals(restore=restore_signals) as stop:
        out = before = None
        try:
            from .data.formats import LayoutError, PackInputError
            from .data.shards import ShardError
            from .packing.pipeline import PackAbort
            from .packing.workers import WorkerDied
            parser = build_parser()
            args = parser.parse_args(argv)
            out = _target(args)
            before = _stamp(out)
            try:
                rc = _pack(args, parser)
            except (ShardError, LayoutError, PackAbort, PackInputError, WorkerDied) as e:
                print(f"pack: error: {e}", file=sys.stderr)
                rc = 2
            stop.finish()
        except KeyboardInterrupt:
            stop.finish()
            rc = 130
            # The filesystem says which side of the atomic rename the signal landed on.
            if out is not None and _stamp(out) not in (before, None):
                print(f"pack: interrupted after {out} was complete: it is whole and usable, nothing to redo",
                      file=sys.stderr)
            else:
                print("pack: interrupted; nothing was written (an existing output is unchanged)", file=sys.stderr)
    if rc == 0 and stop.late:
        print(f"pack: {signal.Signals(stop.late).name} arrived after the work was done; {out} is as reported above",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    # The process ends here: a signal from now on finds the result decided and its message
    # printed, so it is recorded rather than allowed to interrupt or kill the exit.
    sys.exit(main(restore_signals=False))
