"""The work of `python -m tumorseg_dist.predict` (its flags and outputs: tumorseg_dist/predict.py):
masks, overlays and areas for image files, folders and packed shards."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
from PIL import Image

from .. import outputs, threads
from ..data.shards import IndexedShards, read_sample
from ..data.shards import MANIFEST, ShardError, read_manifest, shard_paths
from ..data.verify import verify_local
from ..imageio import IMAGE_EXTS, ImageFileError, read_image
from ..log import Console
from ..onnx_predictor import resolve_threshold
from ..options import PredictArgs

MASK_NAME = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)


# ---------------------------------------------------------------- inputs

@dataclass(frozen=True)
class InputItem:
    name: str            # output path relative to masks/ (POSIX, .png)
    display: str         # the input as the user knows it (file path or shard source)
    path: Path | None    # an image file, or None for a shard sample
    shard: int = -1      # index into PredictDataset.shards
    index: int = -1      # sample index within that shard set
    key: str = ""


def _mask_png_name(rel: PurePosixPath) -> str:
    return str(rel.with_suffix(".png"))


def collect_inputs(inputs: tuple[Path, ...], splits: tuple[str, ...], verify: str = "quick",
                   log: Callable[[str], None] | None = None) \
        -> tuple[list[InputItem], list[IndexedShards], list[tuple[str, str]]]:
    """Expand files, folders and shard dirs into items; missing inputs go to `problems`. A shard
    dir's chosen splits are checked against its manifest first (`verify`: --verify-shards): a
    bad shard is a ShardError naming it and the re-pack command, before anything is written."""
    items: list[InputItem] = []
    shard_sets: list[IndexedShards] = []
    problems: list[tuple[str, str]] = []
    for inp in inputs:
        inp = Path(inp)
        if inp.is_dir() and (inp / MANIFEST).is_file():
            manifest = read_manifest(inp)
            wanted = list(splits or manifest["splits"])
            chosen = [s for s in wanted if s in manifest["splits"]]
            report = verify_local(inp, chosen, verify, manifest=manifest)
            if log is not None:
                log(f"predict: {inp}: {report.line(chosen)}")
            for split in wanted:
                if split not in manifest["splits"]:
                    problems.append((str(inp), f"has no split {split!r} (it has {', '.join(manifest['splits'])})"))
                    continue
                ds = IndexedShards(shard_paths(inp, split, manifest))
                shard_sets.append(ds)
                for i, ref in enumerate(ds.refs):
                    # the real name comes from the sample's json; resolved when it is read
                    items.append(InputItem(name="", display=f"{inp}:{split}/{ref.key}", path=None,
                                           shard=len(shard_sets) - 1, index=i, key=ref.key))
        elif inp.is_dir():
            found = 0
            for p in sorted(inp.rglob("*")):
                rel = p.relative_to(inp)
                if (not p.is_file() or p.suffix.lower() not in IMAGE_EXTS
                        or any(part.startswith(".") for part in rel.parts) or MASK_NAME.search(p.stem)):
                    continue
                items.append(InputItem(name=_mask_png_name(PurePosixPath(rel.as_posix())), display=str(p), path=p))
                found += 1
            if not found:
                problems.append((str(inp), f"folder has no image files ({', '.join(sorted(IMAGE_EXTS))})"))
        elif inp.exists():
            items.append(InputItem(name=_mask_png_name(PurePosixPath(inp.name)), display=str(inp), path=inp))
        else:
            problems.append((str(inp), "no such file or folder"))
    return items, shard_sets, problems


class PredictDataset:  # map-style for torch's DataLoader; no torch base: --onnx runs without torch
    """Item i -> decoded original image, preprocessed tensor, ground truth if known, or the error."""

    def __init__(self, items: list[InputItem], shards: list[IndexedShards], model,
                 inference: str = "whole"):
        self.items, self.shards = items, shards
        # the sliding window preprocesses tile by tile, from the image
        self.pre = model.pre if inference == "whole" else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        gt, name = None, item.name
        try:
            if item.path is not None:
                image = read_image(item.path)
            else:
                s = read_sample(self.shards[item.shard], item.index)
                image, gt = s.image, s.mask > 0
                name = _mask_png_name(PurePosixPath(s.meta.get("source") or item.key))
            tensor = None if self.pre is None else self.pre(image)
        except (ImageFileError, ShardError, KeyError, StopIteration, OSError, ValueError) as e:
            return {"item": item, "error": str(e) if isinstance(e, ImageFileError)
                    else f"{item.display}: {type(e).__name__}: {e}"}
        return {"item": item, "name": name, "image": image, "tensor": tensor, "gt": gt, "error": None}


def _collate(batch: list[dict]) -> list[dict]:
    return batch


# ---------------------------------------------------------------- main



def unique_name(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    stem, n = name[:-len(".png")], 2
    while f"{stem}__{n}.png" in taken:
        n += 1
    return f"{stem}__{n}.png"


def load_predictor(args: PredictArgs, budget: threads.Budget):
    """The PyTorch predictor (a checkpoint or an ensemble), or with --onnx the torch-free one
    (onnx_predictor: numpy and onnxruntime only, so torch is never imported on that path)."""
    if args.onnx is not None:
        from ..onnx_predictor import load_onnx
        return load_onnx(args.onnx, budget.torch_threads, args.device)
    threads.apply(budget)
    from ..dist import resolve_device
    from ..inference import load_ensemble
    return load_ensemble(args.checkpoint, resolve_device(args.device), args.threshold)


class InProcessBatches:
    """The --onnx path's loader: items read in this process, `batch_size` at a time (torch's
    DataLoader would import torch; onnxruntime runs its own threads)."""

    def __init__(self, dataset: PredictDataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        for i in range(0, n, self.batch_size):
            yield [self.dataset[j] for j in range(i, min(i + self.batch_size, n))]


def make_loader(dataset: PredictDataset, batch_size: int, workers: int, onnx: bool):
    if onnx:
        return InProcessBatches(dataset, batch_size)
    import torch
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       num_workers=workers, collate_fn=_collate)


def run(args: PredictArgs) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    log = Console()
    budget = threads.plan(args.workers)
    model = load_predictor(args, budget)
    threshold = resolve_threshold(args.threshold, model)
    volumes, inputs = split_volumes(args.inputs)
    items, shard_sets, problems = (collect_inputs(inputs, args.split, args.verify_shards, log.info)
                                   if inputs else ([], [], []))
    for src, why in problems:
        log.warning(f"predict: skipped {src}: {why}")
    if not items and not volumes:
        raise ValueError("no images to predict in " + ", ".join(map(str, args.inputs)))
    sliding = args.inference == "sliding"
    how = f", sliding window (overlap {args.overlap})" if sliding else ""
    names = label_names(model, args)   # K classes: label PNGs; None: binary masks
    if volumes:   # refused before anything is written
        check_volume_model(volumes[0], model, args, names)
    log.info(f"predict: {len(items)} image(s){f' and {len(volumes)} volume(s)' if volumes else ''} with "
             f"{model.name} at {model.size}px, "
             f"threshold {threshold}{how}{', flip-TTA' if args.tta else ''} -> {args.out}")
    masks_dir, over_dir = args.out / "masks", args.out / "overlays"
    masks_dir.mkdir(parents=True, exist_ok=True)
    log.open_file(args.out / "predict.log")
    log.info(f"predict: threads: {budget.describe()}")
    # Sliding: --batch-size counts tiles, and images come one at a time (a huge image and its
    # full-size accumulator are the only large things in memory).
    loader = make_loader(PredictDataset(items, shard_sets, model, args.inference),
                         1 if sliding else args.batch_size, budget.workers, args.onnx is not None)
    rows, taken, renamed = [], set(), []
    for batch in log.progress(loader, len(loader), "predict", unit="batch"):
        good = []
        for r in batch:
            if r["error"] is None:
                good.append(r)
            else:
                problems.append((r["item"].display, r["error"]))
                log.warning(f"predict: skipped {r['error']}")
        if not good:
            continue
        if sliding or args.onnx is not None:  # the ONNX graph takes one image at a time
            preds = [model.predict_image(r["image"], args.tta, threshold, args.inference, args.overlap,
                                         args.batch_size) for r in good]
        else:
            preds = model.predict([r["tensor"] for r in good], [r["image"].shape[:2] for r in good],
                                  args.tta, threshold)
        for r, pred in zip(good, preds):
            h, w = pred.shape
            name = unique_name(r["name"], taken)
            if name != r["name"]:
                renamed.append((r["item"].display, name))
            taken.add(name)
            if names:
                rows.append(write_labels(r, pred, name, args, names, len(rows)))
                continue
            save_png(pred * 255, masks_dir / name, kept(len(rows), masks_dir))
            if args.overlay:
                from ..figures import overlay_image  # (figures imports torch: --overlay loads it)
                save_png(overlay_image(r["image"], pred, r["gt"]), over_dir / name,
                         kept(len(rows) + 1, masks_dir))
            area = int(pred.sum())
            rows.append({"input": r["item"].display, "mask": str(Path("masks") / name), "height": h,
                         "width": w, "lesion_pixels": area, "lesion_fraction": round(area / (h * w), 6),
                         "gt_pixels": "" if r["gt"] is None else int(r["gt"].sum())})
    if volumes:
        rows += predict_volumes(volumes, model, threshold, args, log, problems, len(rows))
    with outputs.atomic(args.out / "areas.csv", kept(len(rows), masks_dir)) as tmp, \
            open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=label_fields(names) if names else [
            "input", "mask", "height", "width", "lesion_pixels", "lesion_fraction", "gt_pixels"])
        wr.writeheader()
        wr.writerows(rows)
    for src, name in renamed:
        log.warning(f"predict: {src}: its mask name was already written by another input; "
                    f"wrote masks/{name} instead")
    skipped = args.out / "skipped.csv"
    if problems:
        with outputs.atomic(skipped, f"the {len(rows)} mask(s) in {masks_dir} and areas.csv are complete") as tmp, \
                open(tmp, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["input", "reason"])
            wr.writerows(problems)
    elif skipped.exists():
        skipped.unlink()  # left from an earlier run into the same folder
    log.info(f"predict: wrote {len(rows)} mask(s) to {masks_dir}"
             + (f" and overlays to {over_dir}" if args.overlay else "")
             + f"; areas in {args.out / 'areas.csv'}"
             + (f"; {len(problems)} input(s) skipped, listed in {skipped}" if problems else ""))
    log.close()
    return 1 if problems else 0


def save_png(pixels: np.ndarray, path: Path, kept: str) -> None:
    """An 8-bit grey or RGB PNG, whole or not at all (outputs.atomic: `kept` is what a failed
    write leaves)."""
    with outputs.atomic(path, kept) as tmp:
        Image.fromarray(np.asarray(pixels).astype(np.uint8)).save(tmp, format="PNG")


def kept(masks: int, masks_dir: Path) -> str:
    """What a failed write leaves: the `masks` masks written so far are complete (an overlay
    is written after its mask); the areas.csv that lists them is written at the end, so a
    rerun with space writes everything."""
    done = f"the {masks} mask(s) written so far are complete in {masks_dir}" if masks else "no mask was written"
    return done + "; areas.csv (written last) was not written"


# ---------------------------------------------------------------- K classes

def label_names(model, args: PredictArgs) -> list[str] | None:
    """The class names of a K-class model (pack --classes), else None (binary masks); its
    predict/predict_image give label maps then. An ONNX file carries them in its metadata (one
    exported before they were kept: class_1, class_2, ...)."""
    k = getattr(model, "classes", None) or getattr(model, "out_channels", 1)
    if k <= 1:
        return None
    return list(getattr(model, "class_names", None) or ["background", *(f"class_{i}" for i in range(1, k))])


def label_fields(names: list[str]) -> list[str]:
    return ["input", "mask", "height", "width"] + [f"{m}/{c}" for c in names[1:] for m in ("pixels", "fraction")] \
        + ["gt_pixels"]


def write_labels(r: dict, labels: np.ndarray, name: str, args: PredictArgs, names: list[str],
                 written: int) -> dict:
    """masks/NAME.png: the class ids as an 8-bit label PNG (0 = background); with --overlay,
    overlays/NAME.png: the classes in colour with a legend (`written` masks before them).
    Returns the areas.csv row."""
    labels = np.asarray(labels).astype(np.uint8)
    save_png(labels, args.out / "masks" / name, kept(written, args.out / "masks"))
    if args.overlay:
        from ..figures import save_label_overlay
        save_label_overlay(r["image"], labels, names, args.out / "overlays" / name, r["item"].display,
                           kept(written + 1, args.out / "masks"))
    h, w = labels.shape
    row = {"input": r["item"].display, "mask": str(Path("masks") / name), "height": h, "width": w,
           "gt_pixels": "" if r["gt"] is None else int(r["gt"].sum())}
    for c in range(1, len(names)):
        n = int((labels == c).sum())
        row[f"pixels/{names[c]}"], row[f"fraction/{names[c]}"] = n, round(n / (h * w), 6)
    return row



# ---------------------------------------------------------------- volumes

def is_volume(path: Path) -> bool:
    """A NIfTI file, or a folder of DICOM files (one series)."""
    from ..data.formats.volumes import is_dicom_name, nifti_stem
    if path.is_file():
        return nifti_stem(path.name) is not None
    if path.is_dir() and not (path / MANIFEST).is_file():
        files = [p for p in path.iterdir() if p.is_file()]
        return bool(files) and all(is_dicom_name(path, p.name) for p in files)
    return False


def split_volumes(inputs: tuple[Path, ...]) -> tuple[list[Path], tuple[Path, ...]]:
    """(volume inputs, the other inputs); a folder's NIfTI files are volumes too."""
    from ..data.formats.volumes import nifti_stem
    volumes, rest = [], []
    for inp in map(Path, inputs):
        if is_volume(inp):
            volumes.append(inp)
            continue
        if inp.is_dir() and not (inp / MANIFEST).is_file():
            found = sorted(p for p in inp.rglob("*") if p.is_file() and nifti_stem(p.name) is not None)
            volumes += found
            if found and not any(p.suffix.lower() in IMAGE_EXTS for p in inp.rglob("*")):
                continue   # a folder of volumes only: not "a folder without images"
        rest.append(inp)
    return volumes, tuple(rest)


def predict_volumes(volumes: list[Path], model, threshold: float, args: PredictArgs, log: Console,
                    problems: list, done: int) -> list[dict]:
    """Each volume sliced as the training data was packed (its manifest's axis and intensity
    rule), every slice predicted (ensemble, TTA and --inference as for images), the 2D masks in
    masks/NAME/ and the mask volume volumes/NAME.nii.gz in the input's geometry. Returns the
    areas.csv rows (one per slice); `done` masks were written before (a failed write says they
    are complete)."""
    from ..data.formats.common import PackInputError
    from ..data.formats.volumes import (AXIS_LETTER, nifti_stem, prediction_slices, read_for_prediction,
                                        save_mask_volume, unplane)
    spec = training_volumes(model)
    if not spec:
        log.warning("predict: the model's training data is not a packed volume dataset (or not found): slicing "
                    "volumes along their acquisition axis with an auto window (0.5-99.5 percentiles)")
    rows = []
    for path in volumes:
        name = nifti_stem(path.name) or path.name
        try:
            vol = read_for_prediction(path)
            axis, images = prediction_slices(vol, spec.get("axis"), spec.get("intensity"))
        except PackInputError as e:
            problems.append((str(path), f"{e.reason}; {e.fix}" if e.fix else e.reason))
            log.warning(f"predict: skipped {path}: {e}")
            continue
        masks = []
        width = max(4, len(str(len(images) - 1)))
        for k, image in enumerate(images):
            pred = np.asarray(model.probability_map(image, args.tta, args.inference, args.overlap,
                                                    args.batch_size) > threshold)
            masks.append(pred)
            rel = Path("masks") / name / f"{name}_{AXIS_LETTER[axis]}{k:0{width}d}.png"
            save_png(pred * 255, args.out / rel, kept(done + len(rows), args.out / "masks"))
            h, w = pred.shape
            rows.append({"input": f"{path}#{AXIS_LETTER[axis]}{k}", "mask": str(rel), "height": h, "width": w,
                         "lesion_pixels": int(pred.sum()), "lesion_fraction": round(int(pred.sum()) / (h * w), 6),
                         "gt_pixels": ""})
        out = args.out / "volumes" / f"{name}.nii.gz"
        save_mask_volume(unplane(masks, vol.data.shape[:3], axis), vol, path, out,
                         kept(done + len(rows), args.out / "masks"))
        log.info(f"predict: {path}: {len(images)} slices along {'xyz'[axis]} -> {out}")
    return rows


def check_volume_model(volume: Path, model, args: PredictArgs, names: list[str] | None) -> None:
    """A volume input needs what predict_volumes slices and writes with: a binary model (the
    mask volume holds 0/1) and a checkpoint, whose training manifest says how the volumes were
    sliced and windowed (an ONNX file does not record it)."""
    if args.onnx is not None:
        raise ValueError(f"{volume}: a volume input needs --checkpoint (its training manifest says how volumes "
                         f"were sliced and windowed; {args.onnx} does not record it): predict it with "
                         f"--checkpoint RUN/checkpoints/best.pt, or pass its slices as images")
    if names:
        raise ValueError(f"{volume}: a volume input is predicted into a binary mask volume, but "
                         f"{args.checkpoint[0]} predicts {len(names)} classes ({', '.join(names)}): use a binary "
                         f"checkpoint, or pass the volume's slices as images (label PNGs)")


def training_volumes(model) -> dict:
    """The `volumes` record (axis, intensity rule) of the data the model was trained on, or {}
    (trained on 2D images: the acquisition axis and an auto window)."""
    path = (getattr(model, "config", None) or {}).get("data", {}).get("path")
    try:
        return read_manifest(Path(path)).get("volumes") or {} if path else {}
    except ShardError:
        return {}
