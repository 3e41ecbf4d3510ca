"""`--loader torch`: a torch `DataLoader` over the shards, with the augmentation in its workers.

It reads samples by offset through the shards' DALI `.idx` files (the same index DALI uses),
which gives exact per-global-rank partitions; training follows the epoch's global order
(`order.py`), so the samples a global position holds do not depend on the world size.
"""
from __future__ import annotations

import math
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..dist import DistInfo
from .augment import AugmentParams
from .batch import Batch, LoaderSpec, source_channels, to_channels
from .draws import position_seed, sample_draws
from .geometry import augment_matrix, place, placement, to_opencv
from .order import epoch_length, training_plan
from .shards import label_classes
from .shards import IndexedShards, ShardError, WorkerFailure, read_manifest, read_sample, shard_paths


# ---------------------------------------------------------------- partitioning

def rank_indices(n: int, rank: int, world: int, training: bool, seed: int, epoch: int) -> list[int]:
    """This rank's sample order for one epoch, one sample at a time; -1 marks padding.

    Training: this rank's positions of the epoch's global order (`order.py`) with a per-rank
    batch of 1. Evaluation: the natural order dealt round-robin, short ranks padded with -1
    (masked out of metrics), so every real sample is counted once."""
    if training:
        return [i for batch in training_plan(n, seed, epoch, world, 1, rank, world) for _, i in batch]
    per_rank = math.ceil(n / world)
    mine = list(range(rank, n, world))
    return mine + [-1] * (per_rank - len(mine))


def batches_for(indices: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches of one rank's `rank_indices` (the last one may be short)."""
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


# ---------------------------------------------------------------- the torch loader

def _geometry_matrix(src_hw: tuple[int, int], size: int, d: dict) -> np.ndarray:
    """The 2×3 OpenCV matrix (source pixel -> output pixel) of resize, flips, then the affine
    (rotation and zoom about the centre, then the shift), composed as DALI composes them, so the
    image is resampled once (`geometry.augment_matrix`, moved to OpenCV's integer centres)."""
    return to_opencv(augment_matrix(size, d) @ placement(src_hw, (size, size), (0, 0)))


def _resize(img: np.ndarray, mask: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """To size × size (or `size` = (h, w)). Image: bilinear, antialiased when shrinking (torch's
    filter, DALI's rule); mask: nearest at pixel centres (torch's nearest-exact = DALI's
    INTERP_NN), so it stays exactly binary."""
    h, w = mask.shape
    th, tw = (size, size) if isinstance(size, int) else size
    if (h, w) == (th, tw):
        return img, mask
    if h <= th and w <= tw:   # no antialiasing needed: OpenCV's bilinear is the same filter
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_LINEAR)
    else:
        t = torch.from_numpy(img if img.ndim == 3 else img[:, :, None]).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
        img = t[0].permute(1, 2, 0).numpy()
        img = img[:, :, 0] if img.shape[2] == 1 else np.ascontiguousarray(img)
    m = F.interpolate(torch.from_numpy(mask)[None, None], size=(th, tw), mode="nearest-exact")
    return img, m[0, 0].numpy()


def _place(img: np.ndarray, mask: np.ndarray, size: int, geometry: str, crop_scale: str, d: dict | None):
    """--geometry letterbox|crop (`geometry.place`): shrink with antialiasing where a side gets
    smaller, then one `warpAffine` of the placement (+ the draws' flips and affine) for image
    (bilinear), mask and pad mask (nearest; a ones-image warped: 1 = source pixel, 0 = padding)."""
    shrink, m = place(*mask.shape, size, geometry, crop_scale, d)
    if shrink is not None:
        img, mask = _resize(img, mask, shrink)
    m = to_opencv(m)

    def warp(a: np.ndarray, interp: int) -> np.ndarray:
        return cv2.warpAffine(a, m, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return (warp(img, cv2.INTER_LINEAR), warp(mask, cv2.INTER_NEAREST),
            warp(np.ones(mask.shape, np.float32), cv2.INTER_NEAREST))


def _augment(img: np.ndarray, mask: np.ndarray, size: int, p: AugmentParams, rng: np.random.Generator,
             geometry: str = "squash", crop_scale: str = "resize", crop_foreground: float = 0.0):
    """Resize and augment one sample (H×W or H×W×C float32 in [0, 1], H×W mask) to size×size.

    The DALI pipeline's kinds, ranges, probabilities and order (docs/loader.md), done in OpenCV:
    with the affine, flips + affine (+ the resize, when the source is no larger than the
    output) are one `warpAffine` (image bilinear, mask nearest, outside = 0); without it, flips
    move pixels and resample nothing. Returns the image in [0, 1] units and the per-sample
    (scale, offset) of brightness and contrast, which the caller folds into the normalisation
    as DALI does; gamma and noise are applied here, and the pad mask (None for squash; see
    `_place` for letterbox and crop). The draws (`draws.sample_draws`, from `rng`) are the ones
    DALI's `PlanSource` makes for the same seed.
    Returns (image, mask, pad, scale, offset)."""
    d = sample_draws(p, rng, size, 1 if img.ndim == 2 else img.shape[2],
                     crop_foreground if geometry == "crop" else None, lambda: mask)
    pad = None
    if geometry != "squash":
        img, mask, pad = _place(img, mask, size, geometry, crop_scale, d)
    elif d["affine"] is None:
        img, mask = _resize(img, mask, size)
        axes = [a for a, on in ((1, d["hflip"]), (0, d["vflip"])) if on]
        if axes:
            img, mask = np.ascontiguousarray(np.flip(img, axes)), np.ascontiguousarray(np.flip(mask, axes))
    else:
        if mask.shape[0] > size or mask.shape[1] > size:   # shrink with antialiasing first
            img, mask = _resize(img, mask, size)
        m = _geometry_matrix(mask.shape, size, d)
        img = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        mask = cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if d["gamma"] is not None:
        img = cv2.pow(np.clip(img, 0, 1), d["gamma"])   # 4x numpy's power, same values to 1e-6
    b, c = d["brightness"], d["contrast"]
    # x*b then (· - mean)*c + mean, mean = b*mean(x): one affine map x*scale + offset.
    scale, offset = b * c, (b * float(img.mean()) * (1 - c) if c != 1.0 else 0.0)
    if d["noise"]:
        # Drawn in output units after the map: (x*scale + offset) + n = (x + n/scale)*scale + offset.
        img = img + d["field"].reshape(img.shape) * np.float32(d["noise"] / scale)
    return img, mask, pad, scale, offset


class _Collate:
    """Runs in the workers: decode -> resize -> augment -> channels -> normalise, written
    straight into the batch tensor. Grey stays one channel until the normalisation, which
    writes the model's copies (docs/loader.md)."""

    def __init__(self, spec: LoaderSpec, dataset: IndexedShards):
        self.spec, self.ds = spec, dataset

    def __call__(self, items: list[tuple[int, int]]):
        try:
            return self._batch(items)
        except ShardError as e:
            return WorkerFailure(str(e))

    def _batch(self, items: list[tuple[int, int]]):
        spec, size, n = self.spec, self.spec.size, len(items)
        img = _batch_tensor((n, spec.in_channels, size, size), spec.image_dtype, spec.memory_format)
        masks = _batch_tensor((n, 1, size, size), torch.float32, spec.memory_format)
        geometry = spec.geometry
        pads = None if geometry == "squash" else _batch_tensor((n, 1, size, size), torch.float32, spec.memory_format)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        valid, keys = [], []
        # A crop's window is a draw even without augmentation; evaluation crops as letterbox.
        augment = spec.training and (spec.augment.enabled or geometry == "crop")
        for j, (idx, seed) in enumerate(items):
            real = idx >= 0
            s = read_sample(self.ds, idx if real else 0)
            t = source_channels(torch.from_numpy(s.image).permute(2, 0, 1), spec.in_channels)
            x = t.permute(1, 2, 0).numpy()
            x = x[:, :, 0] if x.shape[2] == 1 else np.ascontiguousarray(x)
            pad = None
            if augment:
                x, m, pad, scale, offset = _augment(x, s.mask, size, spec.augment, np.random.default_rng(seed),
                                                    geometry, spec.crop_scale, spec.crop_foreground)
            elif geometry != "squash":
                (x, m, pad), scale, offset = _place(x, s.mask, size, "letterbox", spec.crop_scale, None), 1.0, 0.0
            else:
                (x, m), scale, offset = _resize(x, s.mask, size), 1.0, 0.0
            t = torch.from_numpy(x)
            t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
            # (x*scale + offset - mean) / std in float32, then one copy into the batch's layout
            # and dtype; a grey image with one mean/std is computed once and copied to each channel.
            k, q = scale / std, (offset - mean) / std
            if t.shape[0] == 1 and bool((k == k[0]).all() and (q == q[0]).all()):
                z = t * float(k[0])
                z += float(q[0])
            else:
                z = torch.addcmul(q, to_channels(t, spec.in_channels), k)
            img[j].copy_(z.expand(spec.in_channels, -1, -1) if z.shape[0] == 1 else z)
            masks[j, 0] = torch.from_numpy(m)
            if pads is not None:
                pads[j, 0] = torch.from_numpy(pad)
            valid.append(real)
            keys.append(s.key if real else "")
        return img, masks, torch.tensor(valid), keys, pads


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, fmt: torch.memory_format) -> torch.Tensor:
    """An empty batch in the layout and dtype the training step wants, so the main process's
    `.to()`/`.contiguous()` are no-ops (a channels-last copy of 16×3×640×640 there cost 76 ms a
    batch). In a worker it lives in shared memory, as torch's default collate does it, so it
    crosses to the main process without a copy."""
    strides = torch.empty(shape, device="meta", memory_format=fmt).stride()
    if torch.utils.data.get_worker_info() is None:
        return torch.empty_strided(shape, strides, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


class TorchLoader:
    def __init__(self, spec: LoaderSpec, dist: DistInfo):
        self.spec, self.dist = spec, dist
        manifest = read_manifest(spec.shard_dir)
        self.dataset = IndexedShards(shard_paths(spec.shard_dir, spec.split, manifest),
                                     labels=label_classes(manifest) is not None)   # K-class label masks
        if len(self.dataset) == 0:
            raise ShardError(f"{spec.shard_dir}: split {spec.split!r} has no samples; re-pack with another --split")
        self.epoch = 0
        self._collate = _Collate(spec, self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batch(self) -> int:
        return self.spec.batch_size * self.dist.world_size

    def _epoch_samples(self) -> int:
        return epoch_length(len(self.dataset), self._global_batch() * self.spec.grad_accum)

    def _plan(self) -> list[list[tuple[int, int]]]:
        """(sample index, augmentation seed) per sample, per batch of this rank."""
        s, d = self.spec, self.dist
        if not s.training:
            idx = rank_indices(len(self.dataset), d.rank, d.world_size, False, s.seed, self.epoch)
            return [[(i, 0) for i in batch] for batch in batches_for(idx, s.batch_size)]
        plan = training_plan(len(self.dataset), s.seed, self.epoch, self._global_batch(), s.grad_accum,
                             d.rank, d.world_size)
        # The augmentation seed follows the global position: the same draws for a sample
        # whatever the world size, worker count or rank that reads it.
        return [[(i, position_seed(s.seed, self.epoch, pos)) for pos, i in batch] for batch in plan]

    def __len__(self) -> int:
        if self.spec.training:
            return self._epoch_samples() // self._global_batch()
        per_rank = math.ceil(len(self.dataset) / self.dist.world_size)
        return math.ceil(per_rank / self.spec.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        dev = self.dist.device
        if self.spec.num_workers:
            # OpenCV's thread pool does not survive fork (a worker forked after the pool started
            # hangs in its first OpenCV call); the workers are the parallelism.
            cv2.setNumThreads(0)
        dl = torch.utils.data.DataLoader(
            self._plan(), batch_size=None, shuffle=False, num_workers=self.spec.num_workers,
            collate_fn=self._collate, pin_memory=dev.type == "cuda",
            prefetch_factor=4 if self.spec.num_workers else None,
            persistent_workers=False)
        fmt = self.spec.memory_format
        for out in dl:
            if isinstance(out, WorkerFailure):
                out.reraise()
            img, mask, valid, keys, pad = out
            img = img.to(dev, dtype=self.spec.image_dtype, non_blocking=True)
            yield Batch(image=img.contiguous(memory_format=fmt),
                        mask=mask.to(dev, non_blocking=True).contiguous(memory_format=fmt),
                        valid=valid.to(dev, non_blocking=True), keys=keys,
                        pad=None if pad is None else pad.to(dev, non_blocking=True).contiguous(memory_format=fmt))
