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
from .models import ModelError, build_model, model_name

KNOWN_ARCHS = Arch.__args__  # the Literal's choices


@dataclass(frozen=True)
class Preprocess:
    """The model's input transform; small and picklable, so DataLoader workers can run it."""

    in_channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: np.ndarray, size: int | None = None) -> torch.Tensor:
        """H×W or H×W×C float image in [0, 1] -> normalised [C, size, size] float32 tensor."""
        return preprocess(image, self.in_channels, size or self.size, self.mean, self.std)


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

    @property
    def name(self) -> str:
        """`unet/resnet34`, or just the architecture when it has no encoder."""
        return model_name(self.arch, self.encoder)

    @property
    def pre(self) -> Preprocess:
        return Preprocess(self.in_channels, self.size, self.mean, self.std)

    def preprocess(self, image: np.ndarray, size: int | None = None) -> torch.Tensor:
        """H×W or H×W×C float image in [0, 1] -> normalised [C, size, size] float32 tensor."""
        return self.pre(image, size)

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """[B, C, S, S] normalised -> [B, 1, S, S] tumour probabilities (float32)."""
        return flip_tta_probs(self.model, batch.to(self.device), tta)

    def predict(self, tensors: list[torch.Tensor], shapes: list[tuple[int, int]], tta: bool = False,
                threshold: float | None = None) -> list[np.ndarray]:
        """Preprocessed images and their original (H, W) -> one boolean mask per image at its
        original size (probabilities resized back, then thresholded)."""
        t = self.threshold if threshold is None else threshold
        probs = self.probabilities(torch.stack(tensors), tta)
        return [(to_original_size(p, h, w) > t).numpy() for p, (h, w) in zip(probs, shapes)]

    def predict_image(self, image: np.ndarray, tta: bool = False,
                      threshold: float | None = None) -> np.ndarray:
        """One [0, 1] image -> its boolean mask at the image's size."""
        return self.predict([self.preprocess(image)], [image.shape[:2]], tta, threshold)[0]


def preprocess(image: np.ndarray, in_channels: int, size: int, mean, std) -> torch.Tensor:
    """The torch loader's evaluation transform (its collate), for one image."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    t = to_channels(t, in_channels)
    t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)[0]
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (t - m) / s


FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


@torch.no_grad()
def flip_tta_probs(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """sigmoid(model(x)); with tta, the mean probability over the four flips, each un-flipped."""
    if not tta:
        return torch.sigmoid(model(x).float())
    acc = None
    for dims in FLIPS:
        xi = x.flip(dims) if dims else x
        p = torch.sigmoid(model(xi).float())
        p = p.flip(dims) if dims else p
        acc = p if acc is None else acc + p
    return acc / len(FLIPS)


def to_original_size(probs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[1, S, S] or [B, 1, S, S] probabilities -> [H, W] (bilinear), on the CPU."""
    p = probs.float().cpu()
    while p.dim() < 4:
        p = p[None]
    if tuple(p.shape[-2:]) != (height, width):
        p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
    return p[0, 0]


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
    device = torch.device(device)
    ckpt = checkpoint.load(path, "cpu")
    info = describe(ckpt, path)
    try:
        model = build_model(ModelConfig(arch=info["arch"], encoder=info["encoder"], encoder_weights="none"),
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


def resolve_threshold(flag: float | None, model: Predictor) -> float:
    """--threshold if given, else the one the model was trained and validated with."""
    t = model.threshold if flag is None else flag
    if not 0.0 < t < 1.0:
        raise ValueError(f"--threshold must be strictly between 0 and 1, got {t}")
    return t
