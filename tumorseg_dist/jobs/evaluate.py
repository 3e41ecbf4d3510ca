"""The work of `python -m tumorseg_dist.evaluate` (its flags and what it writes: tumorseg_dist/evaluate.py):
score a checkpoint on a packed split, every sample once across ranks."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from .. import dist as distmod, threads
from ..data.shards import label_classes
from ..data.shards import ShardError, fold_split, read_manifest
from ..data.verify import verify_shards
from ..figures import overlay_image, save_grid, wrap_name
from ..figures import plot_confusion
from ..inference import Predictor, load_ensemble, resolve_threshold
from .. import outputs
from ..log import Console, fmt
from ..options import EvaluateArgs
from ..scoring import EvalSamples, Scores, hd95_unit, samples_of, score_split, split_shards

CSV_FIELDS = ["key", "source", "group", "dice", "iou", "target_area", "prediction_area", "hd95",
              "hd95_mm", "assd", "assd_mm"]
SURFACE = ("hd95", "hd95_mm", "assd", "assd_mm")   # per image; NaN (blank) where undefined


# ---------------------------------------------------------------- figure

def plot_cases(rows: list[dict], samples: EvalSamples, model: Predictor, path: Path,
               threshold: float, tta: bool, per_side: int = 4, inference: str = "whole",
               overlap: float = 0.5, batch_size: int = 8, draw=None,
               title: str = "green: ground truth, red: prediction (original size)") -> list[str]:
    """Worst `per_side` images by Dice (top row) and best ones with a non-empty target (bottom),
    each titled with its whole sample name (wrapped) and Dice, predicted as the metrics were.
    `draw(sample, prediction, row)` -> (panel, Dice text) draws a case (K classes: label maps).
    Returns the captions."""
    if not rows:
        return []
    by_dice = sorted(rows, key=lambda r: (r["dice"], r["key"]))
    worst = by_dice[:per_side]
    positive = [r for r in reversed(by_dice) if r["target_area"] > 0 and r not in worst]
    best = (positive or [r for r in reversed(by_dice) if r not in worst])[:per_side]
    grid = []
    for label, chosen in (("worst", worst), ("best", best)):
        panels = []
        for row in chosen:
            s = samples.load(row["_index"])
            pred = model.predict_image(s["image"], tta, threshold, inference, overlap, batch_size)
            panel, dice = (overlay_image(s["image"], pred, s["mask"]), f"{row['dice']:.3f}") if draw is None \
                else draw(s, pred, row)
            panels.append((panel, f"{label}: {wrap_name(row['key'])}\nDice {dice}"))
        grid.append(panels)
    lines = max((c.count("\n") + 1 for row in grid for _, c in row), default=2)
    # Taller panels for captions of more lines: whole names, not cut and not overlapping.
    save_grid(grid, path, title, panel=(3.2, 3.2 + 0.14 * lines))
    return [c for row in grid for _, c in row]


# ---------------------------------------------------------------- main

def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def default_out(ckpt: Path | tuple[Path, ...], split: str, tta: bool, inference: str = "whole") -> Path:
    """RUN/eval-SPLIT[-sliding][-tta]; an ensemble's beside its runs, in
    ensemble-RUN1+RUN2+.../ under their common folder."""
    ckpts = (ckpt,) if isinstance(ckpt, Path) else tuple(ckpt)
    runs = [run_dir_of(Path(c)).resolve() for c in ckpts]
    run_dir = runs[0] if len(runs) == 1 else Path(os.path.commonpath(runs)) / ("ensemble-" + "+".join(r.name for r in runs))
    sliding = "-sliding" if inference == "sliding" else ""  # never overwrites the whole-image scores
    return run_dir / f"eval-{split}{sliding}{'-tta' if tta else ''}"


def split_of(model: Predictor, split: str) -> str:
    """The split to read: under cross-validation (checkpoints trained with --fold k) train and
    val are fold k's (`shards.fold_split`); an ensemble of several folds has no such split."""
    folds = {m.config.get("data", {}).get("fold") for m in model.models}
    if split not in ("train", "val") or folds == {None}:
        return split
    if len(folds) > 1:
        shown = ", ".join("none" if f is None else str(f) for f in sorted(folds, key=lambda f: -1 if f is None else f))
        raise ValueError(f"--split {split}: the checkpoints were trained on different folds ({shown}), so every "
                         f"sample of {split} was trained on by some of them; evaluate the ensemble on --split test")
    return fold_split(split, folds.pop())



def checkpoint_field(args: EvaluateArgs) -> str | list[str]:
    """metrics.json's "checkpoint": the file, or an ensemble's files."""
    return str(args.checkpoint[0]) if len(args.checkpoint) == 1 else [str(c) for c in args.checkpoint]


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def run(args: EvaluateArgs) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    d = distmod.init(args.device)
    log = Console(d.is_main)
    budget = threads.plan(args.workers)
    threads.apply(budget)
    model = load_ensemble(args.checkpoint, d.device, args.threshold)
    threshold = resolve_threshold(args.threshold, model)
    data = args.data or model.config.get("data", {}).get("path")
    if data is None:
        raise ValueError(f"{args.checkpoint[0]} does not record its data; pass --data shards/NAME")
    data = Path(data)
    manifest = read_manifest(data)
    split = split_of(model, args.split)
    # a fold's shards are train shards (shards.split_shards)
    verify_shards(data, ["train" if ":fold" in split else split], args.verify_shards, d, log.info)
    shards = split_shards(data, split, manifest, model.classes)
    n = len(shards)
    if n == 0:
        folded = split == "val" and manifest.get("folds")   # pack --folds: val is a fold (--fold k)
        raise ShardError(f"{data}: split {split!r} has no samples" + (
            "; it was packed with --folds, so its validation data are the folds: evaluate a checkpoint "
            "trained with --fold k on --split val, or use --split test" if folded else ""))
    names = list(model.class_names)
    if model.classes > 1 and label_classes(manifest) != names:
        raise ValueError(f"{data} holds classes {label_classes(manifest) or 'binary masks'} but the checkpoint "
                         f"predicts {names}; evaluate it on the dataset it was trained for (--data)")
    sliding = args.inference == "sliding"
    how = f", sliding window (overlap {args.overlap})" if sliding else ""
    log.info(f"evaluate: {', '.join(map(str, args.checkpoint))} ({model.name}, {model.size}px) on {data} "
             f"split {split}: {n} images, {d.world_size} rank(s), "
             f"{f'threshold {threshold}' if model.classes == 1 else f'{model.classes} classes (argmax)'}, "
             f"{'original' if sliding else args.resolution} resolution{how}{', flip-TTA' if args.tta else ''}")
    log.info(f"evaluate: threads: {budget.describe()}")
    scores = score_split(model, shards, d, log, threshold=threshold, tta=args.tta, inference=args.inference,
                         overlap=args.overlap, batch_size=args.batch_size, resolution=args.resolution,
                         workers=budget.workers, desc=f"evaluate {args.split}")
    out = args.out or default_out(args.checkpoint, args.split, args.tta, args.inference)
    if d.is_main:
        what = {"checkpoint": checkpoint_field(args), "ensemble": len(args.checkpoint), "data": str(data),
                "split": split, "tta": args.tta, "threshold": threshold, "resolution": scores.resolution, "inference": args.inference,
                "overlap": args.overlap if sliding else None, "world_size": d.world_size,
                "arch": model.arch, "encoder": model.encoder, "size": model.size}
        out.mkdir(parents=True, exist_ok=True)
        log.open_file(out / "evaluate.log")
        if model.classes > 1:   # K classes (pack --classes): per-class metrics, confusion matrix
            write_classes(model, scores, what, out)
        else:
            write_binary(scores, what, out)
        if args.cases > 0:
            log.info(f"evaluate: drawing {out / 'cases.png'} (the {args.cases} worst and best images)")
            cases = samples_of(shards, model, [])
            if model.classes > 1:
                plot_class_cases(scores.rows, cases, model, out / "cases.png", args.tta, args.cases, names,
                                 args.inference, args.overlap, args.batch_size)
            else:
                plot_cases(scores.rows, cases, model, out / "cases.png", threshold, args.tta, args.cases,
                           args.inference, args.overlap, args.batch_size)
        log.info(summary_line(model, scores.metrics, out))
    distmod.barrier()
    distmod.cleanup()
    log.close()
    return 0


def write_binary(scores: Scores, what: dict, out: Path) -> None:
    """metrics.json (the scores, then what was evaluated) and per_image.csv of a binary model."""
    write_json_atomic(out / "metrics.json", {k: _finite(v) for k, v in {**scores.metrics, **what}.items()})
    rows = sorted(scores.rows, key=lambda r: r["key"])
    with outputs.atomic(out / "per_image.csv", "metrics.json is complete") as tmp, \
            open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, "dice": f"{r['dice']:.6f}", "iou": f"{r['iou']:.6f}",
                         **{k: "" if not math.isfinite(r[k]) else f"{r[k]:.3f}" for k in SURFACE}})


def write_classes(model: Predictor, scores: Scores, what: dict, out: Path) -> None:
    """evaluate for a K-class model: metrics.json (per class Dice/IoU/precision/recall from
    summed counts, their foreground mean, the pixel confusion matrix), confusion.json and
    confusion.png, per_image.csv with each image's per-class Dice and areas."""
    names = list(model.class_names)
    ignore = (model.config.get("loss") or {}).get("ignore_index")
    what = {k: v for k, v in what.items() if k != "threshold"}   # the argmax has none
    metrics = {**scores.metrics, "classes": names, "confusion_matrix": scores.matrix, "ignore_index": ignore,
               "hd95_unit": hd95_unit(scores.resolution, model.size), **what}
    write_json_atomic(out / "metrics.json", {k: _finite(v) for k, v in metrics.items()})
    write_json_atomic(out / "confusion.json", {"classes": names, "rows": "true class",
                                               "columns": "predicted class", "pixels": scores.matrix})
    plot_confusion(scores.matrix, names, out / "confusion.png", f"{what['split']}: pixels per true class")
    fields = ["key", "source", "group", "dice"] + [f"{m}/{c}" for c in names[1:]
                                                   for m in ("dice", "target_area", "prediction_area", "hd95")]
    with outputs.atomic(out / "per_image.csv", "metrics.json is complete") as tmp, \
            open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        wr.writeheader()
        for r in sorted(scores.rows, key=lambda r: r["key"]):
            wr.writerow({k: ("" if not math.isfinite(v) else f"{v:.6f}") if isinstance(v, float) else v
                         for k, v in r.items()})


def summary_line(model: Predictor, metrics: dict, out: Path) -> str:
    """The result, as the last line evaluate prints."""
    if model.classes > 1:
        names = model.class_names
        per = ", ".join(f"{c} {fmt(metrics[f'dice/{c}'])}" for c in names[1:])
        return (f"evaluate: dice {fmt(metrics['dice'])} (mean over {len(names) - 1} classes: {per}), pixel "
                f"accuracy {fmt(metrics['accuracy'])} ({metrics['samples']} images) -> {out}")
    hd_txt = f"{metrics['hd95_mean']:.2f}" if metrics["hd95_mean"] is not None else "n/a"
    if metrics["hd95_mm_mean"] is not None:
        hd_txt += f" px, {metrics['hd95_mm_mean']:.2f} mm"
    return (f"evaluate: dice {fmt(metrics['dice'])} iou {fmt(metrics['iou'])} precision "
            f"{fmt(metrics['precision'])} recall {fmt(metrics['recall'])} mean image dice "
            f"{fmt(metrics['mean_image_dice'])} hd95 {hd_txt} ({metrics['samples']} images) -> {out}")


# ---------------------------------------------------------------- K classes

def plot_class_cases(rows: list[dict], samples: EvalSamples, model: Predictor, path: Path, tta: bool,
                     per_side: int, names: list[str], inference: str = "whole", overlap: float = 0.5,
                     batch_size: int = 8) -> None:
    """cases.png for K classes (plot_cases): the worst and best images by their mean foreground
    Dice, each predicted class filled in its colour, the true classes outlined in white."""
    from ..figures import class_colour_name, label_overlay

    def draw(s: dict, pred: np.ndarray, row: dict):
        return (label_overlay(s["image"], pred, truth=s["mask"]),
                ", ".join(f"{c} {row[f'dice/{c}']:.2f}" for c in names[1:]))

    colours = ", ".join(f"{c} {class_colour_name(i)}" for i, c in enumerate(names[1:], 1))
    plot_cases(rows, samples, model, path, model.threshold, tta, per_side, inference, overlap, batch_size,
               draw, f"prediction filled by class ({colours}), truth outlined in white")


def write_json_atomic(path: Path, obj) -> None:
    outputs.write_text(path, json.dumps(obj, indent=2) + "\n")

