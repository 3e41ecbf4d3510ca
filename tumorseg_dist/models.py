"""Segmentation models: segmentation-models-pytorch architectures and the seeds' classic U-Net.

Every model maps [B, C, H, W] -> K logit channels [B, K, H, W]: one (sigmoid) for binary masks,
K = `ModelConfig.classes` (softmax, background included) for a dataset packed with `pack
--classes`. Nothing is downloaded: ImageNet
encoder weights are looked up in the local Hugging Face cache (where smp keeps them) by us,
never through the hub client, which would try the network first.
"""
from __future__ import annotations

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

    def __init__(self, in_channels: int = 1, base: int = 64, depth: int = 4, classes: int = 1):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]  # 64 ... 1024
        self.down = nn.ModuleList([DoubleConv(in_channels, widths[0])] +
                                  [DoubleConv(widths[i], widths[i + 1]) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.dec = nn.ModuleList([DoubleConv(widths[i] * 2, widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], classes, 1)

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

def hf_cache() -> Path:
    """Where huggingface_hub, and so smp, keeps its files (HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub, as read when the library was imported)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def cached_imagenet_weights(encoder: str) -> Path:
    """The smp ImageNet weights file of `encoder`, found in the local cache only.

    smp would call hf_hub_download, which goes to the network first (several retried requests,
    ~40 s on an offline node) and reads HF_HUB_OFFLINE only at import time; looking the file up
    ourselves never opens a connection and fails at once."""
    from huggingface_hub import try_to_load_from_cache
    from segmentation_models_pytorch.encoders import encoders
    if encoder not in encoders:
        raise ModelError(f"--encoder-weights imagenet: {encoder!r} is not one of smp's own encoders "
                         f"(timm 'tu-' encoders would download their weights): pass --encoder-weights "
                         f"none, or one of {', '.join(sorted(encoders)[:6])}, ...")
    settings = encoders[encoder]["pretrained_settings"].get("imagenet")
    if settings is None:
        raise ModelError(f"--encoder-weights imagenet: encoder {encoder!r} has no ImageNet weights in "
                         f"smp (it has {', '.join(encoders[encoder]['pretrained_settings']) or 'none'}); "
                         f"pass --encoder-weights none or a local file")
    cache = hf_cache()
    found = try_to_load_from_cache(settings["repo_id"], "model.safetensors", cache_dir=cache,
                                   revision=settings["revision"])
    if not isinstance(found, str):
        raise ModelError(
            f"ImageNet weights for encoder {encoder!r} are not in the local cache {cache} (looked for "
            f"{settings['repo_id']} at revision {settings['revision'][:12]}) and nothing is downloaded "
            f"at run time: pass --encoder-weights none to train from scratch, or --encoder-weights PATH "
            f"to a local encoder state dict; or fetch them on a machine with internet (python -c "
            f"\"import segmentation_models_pytorch as smp; smp.Unet('{encoder}')\") and copy its cache "
            f"here (or point HF_HUB_CACHE at it)")
    return Path(found)


def _build_smp(cfg: ModelConfig, in_channels: int) -> nn.Module:
    import segmentation_models_pytorch as smp
    arch = getattr(smp, SMP_ARCHS[cfg.arch])
    weights = cfg.encoder_weights
    local = cached_imagenet_weights(cfg.encoder) if weights == "imagenet" else None  # before the build: fail fast
    try:
        model = arch(encoder_name=cfg.encoder, encoder_weights=None, in_channels=in_channels,
                     classes=output_channels(cfg))
    except KeyError as e:
        raise ModelError(f"unknown encoder {cfg.encoder!r} for {cfg.arch}: {e}") from None
    if local is not None:
        load_encoder_weights(model.encoder, local, in_channels, complete=True)
    elif weights != "none":
        load_encoder_weights(model.encoder, Path(weights), in_channels)
    return model


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_encoder_weights(encoder: nn.Module, path: Path, in_channels: int, complete: bool = False) -> None:
    """Load a local encoder state dict (torch or .safetensors); a 3-channel first conv is summed
    for grey input (what smp does for ImageNet weights). `complete`: every encoder tensor must
    come from the file (a cached ImageNet file that lacks some is damaged)."""
    if not path.is_file():
        raise ModelError(f"--encoder-weights {path}: no such file (use imagenet, none, or a path "
                         f"to a saved encoder state dict)")
    try:
        state = _read_state(path)
    except Exception as e:  # a damaged file: torch and safetensors raise several kinds
        raise ModelError(f"encoder weights {path} cannot be read ({type(e).__name__}: {e}); "
                         f"use another file or --encoder-weights none") from None
    own = encoder.state_dict()
    for k, v in list(state.items()):
        if k in own and v.ndim == 4 and own[k].ndim == 4 and v.shape[1] != own[k].shape[1]:
            if own[k].shape[1] == 1:
                state[k] = v.sum(dim=1, keepdim=True)
    matched = [k for k in state if k in own]
    if not matched:
        raise ModelError(f"--encoder-weights {path}: none of its keys match encoder "
                         f"{type(encoder).__name__} (its keys are e.g. {list(state)[:3]})")
    missing = [k for k in own if k not in state]
    if complete and missing:
        raise ModelError(f"encoder weights {path} lack {len(missing)} of the encoder's tensors "
                         f"(e.g. {missing[0]}): the file is damaged; delete it or use --encoder-weights none")
    try:
        # smp encoders override load_state_dict (dropping classifier keys) and return nothing
        encoder.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelError(f"--encoder-weights {path} does not fit encoder {type(encoder).__name__}: "
                         f"{str(e).splitlines()[-1].strip()[:200]}") from None


def model_name(arch: str, encoder: str, sep: str = "/") -> str:
    """`unet/resnet34`, or only the architecture when it has no encoder (the classic U-Net's
    --encoder is a default nobody chose, and naming it would mislead)."""
    return arch if arch == "unet-classic" else f"{arch}{sep}{encoder}"


def output_channels(cfg: ModelConfig) -> int:
    """The logit channels: K for K classes, 1 for binary masks (classes 0 = not K-class)."""
    if cfg.classes == 2:
        raise ModelError("classes = 2 is the binary case: one sigmoid output (classes 0 or 1); "
                         "K softmax outputs start at 3 (background and two classes)")
    return cfg.classes if cfg.classes > 2 else 1


def build_model(cfg: ModelConfig, in_channels: int) -> nn.Module:
    if cfg.arch == "unet-classic":  # no encoder: --encoder/--encoder-weights do not apply
        return ClassicUNet(in_channels, classes=output_channels(cfg))
    if cfg.arch not in SMP_ARCHS:
        raise ModelError(f"unknown --arch {cfg.arch!r}; choose from {', '.join([*SMP_ARCHS, 'unet-classic'])}")
    return _build_smp(cfg, in_channels)
