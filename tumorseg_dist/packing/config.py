"""What `python -m tumorseg_dist.pack` is asked to do: one dataclass, its flags and defaults.

The command parses its flags straight into PackConfig (cli.parse, tyro: the field docstrings
are its --help); the pipeline, the Slurm merge and the synthetic set read the same record.
A few flags keep their compact spellings (`--split 0.7,0.2,0.1`, `--shard-size 256MB`,
`--workers 0` = every core), so they have their own small parsers here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import tyro
from tyro.constructors import PrimitiveConstructorSpec

from ..data.formats import ALL_FORMATS, Options
from ..data.formats.volumes import parse_labels, parse_slices, parse_window
from ..data.formats.classes import parse_classes
from ..data.shards import CODECS

_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    try:
        value = int(float(num) * _UNITS[t[len(num):]])
    except (KeyError, ValueError):
        raise ValueError(f"--shard-size {text!r}: use a number with KB, MB or GB, e.g. 256MB") from None
    if value <= 0:
        raise ValueError(f"--shard-size {text!r} must be positive")
    return value


def show_size(value: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if value % _UNITS[unit] == 0:
            return f"{value // _UNITS[unit]}{unit}"
    return str(value)


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise ValueError(f"--split {text!r}: give train,val,test fractions summing to 1, e.g. 0.7,0.2,0.1")
    return parts  # type: ignore[return-value]


def parse_workers(text: str) -> int:
    n = int(text)
    if n < 0:
        raise ValueError("--workers must be >= 0 (0 = one per CPU core)")
    return n or (os.cpu_count() or 1)


def _flag(parse: Callable[[str], Any], show: Callable[[Any], str], metavar: str,
          is_instance: Callable[[Any], bool]) -> PrimitiveConstructorSpec:
    """A flag that takes one word, written and shown in its own compact form."""
    return PrimitiveConstructorSpec(nargs=1, metavar=metavar, instance_from_str=lambda a: parse(a[0]),
                                    is_instance=is_instance, str_from_instance=lambda v: [show(v)])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


Split = Annotated[tuple[float, float, float],
                  _flag(parse_split, lambda v: ",".join(f"{x:g}" for x in v), "TRAIN,VAL,TEST",
                        lambda v: isinstance(v, tuple) and len(v) == 3)]
ShardSize = Annotated[int, _flag(parse_size, show_size, "SIZE", _is_int)]
Workers = Annotated[int, _flag(parse_workers, str, "N", _is_int)]
Format = Literal[ALL_FORMATS]  # type: ignore[valid-type]
Codec = Literal[CODECS]  # type: ignore[valid-type]


@dataclass
class PackConfig:
    """Pack a dataset into WebDataset shards (see docs/pack.md)."""

    input: Annotated[Optional[Path], tyro.conf.Positional, tyro.conf.arg(
        metavar="INPUT", help_behavior_hint="(default: none, for --format synthetic and --merge)")] = None
    """Dataset root folder."""
    out: Path = tyro.MISSING
    """Output shard directory, e.g. shards/NAME."""
    format: Format = "auto"
    """Layout of INPUT; `auto` recognises it from the folder structure (and, with no INPUT,
    means synthetic)."""
    options: Annotated[Options, tyro.conf.arg(name="layout")] = field(default_factory=Options)
    groups: str = "auto"
    """`auto` (patient/case folder from the layout, else one per image), `none`, or FILE.csv
    with columns source,group."""
    split: Split = (0.7, 0.2, 0.1)
    """Train,val,test fractions by group (ignored for formats that come split)."""
    folds: Optional[int] = None
    """K-fold cross-validation: the groups outside the test split (its fraction in --split) go
    to K folds, balanced by sample count, each in its own train shards; train with --fold k."""
    seed: int = 0
    """Seed of the split by group (and of the synthetic phantoms, and of the negatives of
    --slices lesion+N)."""
    codec: Codec = "png"
    """Image codec: png, jp2 (lossless JPEG 2000), raw (.npy), jpeg (lossy, opt-in)."""
    jpeg_quality: int = 95
    shard_size: ShardSize = 256 << 20
    """Bytes per tar, with KB, MB or GB."""
    workers: Workers = 1
    """Decode/encode processes (0 = one per CPU core)."""
    on_error: Literal["fail", "skip"] = "fail"
    """`fail`: stop at the first bad pair; `skip`: leave it out, listed in manifest.json."""
    dry_run: bool = False
    """Detect, pair, split and decode every pair; write nothing."""
    overwrite: bool = False
    """Replace an existing packed dataset."""
    task_index: Optional[int] = None
    """Slurm array: this task's slice of the input list (writes OUT.parts/)."""
    num_tasks: Optional[int] = None
    """Slurm array: number of tasks."""
    merge: bool = False
    """Slurm array: merge OUT.parts/ into OUT."""
    dataset: Annotated[Optional[str], tyro.conf.Suppress] = None
    # "dataset" in each sample's json (None: --out's name); not a flag.
    progress: bool = True
    """Show a progress bar."""
    follow_links: bool = False
    """Every layout but COCO: read files that links inside INPUT lead to outside it (otherwise
    such a pair is bad input, refused like any other)."""
    samples: int = 400
    """synthetic: number of phantoms."""
    size: int = 256
    """synthetic: phantom side length."""

    def __post_init__(self) -> None:
        if self.out is tyro.MISSING:
            raise TypeError("PackConfig needs out (the output shard directory)")
        if self.folds is not None and self.folds < 2:
            raise ValueError(f"--folds {self.folds}: cross-validation needs at least 2 folds (5 is usual)")
        o = self.options
        parse_slices(o.slices)
        parse_labels(o.labels)
        parse_classes(o.classes)
        if o.window is not None:
            if o.intensity == "raw":
                raise ValueError("--window goes with --intensity window (or auto), not with --intensity raw")
            parse_window(o.window)
