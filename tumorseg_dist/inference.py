"""The predictor: a trained model ready for inference, loaded from a checkpoint.

The one path from an image to a mask, used by `evaluate`, `predict` and `export`'s check:
`load_model` rebuilds the model from a checkpoint (weights only; the checkpoint decides the
architecture, encoder, size, channels, normalisation and threshold, so no training flag has to
be repeated), `Preprocess` feeds an image as the training loader's evaluation path does
(`[0, 1]` pixels -> the model's channel count, grey repeated, colour to BT.601 luma -> bilinear
antialiased resize to the training size -> (x - mean) / std), `Predictor.probabilities` runs it
(with optional flip TTA) and `to_original_size` brings the probabilities back to the image's
own size.

Flip test-time augmentation averages the *probabilities* of the identity, horizontal, vertical
and both-axes flips (each un-flipped before averaging).

Two ways to get an image's probability map (`Predictor.probability_map`, `--inference`):
`whole` resizes the image to the training size as the training loader's evaluation did, and
the map back: a squash checkpoint (the default, and every checkpoint before issue 15) squashes
to size × size; a `--geometry letterbox` checkpoint, and a `crop` one (its loader evaluates as
letterbox), is fed the letterboxed image (`letterbox_box`: data/geometry.py's placement, the
aspect kept, centred, the border raw 0 as the loader's warp leaves it, then normalised) and its
map is cropped to the image's box and resized back (`to_original_size(..., geometry)`);
`sliding` (`sliding_window_probs`) keeps the image at its own resolution and runs the model on
tiles of the training size, stitched with Gaussian weights (docs/inference.md, "Sliding window").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint
from .checkpoint import CheckpointError
from .config import Arch, ModelConfig
from .data.batch import to_channels
from .data.geometry import origin, scaled_size
from .models import ModelError, build_model, model_name
from .onnx_predictor import WEIGHT_FLOOR, SIGMA_SCALE, resolve_threshold, tile_starts  # noqa: F401 (re-exported)
from .onnx_predictor import gaussian_weights as _gaussian_weights, pad_to_tile
from .onnx_predictor import at_tile_scale, map_back, tile_scale
from .options import Inference, check_overlap

KNOWN_ARCHS = Arch.__args__  # the Literal's choices
INFERENCE_MODES: tuple[str, ...] = Inference.__args__


@dataclass(frozen=True)
class Preprocess:
    """The model's input transform; small and picklable, so DataLoader workers can run it."""

    in_channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    geometry: str = "squash"   # whole-image geometry: squash | letterbox (`whole_geometry`)

    def __call__(self, image: np.ndarray, size: int | None = None) -> torch.Tensor:
        """H×W or H×W×C float image in [0, 1] -> normalised [C, size, size] float32 tensor."""
        return preprocess(image, self.in_channels, size or self.size, self.mean, self.std, self.geometry)


@dataclass
class Predictor:
    """An eval-mode model plus everything needed to feed it and read its output."""

    model: nn.Module
    arch: str
    encoder: str
    in_channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threshold: float
    device: torch.device
    source: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    members: tuple["Predictor", ...] = ()   # an ensemble's other checkpoints (load_ensemble)

    @property
    def name(self) -> str:
        """`unet/resnet34`, or just the architecture when it has no encoder; an ensemble says
        how many models and which."""
        if not self.members:
            return model_name(self.arch, self.encoder)
        names = sorted({model_name(m.arch, m.encoder) for m in self.models})
        return f"ensemble of {len(self.models)} ({', '.join(names)})"

    @property
    def models(self) -> tuple["Predictor", ...]:
        """Every model whose probabilities are averaged: this one, then its members."""
        return (self, *self.members)

    @property
    def sources(self) -> list[Path | None]:
        return [m.source for m in self.models]

    @property
    def geometry(self) -> str:
        """How `whole` feeds the model (`whole_geometry` of the checkpoint's data.geometry)."""
        return whole_geometry(self.config)

    @property
    def tile_scale(self) -> str:
        """The scale `sliding` cuts this model's tiles at (onnx_predictor.tile_scale): the image
        with its short side resized to the size for a `crop --crop-scale resize` checkpoint
        (the scale it trained at), else the image's own resolution."""
        data = self.config.get("data") or {}
        crop_scale = str(data.get("crop_scale") or "resize")
        if crop_scale not in ("resize", "native"):
            raise CheckpointError(f"the checkpoint's data.crop_scale {crop_scale!r} is unknown to this "
                                  "version (known: resize, native); upgrade the package")
        whole_geometry(self.config)   # a geometry this version knows, else CheckpointError
        return tile_scale(str(data.get("geometry") or "squash"), crop_scale)

    @property
    def pre(self) -> Preprocess:
        return Preprocess(self.in_channels, self.size, self.mean, self.std, self.geometry)

    def to_original(self, probs: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`to_original_size` of this model's whole-image probabilities (its geometry undone)."""
        return to_original_size(probs, height, width, self.geometry)

    def preprocess(self, image: np.ndarray, size: int | None = None) -> torch.Tensor:
        """H×W or H×W×C float image in [0, 1] -> normalised [C, size, size] float32 tensor."""
        return self.pre(image, size)

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """[B, C, S, S] normalised -> [B, 1, S, S] tumour probabilities (float32); an ensemble's
        mean over its models (each fed the batch in its own normalisation, `renormalise`)."""
        x = batch.to(self.device)
        if not self.members:
            return flip_tta_probs(self.model, x, tta)
        acc = None
        for m in self.models:
            p = flip_tta_probs(m.model, renormalise(x, self.mean, self.std, m.mean, m.std), tta)
            acc = p if acc is None else acc + p
        return acc / len(self.models)

    def predict(self, tensors: list[torch.Tensor], shapes: list[tuple[int, int]], tta: bool = False,
                threshold: float | None = None) -> list[np.ndarray]:
        """Preprocessed images and their original (H, W) -> one boolean mask per image at its
        original size (probabilities resized back, then thresholded); a K-class model: the uint8
        label map (resized back, then the argmax)."""
        t = self.threshold if threshold is None else threshold
        probs = self.probabilities(torch.stack(tensors), tta)
        g = self.geometry
        if probs.shape[1] > 1:
            return [to_original_labels(p, h, w, g) for p, (h, w) in zip(probs, shapes)]
        return [(to_original_size(p, h, w, g) > t).numpy() for p, (h, w) in zip(probs, shapes)]

    def sliding_probabilities(self, image: np.ndarray, tta: bool = False, overlap: float = 0.5,
                              batch_size: int = 8) -> torch.Tensor:
        """One [0, 1] image at its own resolution -> [H, W] probabilities (float32, CPU), from
        tiles of the training size (`sliding_window_probs`) cut at the model's `tile_scale` (a
        `crop --crop-scale resize` model: the image resized to its training scale first, the
        map resized back). An ensemble: the mean of its models' maps."""
        acc = None
        h, w = image.shape[:2]
        for m in self.models:   # each at its own tile scale, its map brought back to H × W
            p = sliding_window_probs(m.model, at_tile_scale(image, m.size, m.tile_scale),
                                     in_channels=m.in_channels, size=m.size, mean=m.mean, std=m.std,
                                     overlap=overlap, batch_size=batch_size, tta=tta, device=self.device)
            if tuple(p.shape[-2:]) != (h, w):
                p = torch.from_numpy(map_back(p.numpy(), h, w))
            acc = p if acc is None else acc.add_(p)
        return acc if not self.members else acc / len(self.models)

    def probability_map(self, image: np.ndarray, tta: bool = False, inference: str = "whole",
                        overlap: float = 0.5, batch_size: int = 8) -> torch.Tensor:
        """One [0, 1] image -> its [H, W] probabilities at the image's size (float32, CPU)."""
        if inference == "sliding":
            return self.sliding_probabilities(image, tta, overlap, batch_size)
        if inference != "whole":
            raise ValueError(f"--inference must be one of {', '.join(INFERENCE_MODES)}, got {inference!r}")
        return self.to_original(self.probabilities(self.preprocess(image)[None], tta)[0], *image.shape[:2])

    def predict_image(self, image: np.ndarray, tta: bool = False, threshold: float | None = None,
                      inference: str = "whole", overlap: float = 0.5, batch_size: int = 8) -> np.ndarray:
        """One [0, 1] image -> its boolean mask at the image's size (K classes: its label map)."""
        if inference == "whole":  # the batched path, so that a single image is predicted as in a batch
            return self.predict([self.preprocess(image)], [image.shape[:2]], tta, threshold)[0]
        t = self.threshold if threshold is None else threshold
        p = self.probability_map(image, tta, inference, overlap, batch_size)
        return p.argmax(0).to(torch.uint8).numpy() if p.dim() == 3 else (p > t).numpy()

    @property
    def classes(self) -> int:
        """Output channels, from the checkpoint's config: 1 (binary: a sigmoid tumour
        probability) or K (softmax over K classes, background first; `pack --classes`)."""
        return int((self.config.get("model") or {}).get("classes") or 1)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names by id (binary: background, tumour), from the checkpoint's config."""
        names = tuple((self.config.get("model") or {}).get("class_names") or ())
        return names if self.classes > 1 and len(names) == self.classes else ("background", "tumour")


def _hwc(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float32)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _normalise(t: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (t - m) / s


def whole_geometry(config: dict) -> str:
    """The geometry `whole` inference feeds a checkpoint's model: its config's data.geometry
    (absent before issue 15: squash), with crop as letterbox (the crop loader's evaluation)."""
    g = str((config.get("data") or {}).get("geometry") or "squash")
    if g not in ("squash", "letterbox", "crop"):
        raise CheckpointError(f"the checkpoint's data.geometry {g!r} is unknown to this version "
                              "(known: squash, letterbox, crop); upgrade the package")
    return "squash" if g == "squash" else "letterbox"


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, ly, lx): where an image of height × width lands in its size × size letterbox,
    the numbers of the loaders' `geometry.place` (long side to size, rounded half up, centred)."""
    ly, lx = scaled_size(height, width, size, "letterbox")
    return -origin(ly, size), -origin(lx, size), ly, lx


def preprocess(image: np.ndarray, in_channels: int, size: int, mean, std,
               geometry: str = "squash") -> torch.Tensor:
    """The torch loader's evaluation transform (its collate), for one image: squashed to
    size × size, or letterboxed (resized to `letterbox_box`'s ly × lx, antialiased as the loader
    shrinks, on a border of raw 0), then normalised."""
    t = to_channels(_chw(_hwc(image)), in_channels)
    if geometry == "squash":
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    elif geometry == "letterbox":
        top, left, ly, lx = letterbox_box(*t.shape[-2:], size)
        r = F.interpolate(t[None], size=(ly, lx), mode="bilinear", align_corners=False,
                          antialias=True)[0]
        t = t.new_zeros((t.shape[0], size, size))
        t[:, top:top + ly, left:left + lx] = r
    else:
        raise ValueError(f"geometry must be squash or letterbox for whole-image inference, got {geometry!r}")
    return _normalise(t, mean, std)


def renormalise(x: torch.Tensor, mean, std, to_mean, to_std) -> torch.Tensor:
    """A batch normalised with (mean, std) as normalising with (to_mean, to_std) would have
    made it: per channel affine, so the ensemble's one preprocessing serves every member."""
    if tuple(mean) == tuple(to_mean) and tuple(std) == tuple(to_std):
        return x
    def col(v):
        return torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * col(std) + col(mean) - col(to_mean)) / col(to_std)


FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def probs_of(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities of [B, K, ...] logits: sigmoid of one channel (binary), softmax over K."""
    x = logits.float()
    return torch.sigmoid(x) if x.shape[1] == 1 else torch.softmax(x, 1)


@torch.no_grad()
def flip_tta_probs(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """sigmoid(model(x)) (softmax for K classes); with tta, the mean probability over the four
    flips, each un-flipped."""
    if not tta:
        return probs_of(model(x))
    acc = None
    for dims in FLIPS:
        xi = x.flip(dims) if dims else x
        p = probs_of(model(xi))
        p = p.flip(dims) if dims else p
        acc = p if acc is None else acc + p
    return acc / len(FLIPS)


def _unletterbox(p: torch.Tensor, height: int, width: int, geometry: str) -> torch.Tensor:
    """[..., S, S] -> the image's box of its letterbox (identity for squash, and for a map
    already at the image's size: the sliding window's)."""
    if geometry == "squash" or tuple(p.shape[-2:]) == (height, width):
        return p
    top, left, ly, lx = letterbox_box(height, width, p.shape[-1])
    return p[..., top:top + ly, left:left + lx]


def to_original_labels(probs: torch.Tensor, height: int, width: int,
                       geometry: str = "squash") -> np.ndarray:
    """[K, S, S] class probabilities -> the [H, W] uint8 label map at the original size: the
    probabilities resized (bilinear, as `to_original_size`), then the argmax."""
    p = _unletterbox(probs.float().cpu()[None], height, width, geometry)
    if tuple(p.shape[-2:]) != (height, width):
        p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
    return p[0].argmax(0).to(torch.uint8).numpy()


def to_original_size(probs: torch.Tensor, height: int, width: int,
                     geometry: str = "squash") -> torch.Tensor:
    """[1, S, S] or [B, 1, S, S] probabilities -> [H, W] (bilinear), on the CPU; K-class
    [K, S, S] or [B, K, S, S] -> [K, H, W] (the first image's). A letterbox model's map is first
    cropped to the image's box (`letterbox_box`), the padding dropped."""
    p = probs.float().cpu()
    while p.dim() < 4:
        p = p[None]
    p = _unletterbox(p, height, width, geometry)
    if tuple(p.shape[-2:]) != (height, width):
        p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
    return p[0, 0] if p.shape[1] == 1 else p[0]


# ---------------------------------------------------------------- sliding window

# The tile layout and the Gaussian live in the torch-free onnx_predictor, so that both predictors
# lay out and weight tiles alike.

def gaussian_weights(size: int) -> torch.Tensor:
    """[size, size] float32 importance map (onnx_predictor.gaussian_weights) as a tensor."""
    return torch.from_numpy(_gaussian_weights(size))


@torch.no_grad()
def sliding_window_probs(model: nn.Module, image: np.ndarray, *, in_channels: int, size: int,
                         mean, std, overlap: float = 0.5, batch_size: int = 8, tta: bool = False,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """One H×W or H×W×C [0, 1] image -> [H, W] float32 probabilities on the CPU, at the image's
    own resolution.

    Tiles of `size` (tile_starts) are preprocessed as `preprocess` does minus the resize (the
    channel handling and normalisation are per pixel, so a tile of the preprocessed image and
    the preprocessed tile are the same), run `batch_size` at a time (flip TTA per tile when
    asked), and their probabilities are added into a full-size accumulator weighted by
    `gaussian_weights`, then divided by the summed weights. Only the accumulator, the weight
    sum and one batch of tiles exist at once, whatever the image's size.

    An image smaller than a tile along an axis is padded to the tile by reflection, centred,
    and the pad cut off at the end: a model trained on whole images (every training geometry
    today) has never seen a constant pad, and a reflected border continues the local intensity
    and texture instead of adding a step edge the model could take for a lesion boundary."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    check_overlap(overlap)
    arr = _hwc(image)
    h, w = arr.shape[:2]
    arr, top, left = pad_to_tile(arr, size)
    ph, pw = arr.shape[:2]
    device = torch.device(device)
    weight = gaussian_weights(size)
    weight_dev = weight.to(device)
    acc = None   # [H, W], or [K, H, W] for a K-class model
    wsum = torch.zeros(ph, pw, dtype=torch.float32)
    starts = [(y, x) for y in tile_starts(ph, size, overlap) for x in tile_starts(pw, size, overlap)]
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        tiles = _normalise(torch.stack([to_channels(_chw(arr[y:y + size, x:x + size]), in_channels)
                                        for y, x in chunk]), mean, std)  # per pixel: per batch is the same
        out = flip_tta_probs(model, tiles.to(device), tta)
        probs = ((out[:, 0] if out.shape[1] == 1 else out) * weight_dev).cpu()
        del tiles, out  # before the next batch is built: one batch of tiles at a time
        if acc is None:
            acc = torch.zeros((*probs.shape[1:-2], ph, pw), dtype=torch.float32)
        for (y, x), p in zip(chunk, probs):
            acc[..., y:y + size, x:x + size] += p
            wsum[y:y + size, x:x + size] += weight
        del probs
    acc /= wsum  # in place: no third full-size map
    if (ph, pw) != (h, w):
        acc = acc[..., top:top + h, left:left + w].clone()
    return acc


# ---------------------------------------------------------------- loading a checkpoint

def _section(cfg: dict, name: str, path: Path) -> dict:
    sec = cfg.get(name, {})
    if not isinstance(sec, dict):
        raise CheckpointError(f"{path}: its config section [{name}] is not a table; the checkpoint "
                              f"is damaged or from an unrelated tool")
    return sec


def describe(ckpt: dict, path: Path) -> dict[str, Any]:
    """The inference-relevant facts of a checkpoint, checked, with an error that names the gap.

    Tolerates config keys this version does not know (older or newer recipes): only the model
    and input keys are read."""
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{path} has no training config (written by a tumorseg_dist version before checkpoints "
            f"carried their config): the architecture and input size are unknown. Re-save it with "
            f"the current version, or evaluate it with the training command it came from.")
    if "model" not in ckpt or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path} has no model weights (key 'model'); is it a tumorseg_dist checkpoint?")
    model, data, train = (_section(cfg, s, path) for s in ("model", "data", "train"))
    missing = [f"model.{k}" for k in ("arch",) if k not in model]
    missing += [f"data.{k}" for k in ("size", "in_channels") if k not in data]
    if missing:
        raise CheckpointError(f"{path}: its config lacks {', '.join(missing)}, needed to rebuild the "
                              f"model; the checkpoint is from an incompatible version")
    try:
        whole_geometry(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    arch = model["arch"]
    if arch not in KNOWN_ARCHS:
        raise CheckpointError(f"{path}: architecture {arch!r} is unknown to this tumorseg_dist version "
                              f"(known: {', '.join(KNOWN_ARCHS)}); upgrade the package")
    norm = ckpt.get("normalization") or {}
    mean = tuple(norm.get("mean") or data.get("mean") or ())
    std = tuple(norm.get("std") or data.get("std") or ())
    c = int(data["in_channels"])
    if len(mean) == 1 and c > 1:
        mean, std = mean * c, std * c
    if len(mean) != c or len(std) != c:
        raise CheckpointError(
            f"{path}: no input normalisation for {c} channel(s) (checkpoint 'normalization' and "
            f"config data.mean/std are {list(mean)} / {list(std)}); it predates recorded "
            f"normalisation. Re-save it with the current version.")
    return {"arch": arch, "encoder": model.get("encoder", "resnet34"), "in_channels": c,
            "size": int(data["size"]), "mean": tuple(float(v) for v in mean),
            "std": tuple(max(float(v), 1e-6) for v in std),
            "threshold": float(train.get("threshold", 0.5)), "config": cfg}


def _strip_prefixes(state: dict) -> dict:
    """Weights saved from a DDP- or compile-wrapped module carry `module.` / `_orig_mod.`."""
    out = {}
    for k, v in state.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_model(path: Path | str, device: str | torch.device = "cpu") -> Predictor:
    """Rebuild the trained model from a checkpoint (no encoder weights are loaded or downloaded:
    the checkpoint has them all; its EMA weights if it has them), in eval mode on `device`."""
    path = Path(path)
    return predictor_of(checkpoint.load(path, "cpu"), path, device)


def predictor_of(ckpt: dict, path: Path, device: str | torch.device = "cpu") -> Predictor:
    """`load_model` of a checkpoint dict already in memory, named `path` in errors: training's
    end-of-run test evaluation hands the dict it saves (config, normalisation, the engine's
    weights), so its predictor is the one `evaluate` rebuilds from that file."""
    device = torch.device(device)
    info = describe(ckpt, path)
    try:
        model = build_model(ModelConfig(arch=info["arch"], encoder=info["encoder"], encoder_weights="none",
                                        classes=int(info["config"].get("model", {}).get("classes") or 0)),
                            info["in_channels"])
    except ModelError as e:
        raise CheckpointError(f"{path}: cannot rebuild its model: {e}") from None
    try:
        # The EMA weights when the run kept them (`--ema-decay`): those were validated and tested.
        model.load_state_dict(_strip_prefixes(checkpoint.weights_of(ckpt, prefer_ema=True)))
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: its weights do not fit {info['arch']}/{info['encoder']} with "
                              f"{info['in_channels']} input channel(s) ({first}); the checkpoint's "
                              f"config and weights disagree") from None
    model.to(device).eval()
    return Predictor(model=model, arch=info["arch"], encoder=info["encoder"],
                     in_channels=info["in_channels"], size=info["size"], mean=info["mean"],
                     std=info["std"], threshold=info["threshold"], device=device, source=path,
                     config=info["config"])


def output_channels(model: Predictor) -> int:
    """The classes the network predicts (its output channels), from one small forward pass."""
    with torch.no_grad():
        x = torch.zeros(1, model.in_channels, 64, 64, device=model.device)
        return int(model.model(x).shape[1])


def load_ensemble(paths, device: str | torch.device = "cpu", threshold: float | None = None) -> Predictor:
    """One checkpoint: `load_model`. Several: an ensemble, the first checkpoint's predictor with
    the others as its `members`, whose probabilities `Predictor.probabilities` averages (flip
    TTA inside each model). Members may differ in architecture and normalisation, not in what
    is averaged: another input size, input channel count or number of output classes is an
    error naming both files, and so are different trained thresholds unless `threshold` (the
    --threshold flag) decides."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no --checkpoint given")
    models = [load_model(p, device) for p in paths]
    first = models[0]
    if len(models) == 1:
        return first
    classes = output_channels(first)
    for m in models[1:]:
        for what, a, b in (("input size", first.size, m.size), ("input channels", first.in_channels, m.in_channels),
                           ("output classes", classes, output_channels(m)),
                           ("whole-image geometry", first.geometry, m.geometry)):
            if a != b:
                raise CheckpointError(f"{m.source} cannot join an ensemble with {first.source}: {what} {b} vs {a}; "
                                      f"ensemble checkpoints trained with the same --size, --in-channels, classes and --geometry")
        if threshold is None and m.threshold != first.threshold:
            raise CheckpointError(f"{m.source} was trained with threshold {m.threshold}, {first.source} with "
                                  f"{first.threshold}: pass --threshold T for the ensemble")
    first.members = tuple(models[1:])
    return first
