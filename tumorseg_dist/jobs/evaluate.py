"""The work of `python -m tumorseg_dist.evaluate` (its flags and what it writes: tumorseg_dist/evaluate.py):
score a checkpoint on a packed split, every sample once across ranks."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist as distmod, threads
from ..data.shards import IndexedShards, read_sample
from ..data.shards import label_classes
from ..data.torch_loader import rank_indices
from ..data.shards import ShardError, WorkerFailure, fold_split, read_manifest, shard_paths
from ..data.verify import verify_shards
from ..figures import overlay_image, save_grid, wrap_name
from ..figures import plot_confusion
from ..inference import Predictor, load_ensemble, resolve_threshold, to_original_size
from ..inference import to_original_labels
from ..log import Console, fmt, write_text_atomic
from ..metrics import mask_confusion, per_image_scores, summarize
from ..metrics import (ClassMetricAccumulator, confusion_matrix, image_class_scores, label_confusion,
                       summarize_classes)
from ..options import EvaluateArgs

CSV_FIELDS = ["key", "source", "group", "dice", "iou", "target_area", "prediction_area", "hd95",
              "hd95_mm", "assd", "assd_mm"]
SURFACE = ("hd95", "hd95_mm", "assd", "assd_mm")   # per image; NaN (blank) where undefined


# ---------------------------------------------------------------- Hausdorff-95

def hausdorff95(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, float] | None = None) -> float:
    """MONAI's symmetric 95th-percentile Hausdorff distance between the two masks' boundaries, in
    pixels, or in the units of `spacing` (row, column pixel size; mm). Our convention where it
    is undefined: NaN (left out of the mean and median, blank in per_image.csv) if either mask
    is empty, where MONAI would give inf or NaN with a warning."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if not pred.any() or not target.any():
        return float("nan")
    from monai.metrics import compute_hausdorff_distance  # ~2-10 s to import: only when needed
    d = compute_hausdorff_distance(torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None],
                                   include_background=True, percentile=95,
                                   spacing=None if spacing is None else [float(v) for v in spacing])
    return float(d.item())


def average_surface_distance(pred: np.ndarray, target: np.ndarray,
                             spacing: tuple[float, float] | None = None) -> float:
    """MONAI's symmetric average surface distance (ASSD: the mean over both boundaries of each
    boundary pixel's distance to the other mask's boundary), in pixels or in the units of
    `spacing`; NaN if either mask is empty, as `hausdorff95`."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if not pred.any() or not target.any():
        return float("nan")
    from monai.metrics import compute_average_surface_distance
    d = compute_average_surface_distance(torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None],
                                         include_background=True, symmetric=True,
                                         spacing=None if spacing is None else [float(v) for v in spacing])
    return float(d.item())


def surface_scores(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, float] | None) -> dict:
    """One image's surface metrics: HD95 and ASSD in pixels, and in mm where the spacing is known."""
    nan = float("nan")
    return {"hd95": hausdorff95(pred, target), "assd": average_surface_distance(pred, target),
            "hd95_mm": nan if spacing is None else hausdorff95(pred, target, spacing),
            "assd_mm": nan if spacing is None else average_surface_distance(pred, target, spacing)}


def pixel_spacing(meta: dict, original: tuple[int, int], compared: tuple[int, int]) -> tuple[float, float] | None:
    """The (row, column) pixel size in mm of the compared masks, from the sample's json
    `spacing_mm` (a slice of a volume: `pack --format nnunet|nifti|dicom`) or `pixel_spacing`,
    [row mm, column mm] of the original image (scaled when the comparison is at the model size),
    or None when the sample does not give it."""
    sp = meta.get("spacing_mm") or meta.get("pixel_spacing")
    try:
        row, col = (float(v) for v in sp)
    except (TypeError, ValueError):
        return None
    if not (row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col)):
        return None
    return row * original[0] / compared[0], col * original[1] / compared[1]


# ---------------------------------------------------------------- data

class EvalSamples(torch.utils.data.Dataset):
    """Sample i of a split -> model input, original mask and its metadata. The input is the
    preprocessed tensor for whole-image inference, the [0, 1] image itself for the sliding
    window (which preprocesses tile by tile)."""

    def __init__(self, shards: IndexedShards, model: Predictor, indices: list[int],
                 inference: str = "whole"):
        self.shards, self.indices, self.inference = shards, indices, inference
        self.pre = model.pre

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> dict:
        s = read_sample(self.shards, i)
        return {"index": i, "key": s.key, "meta": s.meta, "image": s.image, "mask": s.mask > 0}

    def __getitem__(self, j: int) -> dict | WorkerFailure:
        try:
            s = self.load(self.indices[j])
        except ShardError as e:
            return WorkerFailure(str(e))
        if self.inference == "whole":
            s["tensor"] = self.pre(s["image"])
            del s["image"]  # not needed for metrics; the figure re-reads its few cases
        return s


def _collate(batch: list[dict]) -> list[dict]:
    return batch


def model_size_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The loader's mask resize (nearest-exact) to the training size."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(m, size=(size, size), mode="nearest-exact")[0, 0] > 0.5).numpy()


def score(prob: torch.Tensor, mask: np.ndarray, threshold: float, resolution: str, size: int):
    """One image: (prediction, target) at the chosen resolution and its float64 [TP, FP, FN, TN],
    counted by the metrics module as training counts them."""
    if resolution == "original":
        pred = to_original_size(prob, *mask.shape) > threshold
        target = torch.from_numpy(mask)
    else:
        pred = prob.float().cpu()[0] > threshold
        target = torch.from_numpy(model_size_mask(mask, size))
    return pred.numpy(), target.numpy(), mask_confusion(pred[None], target[None])[0]


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


def surface_means(rows: list[dict], key: str) -> dict:
    """KEY_mean and KEY_median over the images where KEY is defined (None if none is)."""
    v = np.array([r[key] for r in rows if math.isfinite(r[key])])
    return {f"{key}_mean": float(v.mean()) if v.size else None,
            f"{key}_median": float(np.median(v)) if v.size else None}


def checkpoint_field(args: EvaluateArgs) -> str | list[str]:
    """metrics.json's "checkpoint": the file, or an ensemble's files."""
    return str(args.checkpoint[0]) if len(args.checkpoint) == 1 else [str(c) for c in args.checkpoint]


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def gather_rows(rows: list[dict]) -> list[dict]:
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()):
        return rows
    out: list[list[dict] | None] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, rows)
    return [r for part in out for r in part]


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
    shards = IndexedShards(shard_paths(data, split, manifest))
    n = len(shards)
    if n == 0:
        folded = split == "val" and manifest.get("folds")   # pack --folds: val is a fold (--fold k)
        raise ShardError(f"{data}: split {split!r} has no samples" + (
            "; it was packed with --folds, so its validation data are the folds: evaluate a checkpoint "
            "trained with --fold k on --split val, or use --split test" if folded else ""))
    mine = [i for i in rank_indices(n, d.rank, d.world_size, False, 0, 0) if i >= 0]
    sliding = args.inference == "sliding"
    samples = EvalSamples(shards, model, mine, args.inference)
    out = args.out or default_out(args.checkpoint, args.split, args.tta, args.inference)
    if model.classes > 1:   # K classes (pack --classes): per-class metrics, confusion matrix
        return evaluate_classes(args, d, log, model, data, manifest, split, mine, out, budget)
    how = f", sliding window (overlap {args.overlap})" if sliding else ""
    log.info(f"evaluate: {', '.join(map(str, args.checkpoint))} ({model.name}, {model.size}px) on {data} "
             f"split {split}: {n} images, {d.world_size} rank(s), threshold {threshold}, "
             f"{args.resolution} resolution{how}{', flip-TTA' if args.tta else ''}")
    log.info(f"evaluate: threads: {budget.describe()}")
    # Sliding: --batch-size counts tiles, and images come one at a time, so that only one
    # full-size image (with its accumulator) is in the main process at once.
    loader = torch.utils.data.DataLoader(samples, batch_size=1 if sliding else args.batch_size,
                                         shuffle=False, num_workers=budget.workers, collate_fn=_collate)
    rows: list[dict] = []
    counts = []
    for batch in log.progress(loader, len(loader), f"evaluate {args.split}", unit="batch"):
        for s in batch:
            if isinstance(s, WorkerFailure):
                s.reraise()
        if sliding:  # [H, W] at the original size, which score() then compares as it is
            probs = [model.sliding_probabilities(s.pop("image"), args.tta, args.overlap, args.batch_size)
                     for s in batch]
        else:
            probs = model.probabilities(torch.stack([s["tensor"] for s in batch]), tta=args.tta)
        for s, prob in zip(batch, probs):
            pred, target, c = score(prob, s["mask"], threshold, args.resolution, model.size)
            counts.append(c)
            mm = pixel_spacing(s["meta"], s["mask"].shape, target.shape)
            rows.append({"key": s["key"], "source": s["meta"].get("source", ""),
                         "group": s["meta"].get("group") or "", "target_area": int(target.sum()),
                         "prediction_area": int(pred.sum()), **surface_scores(pred, target, mm),
                         "_index": s["index"]})
    c = torch.stack(counts) if counts else torch.zeros(0, 4, dtype=torch.float64)
    dice, iou = per_image_scores(c)
    for r, di, ii in zip(rows, dice.tolist(), iou.tolist()):
        r["dice"], r["iou"] = di, ii
    totals = torch.cat([c.sum(0), torch.stack([dice.sum(), iou.sum(), c.new_tensor(len(rows))])]).to(d.device)
    totals = distmod.all_reduce_sum(totals).tolist()
    rows = gather_rows(rows)  # every rank gets all rows, so every rank can check (and fail) alike
    keys = [r["key"] for r in rows]
    if len(keys) != n or len(set(keys)) != n or totals[6] != n:  # the contract this command promises
        raise RuntimeError(f"evaluated {len(keys)} rows ({len(set(keys))} distinct) for {n} samples")
    if d.is_main:
        metrics = summarize(totals)  # NaN where a ratio is undefined: null in JSON, n/a printed
        defined = {k: sum(math.isfinite(r[k]) for r in rows) for k in ("hd95", "hd95_mm")}
        metrics.update({
            **surface_means(rows, "hd95"), "hd95_images": defined["hd95"],
            "hd95_unit": "pixels of the original image" if args.resolution == "original"
            else f"pixels at the model size {model.size}",
            # Only the images whose json gives their spacing (slices of volumes: spacing_mm).
            **surface_means(rows, "hd95_mm"), "hd95_mm_images": defined["hd95_mm"],
            **surface_means(rows, "assd"), **surface_means(rows, "assd_mm"),
            "checkpoint": checkpoint_field(args), "ensemble": len(args.checkpoint), "data": str(data), "split": split,
            "tta": args.tta, "threshold": threshold, "resolution": args.resolution,
            "inference": args.inference, "overlap": args.overlap if sliding else None,
            "world_size": d.world_size, "arch": model.arch, "encoder": model.encoder, "size": model.size})
        out.mkdir(parents=True, exist_ok=True)
        log.open_file(out / "evaluate.log")
        write_json_atomic(out / "metrics.json", {k: _finite(v) for k, v in metrics.items()})
        rows.sort(key=lambda r: r["key"])
        with open(out / "per_image.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            wr.writeheader()
            for r in rows:
                wr.writerow({**r, "dice": f"{r['dice']:.6f}", "iou": f"{r['iou']:.6f}",
                             **{k: "" if not math.isfinite(r[k]) else f"{r[k]:.3f}" for k in SURFACE}})
        if args.cases > 0:
            log.info(f"evaluate: drawing {out / 'cases.png'} (the {args.cases} worst and best images)")
            plot_cases(rows, EvalSamples(shards, model, []), model, out / "cases.png", threshold,
                       args.tta, args.cases, args.inference, args.overlap, args.batch_size)
        hd_txt = f"{metrics['hd95_mean']:.2f}" if metrics["hd95_mean"] is not None else "n/a"
        if metrics["hd95_mm_mean"] is not None:
            hd_txt += f" px, {metrics['hd95_mm_mean']:.2f} mm"
        log.info(f"evaluate: dice {fmt(metrics['dice'])} iou {fmt(metrics['iou'])} precision "
                 f"{fmt(metrics['precision'])} recall {fmt(metrics['recall'])} mean image dice "
                 f"{fmt(metrics['mean_image_dice'])} hd95 {hd_txt} ({metrics['samples']} images) -> {out}")
    distmod.barrier()
    distmod.cleanup()
    log.close()
    return 0


# ---------------------------------------------------------------- K classes

class ClassEvalSamples(EvalSamples):
    """EvalSamples of a label-mask split: the mask is the class ids (uint8), not a bool."""

    def load(self, i: int) -> dict:
        s = read_sample(self.shards, i)
        return {"index": i, "key": s.key, "meta": s.meta, "mask": s.mask.astype(np.uint8), "image": s.image}


def class_score(prob: torch.Tensor, mask: np.ndarray, resolution: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's (predicted labels, target labels) at the chosen resolution: the argmax of the
    K probabilities resized to the original size, or at the model size against the mask resized
    as the loader resizes it (nearest)."""
    if resolution == "original":
        return to_original_labels(prob, *mask.shape), mask
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    target = F.interpolate(m, size=(size, size), mode="nearest-exact")[0, 0].to(torch.uint8).numpy()
    return prob.float().cpu().argmax(0).to(torch.uint8).numpy(), target


def evaluate_classes(args: EvaluateArgs, d, log: Console, model: Predictor, data: Path, manifest: dict,
                     split: str, mine: list[int], out: Path, budget) -> int:
    """evaluate for a K-class model: metrics.json (per class Dice/IoU/precision/recall from
    summed counts, their foreground mean, the pixel confusion matrix), confusion.json and
    confusion.png, per_image.csv with each image's per-class Dice and areas."""
    names = list(model.class_names)
    if label_classes(manifest) != names:
        raise ValueError(f"{data} holds classes {label_classes(manifest) or 'binary masks'} but the checkpoint "
                         f"predicts {names}; evaluate it on the dataset it was trained for (--data)")
    sliding = args.inference == "sliding"   # probabilities at the original size already
    resolution = "original" if sliding else args.resolution
    k = len(names)
    ignore = (model.config.get("loss") or {}).get("ignore_index")
    shards = IndexedShards(shard_paths(data, split, manifest), labels=True)
    loader = torch.utils.data.DataLoader(ClassEvalSamples(shards, model, mine, args.inference),
                                         batch_size=1 if sliding else args.batch_size, shuffle=False,
                                         num_workers=budget.workers, collate_fn=_collate)
    acc = ClassMetricAccumulator(d.device, k, ignore_index=ignore)
    rows: list[dict] = []
    for batch in log.progress(loader, len(loader), f"evaluate {args.split}", unit="batch"):
        for s in batch:
            if isinstance(s, WorkerFailure):
                s.reraise()
        if sliding:
            probs = [model.sliding_probabilities(s.pop("image"), args.tta, args.overlap, args.batch_size)
                     for s in batch]
        else:
            probs = model.probabilities(torch.stack([s["tensor"] for s in batch]), tta=args.tta)
        for s, prob in zip(batch, probs):
            pred, target = class_score(prob, s["mask"], resolution, model.size)
            cm = label_confusion(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], k, ignore)
            acc.add(cm)
            dice, _ = image_class_scores(cm)
            row = {"key": s["key"], "source": s["meta"].get("source", ""), "group": s["meta"].get("group") or "",
                   "dice": float(dice.mean()), "target_area": int((target > 0).sum()), "_index": s["index"]}
            for c in range(1, k):
                row[f"dice/{names[c]}"] = float(dice[0, c - 1])
                row[f"target_area/{names[c]}"] = int((target == c).sum())
                row[f"prediction_area/{names[c]}"] = int((pred == c).sum())
                row[f"hd95/{names[c]}"] = hausdorff95(pred == c, target == c)
            rows.append(row)
    counts, _ = acc.reduce()
    rows = gather_rows(rows)
    n = len(shards)
    if len(rows) != n or len({r["key"] for r in rows}) != n or counts[k * k + 2] != n:
        raise RuntimeError(f"evaluated {len(rows)} rows for {n} samples")
    if d.is_main:
        metrics = summarize_classes(counts, names)
        matrix = confusion_matrix(counts, k)
        for c in names[1:]:   # per class, over the images where both masks hold the class
            hd = np.array([r[f"hd95/{c}"] for r in rows if math.isfinite(r[f"hd95/{c}"])])
            metrics[f"hd95_mean/{c}"] = float(hd.mean()) if hd.size else None
            metrics[f"hd95_images/{c}"] = int(hd.size)
        metrics.update({"classes": names, "confusion_matrix": matrix, "ignore_index": ignore,
                        "hd95_unit": "pixels of the original image" if resolution == "original"
                        else f"pixels at the model size {model.size}",
                        "checkpoint": checkpoint_field(args), "data": str(data), "split": split, "tta": args.tta,
                        "resolution": resolution, "inference": args.inference,
                        "overlap": args.overlap if sliding else None,
                        "world_size": d.world_size, "arch": model.arch, "encoder": model.encoder,
                        "size": model.size})
        out.mkdir(parents=True, exist_ok=True)
        log.open_file(out / "evaluate.log")
        write_json_atomic(out / "metrics.json", {k_: _finite(v) for k_, v in metrics.items()})
        write_json_atomic(out / "confusion.json", {"classes": names, "rows": "true class",
                                                   "columns": "predicted class", "pixels": matrix})
        plot_confusion(matrix, names, out / "confusion.png", f"{split}: pixels per true class")
        rows.sort(key=lambda r: r["key"])
        fields = ["key", "source", "group", "dice"] + [f"{m}/{c}" for c in names[1:]
                                                       for m in ("dice", "target_area", "prediction_area", "hd95")]
        with open(out / "per_image.csv.tmp", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            wr.writeheader()
            for r in rows:
                wr.writerow({k_: ("" if not math.isfinite(v) else f"{v:.6f}") if isinstance(v, float) else v
                             for k_, v in r.items()})
        (out / "per_image.csv.tmp").replace(out / "per_image.csv")
        if args.cases > 0:
            log.info(f"evaluate: drawing {out / 'cases.png'} (the {args.cases} worst and best images)")
            plot_class_cases(rows, ClassEvalSamples(shards, model, []), model, out / "cases.png", args.tta,
                             args.cases, names, args.inference, args.overlap, args.batch_size)
        per = ", ".join(f"{c} {fmt(metrics[f'dice/{c}'])}" for c in names[1:])
        log.info(f"evaluate: dice {fmt(metrics['dice'])} (mean over {k - 1} classes: {per}), pixel accuracy "
                 f"{fmt(metrics['accuracy'])} ({metrics['samples']} images) -> {out}")
    distmod.barrier()
    distmod.cleanup()
    log.close()
    return 0


def plot_class_cases(rows: list[dict], samples: ClassEvalSamples, model: Predictor, path: Path, tta: bool,
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
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")

