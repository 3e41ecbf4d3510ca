"""Segmentation models: segmentation-models-pytorch architectures and the seeds' classic U-Net.

Every model maps [B, C, H, W] -> one logit channel [B, 1, H, W]. Nothing is downloaded: ImageNet
encoder weights must already be in the Hugging Face cache (where smp keeps them).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelConfig

SMP_ARCHS = {"unet": "Unet", "unetplusplus": "UnetPlusPlus", "deeplabv3": "DeepLabV3",
             "deeplabv3plus": "DeepLabV3Plus", "fpn": "FPN"}


class ModelError(RuntimeError):
    """A model that cannot be built as asked; the message says what to do instead."""


# ---------------------------------------------------------------- classic U-Net (the seeds')

class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ClassicUNet(nn.Module):
    """Ronneberger-style U-Net: 64 -> 1024 filters, batch norm, transposed-conv upsampling."""

    def __init__(self, in_channels: int = 1, base: int = 64, depth: int = 4):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]  # 64 ... 1024
        self.down = nn.ModuleList([DoubleConv(in_channels, widths[0])] +
                                  [DoubleConv(widths[i], widths[i + 1]) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.dec = nn.ModuleList([DoubleConv(widths[i] * 2, widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


# ---------------------------------------------------------------- smp models

def _hf_cache() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _build_smp(cfg: ModelConfig, in_channels: int) -> nn.Module:
    import segmentation_models_pytorch as smp
    arch = getattr(smp, SMP_ARCHS[cfg.arch])
    weights = cfg.encoder_weights
    if weights == "imagenet":
        # Offline by construction: a cache miss must fail fast with a useful message, never
        # hang on a network that compute nodes usually do not have.
        old = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            return arch(encoder_name=cfg.encoder, encoder_weights="imagenet",
                        in_channels=in_channels, classes=1)
        except Exception as e:  # huggingface_hub raises several kinds for a cache miss
            raise ModelError(
                f"ImageNet weights for encoder {cfg.encoder!r} are not in the local cache "
                f"({_hf_cache()}) and nothing is downloaded at run time ({type(e).__name__}: {e}). "
                f"Either pre-fetch them on a machine with internet (python -c \"import "
                f"segmentation_models_pytorch as smp; smp.Unet('{cfg.encoder}')\") and copy the cache, "
                f"pass --encoder-weights none to train from scratch, or --encoder-weights PATH to a "
                f"local encoder state dict.") from None
        finally:
            if old is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old
    try:
        model = arch(encoder_name=cfg.encoder, encoder_weights=None, in_channels=in_channels, classes=1)
    except KeyError as e:
        raise ModelError(f"unknown encoder {cfg.encoder!r} for {cfg.arch}: {e}") from None
    if weights != "none":
        load_encoder_weights(model.encoder, Path(weights), in_channels)
    return model


def load_encoder_weights(encoder: nn.Module, path: Path, in_channels: int) -> None:
    """Load a local encoder state dict; a 3-channel first conv is summed for grey input
    (what smp does for ImageNet weights)."""
    if not path.is_file():
        raise ModelError(f"--encoder-weights {path}: no such file (use imagenet, none, or a path "
                         f"to a saved encoder state dict)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = encoder.state_dict()
    for k, v in list(state.items()):
        if k in own and v.ndim == 4 and own[k].ndim == 4 and v.shape[1] != own[k].shape[1]:
            if own[k].shape[1] == 1:
                state[k] = v.sum(dim=1, keepdim=True)
    matched = [k for k in state if k in own]
    if not matched:
        raise ModelError(f"--encoder-weights {path}: none of its keys match encoder "
                         f"{type(encoder).__name__} (its keys are e.g. {list(state)[:3]})")
    try:
        # smp encoders override load_state_dict (dropping classifier keys) and return nothing
        encoder.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelError(f"--encoder-weights {path} does not fit encoder {type(encoder).__name__}: {e}") from None


def build_model(cfg: ModelConfig, in_channels: int) -> nn.Module:
    if cfg.arch == "unet-classic":  # no encoder: --encoder/--encoder-weights do not apply
        return ClassicUNet(in_channels)
    if cfg.arch not in SMP_ARCHS:
        raise ModelError(f"unknown --arch {cfg.arch!r}; choose from {', '.join([*SMP_ARCHS, 'unet-classic'])}")
    return _build_smp(cfg, in_channels)
