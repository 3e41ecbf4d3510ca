"""Scan -> group -> split -> decode/encode in N processes -> write shards, in a fixed order.

The main process only looks at names, assigns splits and writes tars; workers decode images and
masks and encode the tar members. Results come back in input order through a bounded window of
pending chunks, so the output is byte-identical for any `--workers` and memory stays bounded
(a few chunks of encoded samples, never the whole dataset).
"""
from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..data.shards import (CODECS, SPLITS, EncodedSample, Sample, ShardError, assign_folds, assign_splits,
                      check_output, encode_sample, write_dataset)
from ..data.formats import FORMATS, VOLUME_FORMATS, detect
from ..data.formats.common import (JPEG_EXTS, VOLUME_OPTIONS, Item, LayoutError, Options, PackInputError, Scan,
                                   load_item, walk)
from ..data.formats.volumes import load_case, summary

from ..data.formats.common import links_outside
from ..data.formats.classes import ClassCounts, counts as class_counts, parse_classes
from .config import PackConfig
from .signals import hold, stop_on_signals
from .workers import ordered_map as workers_map

CHUNK = 4   # items per worker task


class PackAbort(RuntimeError):
    """A bad input under --on-error fail; the message names the file and the fix."""


# ---------------------------------------------------------------- planning (main process)

@dataclass
class Plan:
    fmt: str
    why: str
    scan: Scan
    items: list[Item]                      # this task's items, in output order
    skipped: list[dict]
    fingerprint: str
    job_fingerprint: str
    total_items: int
    fold_of: dict[str, int] | None = None  # group -> fold (--folds), for the whole input
    folds: dict | None = None              # manifest.json's "folds" (counts added by the writer)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _read_groups_csv(path: Path, items: list[Item]) -> None:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise LayoutError(f"--groups {path}: cannot read it ({e.strerror})") from e
    if not rows or not {"source", "group"} <= set(rows[0]):
        raise LayoutError(f"--groups {path}: needs a header with columns 'source' (image path relative to INPUT, "
                          f"as in the manifest) and 'group'")
    table = {r["source"].strip(): r["group"].strip() for r in rows}
    missing = [it.source for it in items if it.source not in table]
    if missing:
        raise LayoutError(f"--groups {path}: {len(missing)} image(s) have no row, e.g. {missing[0]!r}; "
                          f"add a row per image (source,group)")
    for it in items:
        it.group = table[it.source]


def _file_stats(root: Path, names: Iterable[str]) -> list:
    out = []
    for n in sorted(set(names)):
        try:
            st = (root / n).stat()
            out.append([n, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([n, -1, -1])
    return out


def _options_spec(opts: Options, fmt: str, seed: int) -> dict:
    """The options in the fingerprint: the volume options only for a volume format, so that the
    fingerprint of every 2D pack stays what it was before they existed (and --classes/--overlap
    only when --classes is given, for the same reason)."""
    d = asdict(opts)
    if opts.classes is None:
        d = {k: v for k, v in d.items() if k not in ("classes", "overlap")}
    if fmt not in VOLUME_FORMATS:
        return {k: v for k, v in d.items() if k not in VOLUME_OPTIONS}
    return {**d, "negatives_seed": seed}


def plan(cfg: PackConfig, log: Callable[[str], None] = _log) -> Plan:
    root = Path(cfg.input)
    if not root.is_dir():
        raise LayoutError(f"INPUT {root} is not a folder; give the dataset root folder")
    root = root.resolve()
    files = walk(root)
    if not files:
        raise LayoutError(f"INPUT {root} is empty: no files to pack")
    opts = cfg.options
    if cfg.codec not in CODECS:
        raise LayoutError(f"unknown codec {cfg.codec!r}; choose one of {', '.join(CODECS)}")
    fmt = cfg.format
    if fmt == "auto" and (opts.images_dir or opts.masks_dir):
        fmt, why = "folders", "--images-dir/--masks-dir given"
    elif fmt == "auto":
        fmt, why = detect(root, files, opts)
    else:
        if fmt not in FORMATS:
            raise LayoutError(f"unknown --format {fmt!r}; choose auto, {', '.join(FORMATS)} or synthetic")
        why = "--format given"
    log(f"format: {fmt} ({why})")
    if fmt not in VOLUME_FORMATS:
        defaults = Options()
        given = [k for k in VOLUME_OPTIONS if getattr(opts, k) != getattr(defaults, k)]
        if given:
            raise LayoutError(f"--{given[0].replace('_', '-')} is for volumes (--format {', '.join(VOLUME_FORMATS)}); "
                              f"{root} is {fmt}, whose masks are already 2D and binary: leave it out")
    scan = FORMATS[fmt].scan(root, files, opts)
    if not cfg.follow_links:
        links_outside(root, scan)   # a pair read through a link out of INPUT is a bad pair
    for n in scan.notes:
        log(f"  {n}")
    if scan.ignored:
        shown = ", ".join(scan.ignored[:5]) + (f" and {len(scan.ignored) - 5} more" if len(scan.ignored) > 5 else "")
        log(f"  ignored {len(scan.ignored)} file(s) that are not part of an image/mask pair: {shown}")
    skipped = []
    for p in scan.problems:
        if cfg.on_error == "fail":
            raise PackAbort(f"{p.error()} (or pass --on-error skip to leave such pairs out)")
        skipped.append({"source": p.source, "reason": p.reason})
    items = scan.items
    if not items:
        raise LayoutError(f"no image/mask pairs found in {root} as format {fmt}"
                          + (f" ({len(skipped)} problem(s), first: {skipped[0]['source']}: {skipped[0]['reason']})"
                             if skipped else ""))
    groups_csv_hash = None
    if cfg.groups == "none":
        for it in items:
            it.group = None
    elif cfg.groups != "auto":
        _read_groups_csv(Path(cfg.groups), items)
        groups_csv_hash = hashlib.sha256(Path(cfg.groups).read_bytes()).hexdigest()
        log(f"  groups: from {cfg.groups} ({len({it.group for it in items})} groups)")
    if scan.given_splits:
        for it in items:
            it.split = it.split or "train"
    else:
        # --folds: only the test fraction is a split; train and val are the folds
        fractions = (1.0 - cfg.split[2], 0.0, cfg.split[2]) if cfg.folds else tuple(cfg.split)
        split_of = assign_splits([it.group or it.source for it in items], fractions, cfg.seed)
        for it in items:
            it.split = split_of[it.group or it.source]
        log(f"  splits: --split {','.join(str(f) for f in cfg.split)} by group, --seed {cfg.seed}"
            + (f" (the test fraction; the rest is --folds {cfg.folds})" if cfg.folds else ""))
    fold_of = folds = None
    if cfg.folds:
        fold_of, folds = plan_folds(items, cfg, fmt in VOLUME_FORMATS, log)
    counts = {sp: sum(it.split == sp for it in items) for sp in SPLITS}
    for sp, n in counts.items():
        if n == 0 and not (folds and sp == "val"):
            log(f"  warning: split {sp} gets no samples (too few groups for --split); training needs train and val")
    spec = {"format": fmt, "options": _options_spec(opts, fmt, cfg.seed), "groups": cfg.groups if groups_csv_hash is None else groups_csv_hash,
            "split": "given" if scan.given_splits else [list(cfg.split), cfg.seed], "codec": cfg.codec,
            "jpeg_quality": cfg.jpeg_quality if cfg.codec == "jpeg" else None, "shard_size": cfg.shard_size,
            "on_error": cfg.on_error, "dataset": cfg.dataset or Path(cfg.out).name,
            # only when set, so that the fingerprint of every earlier pack stays the same
            **({"follow_links": True} if cfg.follow_links else {}),
            **({"folds": cfg.folds} if cfg.folds else {}),
            "files": _file_stats(root, [n for it in items for n in [it.source, *it.mask_sources]
                                        if "#" not in n] + scan.extra_files)}
    job_fp = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    total = len(items)
    fp = job_fp
    if cfg.num_tasks is not None:
        i, n = cfg.task_index, cfg.num_tasks
        if n < 1 or i is None or not 0 <= i < n:
            raise LayoutError(f"--task-index must be in 0..{n - 1} (got {i})")
        items = items[i * total // n:(i + 1) * total // n]
        skipped = skipped if i == 0 else []          # scan problems are recorded once, by task 0
        fp = hashlib.sha256(f"{job_fp}:{i}/{n}".encode()).hexdigest()
        log(f"  task {i} of {n}: items {i * total // n}..{(i + 1) * total // n - 1} of {total}")
    return Plan(fmt, why, scan, items, skipped, fp, job_fp, total, fold_of, folds)


def plan_folds(items: list[Item], cfg: PackConfig, volumes: bool,
               log: Callable[[str], None]) -> tuple[dict[str, int], dict]:
    """--folds K: the groups outside the test split (train and val alike) to K folds
    (assign_folds), balanced by input items: images for 2D formats, cases for volumes (a case's
    slice count is known only once it is read; manifest.json records each fold's samples)."""
    for it in items:
        if it.split == "val":
            it.split = "train"
    pool = [it.group or it.source for it in items if it.split == "train"]
    try:
        fold_of = assign_folds(pool, cfg.folds, cfg.seed)
    except ShardError as e:
        raise LayoutError(str(e)) from None
    members: list[list[str]] = [[] for _ in range(cfg.folds)]
    for g, f in sorted(fold_of.items()):
        members[f].append(g)
    per = [0] * cfg.folds
    for g in pool:
        per[fold_of[g]] += 1
    unit = "cases" if volumes else "images"
    log(f"  folds: {cfg.folds} folds of the {len(fold_of)} groups outside the test split, by {unit} "
        f"({', '.join(map(str, per))}), --seed {cfg.seed}")
    return fold_of, {"count": cfg.folds, "seed": cfg.seed, "balanced_by": unit, "items": per,
                     "groups": members}


# ---------------------------------------------------------------- work (worker processes)

_W: dict = {}


def _init_worker(state: dict) -> None:
    _W.clear()
    _W.update(state)


def _passthrough_jpeg(path: Path, image: np.ndarray) -> bytes | None:
    """The original JPEG bytes, when --codec jpeg can keep them as they are (no second loss)."""
    if path.suffix.lower() not in JPEG_EXTS or image.dtype != np.uint8:
        return None
    from PIL import Image
    with Image.open(path) as im:
        if im.format != "JPEG" or im.mode not in ("L", "RGB"):
            return None
    return path.read_bytes()


def _work_case(item: Item) -> list:
    """A volume case: a ("case", ...) record, then one result per slice it keeps."""
    samples, info, warnings = load_case(item, _W["root"], _W["options"], _W["seed"], _W["dataset"])
    out: list = [("case", item.key, info, warnings)]
    fold = _W["fold_of"].get(item.group or item.source) if item.split == "train" else None
    for s in samples:
        s.fold = fold
        if _W["dry_run"]:
            out.append(("ok", s.key, [], bool(s.mask.any()), None))
        else:
            enc = encode_sample(s, _W["codec"], _W["jpeg_quality"])
            if _W["classes"]:
                enc.extra["classes"] = (class_counts(s.mask, _W["classes"]), 0)
            out.append(("ok", s.key, [], enc.positive, enc))
    return out


def _work_one(item: Item) -> list:
    """Every result of one item: one for a 2D pair, a case record and its slices for a volume,
    or one ("bad", ...) / ("error", ...) for an item that fails as a whole."""
    root: Path = _W["root"]
    try:
        if item.volume is not None:
            return _work_case(item)
        image, mask, nonbinary, conflicts = load_item(item, root, _W["classes"], _W["overlap"])
        if _W["dry_run"]:
            return [("ok", item.key, nonbinary, bool(mask.any()), None)]
        fold = _W["fold_of"].get(item.group or item.source) if item.split == "train" else None
        s = Sample(item.key, image, mask, item.source, list(item.mask_sources), item.group,
                   _W["dataset"], item.split, fold=fold)
        s.labels = _W["classes"] > 2
        raw = _passthrough_jpeg(root / item.source, image) if _W["codec"] == "jpeg" else None
        enc = encode_sample(s, _W["codec"], _W["jpeg_quality"], image_bytes=raw)
        if _W["classes"]:
            enc.extra["classes"] = (class_counts(mask, _W["classes"]), conflicts)
        return [("ok", item.key, nonbinary, enc.positive, enc)]
    except PackInputError as e:
        return [("bad", e.source, e.reason, e.fix)]
    except ShardError as e:
        return [("bad", item.source, str(e), "")]
    except Exception as e:  # not a bad input (a bug, no memory): still a value, the parent says it
        return [("error", item.source, f"{type(e).__name__}: {e}", "")]


def _work_chunk(chunk: list[Item]) -> list:
    return [_work_one(it) for it in chunk]


def ordered_map(fn, items: list, workers: int, state: dict, chunk: int = CHUNK) -> Iterator:
    """fn over items in chunks, results in input order, in `workers` processes (1: this one).
    A volume case is a chunk of its own: its slices are already many samples."""
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    if workers <= 1:
        _init_worker(state)
        for c in chunks:
            yield from fn(c)
        return
    for results in workers_map(fn, chunks, workers, _init_worker, (state,)):
        yield from results


def run(cfg: PackConfig, log: Callable[[str], None] = _log) -> dict:
    """Plan, then pack (or only check, with dry_run). Returns the manifest (or a dry-run report)."""
    p = plan(cfg, log)
    out = Path(cfg.out)
    if cfg.num_tasks is not None:
        from .merge import part_dir
        out = part_dir(out, cfg.task_index, cfg.num_tasks)
    if not cfg.dry_run:
        old = check_output(out, p.fingerprint, cfg.overwrite)
        if old is not None:
            log(f"{out} is up to date (same inputs and options); nothing to do. Pass --overwrite to repack")
            return old
    hold("planned")
    state = {"root": Path(cfg.input).resolve(), "codec": cfg.codec, "jpeg_quality": cfg.jpeg_quality,
             "dry_run": cfg.dry_run, "dataset": cfg.dataset or Path(cfg.out).name, "options": cfg.options,
             "seed": cfg.seed, "fold_of": p.fold_of or {}}
    class_spec = parse_classes(cfg.options.classes)
    state.update(classes=class_spec.total if class_spec else 0, overlap=cfg.options.overlap)
    per_class = ClassCounts(class_spec.total, SPLITS) if class_spec else None
    volumes = p.fmt in VOLUME_FORMATS
    cases: dict[str, dict] = {}
    case_warnings: list[str] = []
    skipped = list(p.skipped)
    nonbinary: list[str] = []
    report = {"samples": {sp: 0 for sp in SPLITS}, "positive": 0}

    from tqdm import tqdm

    class _Bar(tqdm):
        monitor_interval = 0   # no monitor thread, so workers can still be forked safely

    bar = _Bar(total=len(p.items), unit="case" if volumes else "img", file=sys.stderr,
               disable=not cfg.progress or None,
               desc="check" if cfg.dry_run else "pack", dynamic_ncols=True, smoothing=0.1)

    def results() -> Iterator[EncodedSample]:
        written = 0
        for r in _flat(ordered_map(_work_chunk, p.items, cfg.workers, state, 1 if volumes else CHUNK), bar):
            if r[0] == "case":
                _, key, info, warns = r
                cases[key] = info
                for w in warns:
                    log(f"  warning: {w}")
                case_warnings.extend(warns)
                continue
            if r[0] == "error":
                raise PackAbort(f"{r[1]}: packing it failed with an unexpected error ({r[2]}); this is not "
                                f"a bad input but a fault of pack or of the machine: please report it")
            if r[0] == "bad":
                _, source, reason, fix = r
                if cfg.on_error == "fail":
                    raise PackAbort(f"{source}: {reason}" + (f"; {fix}" if fix else "")
                                    + " (or pass --on-error skip to leave such pairs out)")
                skipped.append({"source": source, "reason": reason})
                continue
            _, key, nb, positive, enc = r
            nonbinary.extend(nb)
            report["positive"] += int(positive)
            if enc is not None:
                report["samples"][enc.split] += 1
                if per_class is not None:
                    per_class.add(enc.split, *enc.extra.pop("classes"))
                yield enc
                written += 1
                if written == 1:
                    hold("written")

    extra = {"mask_fusion": cfg.options.mask_fusion if p.fmt == "lidc" else "any",
             "detected": p.why, "groups": cfg.groups, "job_fingerprint": p.job_fingerprint,
             "split_request": "given" if p.scan.given_splits else {"fractions": list(cfg.split), "seed": cfg.seed},
             "nonbinary_masks": {"count": 0, "examples": []}}
    if p.folds:
        extra["folds"] = dict(p.folds)
    if cfg.num_tasks is not None:
        extra["task"] = {"index": cfg.task_index, "count": cfg.num_tasks, "total_items": p.total_items}
    def volume_summary() -> dict:
        return summary(cases, asdict(cfg.options), cfg.seed, (p.items[0].volume or {}).get("labels"), case_warnings)

    def last_sample() -> None:
        # `extra` is filled after the last sample with the non-binary masks the workers saw
        # (and, for volumes, every case's record).
        extra["nonbinary_masks"].update(count=len(nonbinary), examples=nonbinary[:50])
        if per_class is not None:
            extra["classes"] = per_class.record(class_spec, class_names(p, class_spec), cfg.options.overlap)
        if volumes:
            extra["volumes"] = volume_summary()
        hold("last")

    t0 = time.perf_counter()
    gen = results()
    with stop_on_signals():   # a no-op under `pack`, which installed it for the whole command
        try:
            if cfg.dry_run:
                for _ in gen:
                    pass
                manifest = {"dry_run": True, "format": p.fmt, "items": len(p.items), "skipped": skipped,
                            "splits": {sp: sum(it.split == sp for it in p.items) for sp in SPLITS}}
                if p.folds:
                    manifest["folds"] = p.folds
                if volumes:
                    manifest["slices"] = {sp: sum(c["kept"] for c in cases.values() if c["split"] == sp)
                                          for sp in SPLITS}
                    manifest["volumes"] = volume_summary()
            else:
                manifest = write_dataset(_with_final(gen, last_sample), out, fmt=p.fmt,
                                         input_root=str(state["root"]), codec=cfg.codec,
                                         shard_size=cfg.shard_size, fingerprint=p.fingerprint, extra=extra,
                                         skipped=skipped, jpeg_quality=cfg.jpeg_quality, overwrite=cfg.overwrite)
                hold("published")
        finally:
            gen.close()
            bar.close()
    dt = time.perf_counter() - t0
    if nonbinary:
        log(f"  note: {len(nonbinary)} mask(s) had values other than 0 and one other value (e.g. {nonbinary[0]}); "
            f"binarised as any non-zero pixel = tumour")
    done = len(p.items)
    rate = done / dt if dt > 0 else float("inf")
    if volumes:
        unmapped = extra.get("volumes", manifest.get("volumes", {})).get("labels", {}).get("unmapped_voxels")
        if unmapped:
            log(f"  note: label value(s) {', '.join(unmapped)} are outside --labels and were counted as background "
                f"(voxels per value in manifest.json volumes.labels.unmapped_voxels)")
        empty = sorted(k for k, c in cases.items() if c["kept"] == 0)
        if empty:
            log(f"  note: {len(empty)} case(s) gave no slice (--slices {cfg.options.slices}: no tumour), "
                f"e.g. {empty[0]}")
    if cfg.dry_run and volumes:
        log(f"dry run: {done - len(skipped) + len(p.skipped)} cases OK of {done}, "
            f"{sum(manifest['slices'].values())} slices ({', '.join(f'{k} {v}' for k, v in manifest['slices'].items())}), "
            f"{len(skipped)} problem(s); nothing written ({rate:.1f} cases/s)")
    elif cfg.dry_run:
        log(f"dry run: {done - len(skipped) + len(p.skipped)} pairs OK of {done} "
            f"({', '.join(f'{k} {v}' for k, v in manifest['splits'].items())}), "
            f"{len(skipped)} problem(s); nothing written ({rate:.1f} images/s)")
    else:
        counts = ", ".join(f"{k} {v['samples']}" for k, v in manifest["splits"].items())
        unit = "cases" if volumes else "images"
        log(f"packed {p.fmt} -> {out} ({counts}; skipped {len(manifest['skipped'])}; codec {cfg.codec}; "
            f"{done} {unit} in {dt:.1f} s, {rate:.1f} {unit}/s)")
    return manifest


def class_names(p: Plan, spec) -> list[str]:
    """The class names by id: what the format read (COCO category names, dataset.json label
    names), else the --classes KEYs."""
    if p.scan.class_names:
        return list(p.scan.class_names)
    labels = (p.items[0].volume or {}).get("labels") or {} if p.items else {}
    return list(labels.get("class_names") or spec.names())


def _flat(per_item: Iterator[list], bar) -> Iterator:
    for results in per_item:
        bar.update(1)
        yield from results


def _with_final(gen: Iterator, final: Callable[[], None]) -> Iterator:
    yield from gen
    final()
