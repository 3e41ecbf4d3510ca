"""The loader interface the loop sees, and the torch implementation (`--loader torch`).

A loader yields `Batch`es already on the device, normalised, in the model's memory format.
Every rank gets the same number of batches per epoch (`len(loader)`); in evaluation, padding
samples that make the ranks even are marked `valid=False` so each real sample counts once.

The torch loader reads samples by offset through the shards' DALI `.idx` files (the same index
DALI uses), which gives exact per-global-rank partitions and per-epoch shuffles from the seed.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..dist import DistInfo
from ..precision import Precision, resolve_precision
from .augment import AugmentParams
from .shards import ShardError, read_manifest, shard_paths


@dataclass
class Batch:
    image: torch.Tensor   # float [B, C, H, W] on the device, normalised
    mask: torch.Tensor    # float {0, 1} [B, 1, H, W] on the device
    valid: torch.Tensor   # bool [B]: False for rank-padding samples (never counted)
    keys: list[str]


class Loader(Protocol):
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class LoaderSpec:
    """What every loader implementation needs, resolved from config + manifest."""

    shard_dir: Path
    split: str
    training: bool
    size: int
    in_channels: int
    batch_size: int          # per rank
    mean: tuple[float, ...]  # per model channel, in [0, 1] units
    std: tuple[float, ...]
    augment: AugmentParams
    seed: int
    num_workers: int
    channels_last: bool
    image_dtype: torch.dtype = torch.float32   # what AMP computes in: bf16/fp16 halve the copy


# ---------------------------------------------------------------- indexed shard access

@dataclass(frozen=True)
class SampleRef:
    shard: int
    members: tuple[tuple[str, int, int], ...]   # (ext, offset, size)
    key: str


def read_index(tar: Path) -> list[SampleRef]:
    idx = tar.with_suffix(".idx")
    if not idx.is_file():
        raise ShardError(f"{idx} is missing; rebuild it with `wds2idx {tar} {idx}` or re-run pack with --overwrite")
    lines = idx.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise ShardError(f"{idx} is not a DALI v1.2 index; re-run pack with --overwrite")
    n = int(lines[0].split()[1])
    tar_size = tar.stat().st_size
    refs = []
    for line in lines[1:n + 1]:
        f = line.split()
        comps = tuple((f[i], int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4))
        if any(o + s > tar_size for _, o, s in comps):
            raise ShardError(f"{tar} is truncated (its index points past the end); re-run pack with --overwrite")
        refs.append(SampleRef(-1, comps, Path(f[3]).name.partition(".")[0]))
    if len(refs) != n:
        raise ShardError(f"{idx} lists {len(refs)} samples but its header says {n}; re-run pack with --overwrite")
    return refs


class IndexedShards(torch.utils.data.Dataset):
    """Map-style view of a split: sample i -> decoded (image, mask) numpy arrays."""

    def __init__(self, tars: list[Path]):
        self.tars = tars
        self.refs: list[SampleRef] = []
        for si, t in enumerate(tars):
            self.refs += [SampleRef(si, r.members, r.key) for r in read_index(t)]
        self._files: dict[int, io.BufferedReader] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def read_member(self, i: int) -> dict[str, bytes]:
        ref = self.refs[i]
        f = self._files.get(ref.shard)
        if f is None:
            f = self._files[ref.shard] = open(self.tars[ref.shard], "rb")
        out = {}
        for ext, off, size in ref.members:
            f.seek(off)
            out[ext] = f.read(size)
        return out

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        m = self.read_member(i)
        img_ext = next((e for e in m if e.startswith("image.")), None)
        if img_ext is None or "mask.png" not in m:
            raise ShardError(f"sample {self.refs[i].key} in {self.tars[self.refs[i].shard]} lacks image or mask")
        return decode_image(m[img_ext], img_ext), decode_mask(m["mask.png"]), self.refs[i].key

    def __getstate__(self):
        # File handles do not cross process boundaries; each worker opens its own.
        return {**self.__dict__, "_files": {}}


def decode_image(data: bytes, ext: str) -> np.ndarray:
    """H×W×C float32 in [0, 1] (16-bit scaled by 65535)."""
    if ext == "image.npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        sixteen = arr.dtype == np.uint16
    else:
        pil = Image.open(io.BytesIO(data))
        # 16-bit PNG/JPEG 2000 open as mode I;16 (uint16) or I (int32) depending on Pillow.
        sixteen = pil.mode.startswith("I")
        arr = np.asarray(pil)
    scale = 65535.0 if sixteen or arr.dtype == np.uint16 else 255.0
    arr = arr.astype(np.float32) / scale
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_mask(data: bytes) -> np.ndarray:
    return (np.asarray(Image.open(io.BytesIO(data))) > 0).astype(np.float32)


# ---------------------------------------------------------------- partitioning

def rank_indices(n: int, rank: int, world: int, training: bool, seed: int, epoch: int) -> list[int]:
    """This rank's sample order for one epoch; -1 marks padding.

    Training: a seeded permutation of all samples, dealt round-robin by GLOBAL rank, the short
    ranks topped up by wrapping (real samples, so the batch statistics stay real). Evaluation:
    the natural order dealt round-robin, short ranks padded with -1 (masked out of metrics)."""
    per_rank = math.ceil(n / world)
    if training:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        order = (order * (1 + (per_rank * world) // max(n, 1)))[:per_rank * world]
        return order[rank::world]
    mine = list(range(rank, n, world))
    return mine + [-1] * (per_rank - len(mine))


def batches_for(indices: list[int], batch_size: int, training: bool) -> list[list[int]]:
    if training:
        # Drop the ragged tail so every step has a full per-rank batch (stable BN, equal steps).
        steps = max(1, len(indices) // batch_size)
        padded = indices * (1 + (steps * batch_size) // max(len(indices), 1))
        return [padded[i * batch_size:(i + 1) * batch_size] for i in range(steps)]
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


# ---------------------------------------------------------------- the torch loader

def _augment(img: torch.Tensor, mask: torch.Tensor, p: AugmentParams, g: torch.Generator):
    """One set of random parameters per sample, applied to image (bilinear) and mask (nearest).

    Same order, ranges and formulas as the DALI pipeline (`dali.py`, docs/loader.md); the random
    draws themselves differ between the loaders."""
    from torchvision.transforms.v2 import functional as TF

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    def coin(prob: float) -> bool:
        return prob > 0 and u(0, 1) < prob

    if coin(p.flip_p):
        img, mask = img.flip(-1), mask.flip(-1)
    if coin(p.flip_p):
        img, mask = img.flip(-2), mask.flip(-2)
    if (p.rotate_deg or p.scale or p.translate) and coin(p.affine_p):
        angle = u(-p.rotate_deg, p.rotate_deg)
        scale = u(1 - p.scale, 1 + p.scale)
        h, w = img.shape[-2:]
        tx, ty = u(-p.translate, p.translate) * w, u(-p.translate, p.translate) * h
        img = TF.affine(img, angle=angle, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
                        interpolation=TF.InterpolationMode.BILINEAR)
        mask = TF.affine(mask, angle=angle, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
                         interpolation=TF.InterpolationMode.NEAREST)
    if p.gamma and coin(p.gamma_p):
        img = img.clamp(0, 1) ** u(1 - p.gamma, 1 + p.gamma)
    if p.brightness and coin(p.brightness_p):
        img = img * u(1 - p.brightness, 1 + p.brightness)
    if p.contrast and coin(p.contrast_p):
        m = img.mean()
        img = (img - m) * u(1 - p.contrast, 1 + p.contrast) + m
    if p.noise and coin(p.noise_p):
        img = img + torch.randn(img.shape, generator=g) * u(0, p.noise)
    return img, mask


class _Collate:
    """Runs in the workers: decode -> resize -> augment -> channels -> normalise -> stack.
    Grey stays one channel until after the augmentation (the model's copies are made last)."""

    def __init__(self, spec: LoaderSpec, dataset: IndexedShards):
        self.spec, self.ds = spec, dataset

    def __call__(self, items: list[tuple[int, int]]):
        spec = self.spec
        imgs, masks, valid, keys = [], [], [], []
        for idx, seed in items:
            real = idx >= 0
            img, mask, key = self.ds[idx if real else 0]
            t = source_channels(torch.from_numpy(img).permute(2, 0, 1), spec.in_channels)
            m = torch.from_numpy(mask)[None]
            t = F.interpolate(t[None], size=(spec.size, spec.size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
            # nearest-exact = pixel-centre nearest neighbour, the same rule as DALI's INTERP_NN.
            m = F.interpolate(m[None], size=(spec.size, spec.size), mode="nearest-exact")[0]
            if spec.training and spec.augment.enabled:
                t, m = _augment(t, m, spec.augment, torch.Generator().manual_seed(seed))
            imgs.append(to_channels(t, spec.in_channels))
            masks.append(m)
            valid.append(real)
            keys.append(key if real else "")
        img = torch.stack(imgs)
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(spec.std).view(1, -1, 1, 1)
        return (img - mean) / std, torch.stack(masks), torch.tensor(valid), keys


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L") and DALI's GRAY output


def source_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """The channels to resize and augment in: alpha dropped, colour reduced to the model's one
    channel; grey stays one channel even when the model wants three (repeated afterwards)."""
    if t.shape[0] in (2, 4):
        t = t[:t.shape[0] - 1]
    return to_channels(t, 1) if channels == 1 else t


def to_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """[C,H,W] -> [channels,H,W]: grey repeated, colour to grey by BT.601 luma, alpha dropped."""
    if t.shape[0] == channels:
        return t
    if t.shape[0] in (2, 4):  # grey+alpha, RGBA: drop alpha
        t = t[:t.shape[0] - 1]
        if t.shape[0] == channels:
            return t
    if channels == 1:
        if t.shape[0] == 3:
            return torch.tensordot(torch.tensor(LUMA, dtype=t.dtype), t, dims=1)[None]
        return t.mean(0, keepdim=True)
    if t.shape[0] == 1:
        return t.expand(channels, -1, -1).contiguous()
    return t[:channels]


def norm_stats(manifest: dict, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Train-split mean/std from the manifest, mapped to the model's channel count."""
    mean, std = list(manifest.get("mean", [0.5])), list(manifest.get("std", [0.25]))
    if len(mean) != channels:
        mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
    return tuple(mean), tuple(max(s, 1e-6) for s in std)


class TorchLoader:
    def __init__(self, spec: LoaderSpec, dist: DistInfo):
        self.spec, self.dist = spec, dist
        manifest = read_manifest(spec.shard_dir)
        self.dataset = IndexedShards(shard_paths(spec.shard_dir, spec.split, manifest))
        if len(self.dataset) == 0:
            raise ShardError(f"{spec.shard_dir}: split {spec.split!r} has no samples; re-pack with another --split")
        self.epoch = 0
        self._collate = _Collate(spec, self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _plan(self) -> list[list[tuple[int, int]]]:
        s = self.spec
        idx = rank_indices(len(self.dataset), self.dist.rank, self.dist.world_size, s.training,
                           s.seed, self.epoch)
        out = []
        for b, batch in enumerate(batches_for(idx, s.batch_size, s.training)):
            # Per-sample augmentation seed: independent of worker count and rank layout.
            out.append([(i, hash((s.seed, self.epoch, i, b)) & 0x7FFFFFFF) for i in batch])
        return out

    def __len__(self) -> int:
        n, w = len(self.dataset), self.dist.world_size
        per_rank = math.ceil(n / w)
        if self.spec.training:
            return max(1, per_rank // self.spec.batch_size)
        return math.ceil(per_rank / self.spec.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        dev = self.dist.device
        dl = torch.utils.data.DataLoader(
            self._plan(), batch_size=None, shuffle=False, num_workers=self.spec.num_workers,
            collate_fn=self._collate, pin_memory=dev.type == "cuda",
            prefetch_factor=4 if self.spec.num_workers else None,
            persistent_workers=False)
        fmt = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        for img, mask, valid, keys in dl:
            img = img.to(dev, dtype=self.spec.image_dtype, non_blocking=True)
            yield Batch(image=img.contiguous(memory_format=fmt),
                        mask=mask.to(dev, non_blocking=True).contiguous(memory_format=fmt),
                        valid=valid.to(dev, non_blocking=True), keys=keys)


def resolve_norm(cfg, shard_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """--mean/--std if given (one value or one per channel), else the manifest's train stats."""
    c = cfg.data.in_channels
    if cfg.data.mean and cfg.data.std:
        mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
        if len(mean) == 1:
            mean, std = mean * c, std * c
        if len(mean) != c or len(std) != c:
            raise ValueError(f"--mean/--std need 1 or {c} values (one per --in-channels), got {mean} / {std}")
        return mean, std
    return norm_stats(read_manifest(shard_dir), c)


def build_loader(cfg, shard_dir: Path, split: str, dist: DistInfo, training: bool,
                 precision: Precision | None = None) -> Loader:
    """The configured loader (`--loader torch|dali`) for one split of a packed dataset, delivering
    `precision`'s image dtype and memory format (the run's; omitted, resolved from cfg.train).
    The model's first op casts to that dtype anyway; delivering it halves the output copy."""
    precision = precision or resolve_precision(cfg.train, dist.device)
    from .augment import PRESETS, resolve
    if cfg.train.batch_size % dist.world_size:
        raise ValueError(f"--batch-size {cfg.train.batch_size} is the GLOBAL batch and must be divisible "
                         f"by the world size {dist.world_size}")
    mean, std = resolve_norm(cfg, shard_dir)
    spec = LoaderSpec(
        shard_dir=Path(shard_dir), split=split, training=training, size=cfg.data.size,
        in_channels=cfg.data.in_channels, batch_size=cfg.train.batch_size // dist.world_size,
        mean=mean, std=std, augment=resolve(cfg.augment) if training else PRESETS["none"],
        seed=cfg.train.seed, num_workers=cfg.data.num_workers,
        channels_last=precision.memory_format == torch.channels_last, image_dtype=precision.image_dtype)
    if cfg.data.loader == "dali":
        from .dali import DaliLoader
        return DaliLoader(spec, dist)
    return TorchLoader(spec, dist)
