"""Scoring a packed split through the predictor, every sample once across ranks: what `evaluate`
measures, and what training's end-of-run test evaluation writes to test_metrics.json. One
function for both (`score_split`), so the two agree on the same checkpoint.

Each image is predicted as the `Predictor` predicts (whole image or sliding window, optional flip
TTA) and compared with its mask at its original size, as stored (`resolution="original"`), or at
the training size against the mask resized as the loader resizes it (`"model"`). Per image the
metrics module counts [TP, FP, FN, TN] (binary) or the K×K confusion matrix, as training counts
them; optionally (`surface`) MONAI's HD95 and ASSD.

Several ranks: each scores the real samples of its `rank_indices` slice (the -1 padding is
skipped, not masked: nothing here is batched across ranks, so ranks may run different numbers of
batches), the sums are one float64 all-reduce and the rows one all_gather, so every rank holds the
split's numbers and checks alike that every sample was counted exactly once."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import dist as distmod
from .data.shards import IndexedShards, ShardError, WorkerFailure, read_sample, shard_paths
from .data.torch_loader import rank_indices
from .inference import Predictor, letterbox_box, to_original_labels, to_original_size
from .metrics import (ClassMetricAccumulator, confusion_matrix, image_class_scores, label_confusion,
                      mask_confusion, per_image_scores, summarize, summarize_classes)


# ---------------------------------------------------------------- surface distances

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


def surface_means(rows: list[dict], key: str) -> dict:
    """KEY_mean and KEY_median over the images where KEY is defined (None if none is)."""
    v = np.array([r[key] for r in rows if math.isfinite(r[key])])
    return {f"{key}_mean": float(v.mean()) if v.size else None,
            f"{key}_median": float(np.median(v)) if v.size else None}


def hd95_unit(resolution: str, size: int) -> str:
    return "pixels of the original image" if resolution == "original" else f"pixels at the model size {size}"


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


class ClassEvalSamples(EvalSamples):
    """EvalSamples of a label-mask split: the mask is the class ids (uint8), not a bool."""

    def load(self, i: int) -> dict:
        s = read_sample(self.shards, i)
        return {"index": i, "key": s.key, "meta": s.meta, "mask": s.mask.astype(np.uint8), "image": s.image}


def split_shards(data: Path, split: str, manifest: dict, classes: int = 1) -> IndexedShards:
    """The split's samples; a K-class model's masks read as class ids."""
    return IndexedShards(shard_paths(data, split, manifest), labels=classes > 1)


def samples_of(shards: IndexedShards, model: Predictor, indices: list[int], inference: str = "whole") -> EvalSamples:
    return (ClassEvalSamples if model.classes > 1 else EvalSamples)(shards, model, indices, inference)


def _collate(batch: list[dict]) -> list[dict]:
    return batch


# ---------------------------------------------------------------- one image

def _nearest(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(m, size=hw, mode="nearest-exact")[0, 0].numpy()


def model_size_pair(prob: torch.Tensor, mask: np.ndarray, size: int, geometry: str):
    """(probabilities [..., h, w], target [h, w]) at the model size, over the pixels training
    counts: the whole square for squash; for a letterbox (or crop) model only the image's box in
    the letterbox (the padding is excluded, as Batch.pad excludes it), the mask resized
    nearest-exact to that box."""
    p = prob.float().cpu()
    if geometry == "squash":
        return p, _nearest(mask, (size, size))
    top, left, ly, lx = letterbox_box(*mask.shape, size)
    return p[..., top:top + ly, left:left + lx], _nearest(mask, (ly, lx))


def score(prob: torch.Tensor, mask: np.ndarray, threshold: float, resolution: str, size: int,
          geometry: str = "squash"):
    """One image: (prediction, target) at the chosen resolution and its float64 [TP, FP, FN, TN],
    counted by the metrics module as training counts them (geometry: the predictor's whole-image
    geometry, undone by to_original_size)."""
    if resolution == "original":
        pred = to_original_size(prob, *mask.shape, geometry) > threshold
        target = torch.from_numpy(mask)
    else:
        p, t = model_size_pair(prob, mask, size, geometry)
        pred, target = p[0] > threshold, torch.from_numpy(t > 0.5)
    return pred.numpy(), target.numpy(), mask_confusion(pred[None], target[None])[0]


def class_score(prob: torch.Tensor, mask: np.ndarray, resolution: str, size: int,
                geometry: str = "squash") -> tuple[np.ndarray, np.ndarray]:
    """One image's (predicted labels, target labels) at the chosen resolution: the argmax of the
    K probabilities resized to the original size, or at the model size against the mask resized
    as the loader resizes it (nearest; a letterbox model: inside the image's box)."""
    if resolution == "original":
        return to_original_labels(prob, *mask.shape, geometry), mask
    p, t = model_size_pair(prob, mask, size, geometry)
    return p.argmax(0).to(torch.uint8).numpy(), t.astype(np.uint8)


# ---------------------------------------------------------------- a split

@dataclass
class Scores:
    """A split's scores, the same on every rank. metrics: the dataset-level numbers (summarize /
    summarize_classes, and the surface means when asked); rows: one dict per image, every
    rank's, unsorted (`_index` is the sample's index in the split); matrix: the K×K pixel
    confusion matrix (None for binary masks); resolution: where the masks were compared."""
    metrics: dict
    rows: list[dict]
    matrix: list[list[int]] | None
    resolution: str


def gather_rows(rows: list[dict]) -> list[dict]:
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()):
        return rows
    out: list[list[dict] | None] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, rows)
    return [r for part in out for r in part]


def _predictions(model: Predictor, samples: EvalSamples, log, desc: str, tta: bool, inference: str,
                 overlap: float, batch_size: int, workers: int):
    """(sample, probabilities) of each of `samples`: [C, S, S] at the model size (whole image), or
    [H, W] / [K, H, W] at the image's size (sliding window)."""
    sliding = inference == "sliding"
    # Sliding: batch_size counts tiles, and images come one at a time, so that only one full-size
    # image (with its accumulator) is in the main process at once.
    loader = torch.utils.data.DataLoader(samples, batch_size=1 if sliding else batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_collate)
    for batch in log.progress(loader, len(loader), desc, unit="batch"):
        for s in batch:
            if isinstance(s, WorkerFailure):
                s.reraise()
        if sliding:
            probs = [model.sliding_probabilities(s.pop("image"), tta, overlap, batch_size) for s in batch]
        else:
            probs = model.probabilities(torch.stack([s["tensor"] for s in batch]), tta=tta)
        yield from zip(batch, probs)


def score_split(model: Predictor, shards: IndexedShards, d: distmod.DistInfo, log, *, threshold: float,
                tta: bool = False, inference: str = "whole", overlap: float = 0.5, batch_size: int = 8,
                resolution: str = "original", workers: int = 0, surface: bool = True,
                desc: str = "evaluate") -> Scores:
    """Every sample of `shards` scored once over the ranks (collective: every rank calls it).
    `log` shows the progress bar (`log.progress`); `surface` adds HD95 and ASSD per image and
    their means (MONAI: seconds to import, milliseconds per image). The sliding window predicts
    at the original size, so it compares there whatever `resolution` says."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if inference == "sliding":
        resolution = "original"
    mine = [i for i in rank_indices(len(shards), d.rank, d.world_size, False, 0, 0) if i >= 0]
    samples = samples_of(shards, model, mine, inference)
    pairs = _predictions(model, samples, log, desc, tta, inference, overlap, batch_size, workers)
    if model.classes > 1:
        return _score_classes(model, pairs, len(shards), d, resolution, surface)
    return _score_binary(model, pairs, len(shards), d, threshold, resolution, surface)


def _score_binary(model: Predictor, pairs, n: int, d, threshold: float, resolution: str, surface: bool) -> Scores:
    rows: list[dict] = []
    counts = []
    for s, prob in pairs:
        pred, target, c = score(prob, s["mask"], threshold, resolution, model.size, model.geometry)
        counts.append(c)
        row = {"key": s["key"], "source": s["meta"].get("source", ""), "group": s["meta"].get("group") or "",
               "target_area": int(target.sum()), "prediction_area": int(pred.sum()), "_index": s["index"]}
        if surface:
            row.update(surface_scores(pred, target, pixel_spacing(s["meta"], s["mask"].shape, target.shape)))
        rows.append(row)
    c = torch.stack(counts) if counts else torch.zeros(0, 4, dtype=torch.float64)
    dice, iou = per_image_scores(c)
    for r, di, ii in zip(rows, dice.tolist(), iou.tolist()):
        r["dice"], r["iou"] = di, ii
    totals = torch.cat([c.sum(0), torch.stack([dice.sum(), iou.sum(), c.new_tensor(len(rows))])]).to(d.device)
    totals = distmod.all_reduce_sum(totals).tolist()
    rows = gather_rows(rows)  # every rank gets all rows, so every rank can check (and fail) alike
    keys = [r["key"] for r in rows]
    if len(keys) != n or len(set(keys)) != n or totals[6] != n:  # the contract this module promises
        raise RuntimeError(f"evaluated {len(keys)} rows ({len(set(keys))} distinct) for {n} samples")
    metrics = summarize(totals)  # NaN where a ratio is undefined: null in JSON, n/a printed
    if surface:
        defined = {k: sum(math.isfinite(r[k]) for r in rows) for k in ("hd95", "hd95_mm")}
        metrics.update({
            **surface_means(rows, "hd95"), "hd95_images": defined["hd95"],
            "hd95_unit": hd95_unit(resolution, model.size),
            # Only the images whose json gives their spacing (slices of volumes: spacing_mm).
            **surface_means(rows, "hd95_mm"), "hd95_mm_images": defined["hd95_mm"],
            **surface_means(rows, "assd"), **surface_means(rows, "assd_mm")})
    return Scores(metrics, rows, None, resolution)


def _score_classes(model: Predictor, pairs, n: int, d, resolution: str, surface: bool) -> Scores:
    names = list(model.class_names)
    k = len(names)
    ignore = (model.config.get("loss") or {}).get("ignore_index")
    acc = ClassMetricAccumulator(d.device, k, ignore_index=ignore)
    rows: list[dict] = []
    for s, prob in pairs:
        pred, target = class_score(prob, s["mask"], resolution, model.size, model.geometry)
        cm = label_confusion(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], k, ignore)
        acc.add(cm)
        dice, _ = image_class_scores(cm)
        row = {"key": s["key"], "source": s["meta"].get("source", ""), "group": s["meta"].get("group") or "",
               "dice": float(dice.mean()), "target_area": int((target > 0).sum()), "_index": s["index"]}
        for c in range(1, k):
            row[f"dice/{names[c]}"] = float(dice[0, c - 1])
            row[f"target_area/{names[c]}"] = int((target == c).sum())
            row[f"prediction_area/{names[c]}"] = int((pred == c).sum())
            if surface:
                row[f"hd95/{names[c]}"] = hausdorff95(pred == c, target == c)
        rows.append(row)
    counts, _ = acc.reduce()
    rows = gather_rows(rows)
    if len(rows) != n or len({r["key"] for r in rows}) != n or counts[k * k + 2] != n:
        raise RuntimeError(f"evaluated {len(rows)} rows for {n} samples")
    metrics = summarize_classes(counts, names)
    if surface:
        for c in names[1:]:   # per class, over the images where both masks hold the class
            hd = np.array([r[f"hd95/{c}"] for r in rows if math.isfinite(r[f"hd95/{c}"])])
            metrics[f"hd95_mean/{c}"] = float(hd.mean()) if hd.size else None
            metrics[f"hd95_images/{c}"] = int(hd.size)
    return Scores(metrics, rows, confusion_matrix(counts, k), resolution)
