"""`--loader torch`: a torch `DataLoader` over the shards, with the augmentation in its workers.

It reads samples by offset through the shards' DALI `.idx` files (the same index DALI uses),
which gives exact per-global-rank partitions and per-epoch shuffles from the seed.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from ..dist import DistInfo
from .augment import AugmentParams
from .batch import Batch, LoaderSpec, source_channels, to_channels
from .shards import IndexedShards, ShardError, WorkerFailure, read_manifest, read_sample, shard_paths


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
        try:
            return self._batch(items)
        except ShardError as e:
            return WorkerFailure(str(e))

    def _batch(self, items: list[tuple[int, int]]):
        spec = self.spec
        imgs, masks, valid, keys = [], [], [], []
        for idx, seed in items:
            real = idx >= 0
            s = read_sample(self.ds, idx if real else 0)
            t = source_channels(torch.from_numpy(s.image).permute(2, 0, 1), spec.in_channels)
            m = torch.from_numpy(s.mask)[None]
            t = F.interpolate(t[None], size=(spec.size, spec.size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
            # nearest-exact = pixel-centre nearest neighbour, the same rule as DALI's INTERP_NN.
            m = F.interpolate(m[None], size=(spec.size, spec.size), mode="nearest-exact")[0]
            if spec.training and spec.augment.enabled:
                t, m = _augment(t, m, spec.augment, torch.Generator().manual_seed(seed))
            imgs.append(to_channels(t, spec.in_channels))
            masks.append(m)
            valid.append(real)
            keys.append(s.key if real else "")
        img = torch.stack(imgs)
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(spec.std).view(1, -1, 1, 1)
        return (img - mean) / std, torch.stack(masks), torch.tensor(valid), keys


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
        fmt = self.spec.memory_format
        for out in dl:
            if isinstance(out, WorkerFailure):
                out.reraise()
            img, mask, valid, keys = out
            img = img.to(dev, dtype=self.spec.image_dtype, non_blocking=True)
            yield Batch(image=img.contiguous(memory_format=fmt),
                        mask=mask.to(dev, non_blocking=True).contiguous(memory_format=fmt),
                        valid=valid.to(dev, non_blocking=True), keys=keys)
