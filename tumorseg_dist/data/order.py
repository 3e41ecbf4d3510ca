"""The global sample order of a training epoch, and each rank's slice of it.

Elastic determinism: the order of an epoch is a function of (seed, epoch, number of samples)
only, never of the world size, so a run resumed on another number of ranks continues the same
order at the same global position. Global micro-batch j is positions [j*B, (j+1)*B) of that
order (B = the global batch); rank r takes positions [j*B + r*b, j*B + (r+1)*b), b = B / world.
An epoch is a whole number of optimizer steps (`unit` = global batch x grad accum samples), the
same number of samples whatever the layout; the order wraps when the split is shorter.
"""
from __future__ import annotations

import math

import torch


def epoch_length(n: int, unit: int) -> int:
    """Samples trained per epoch: the whole optimizer steps that fit in the split (at least one;
    the ragged tail is dropped so every step is full: stable BN, equal steps on every rank)."""
    return max(1, n // unit) * unit


def global_order(n: int, seed: int, epoch: int, length: int) -> list[int]:
    """Sample indices for positions 0..length-1 of `epoch`: a seeded permutation, wrapped."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return (order * math.ceil(length / max(n, 1)))[:length]


def rank_slices(order: list[int], global_batch: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches as (position, sample index) pairs, in step order."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not divide over {world} ranks")
    b = global_batch // world
    steps = len(order) // global_batch
    return [[(p, order[p]) for p in range(j * global_batch + rank * b, j * global_batch + (rank + 1) * b)]
            for j in range(steps)]


def training_plan(n: int, seed: int, epoch: int, global_batch: int, grad_accum: int, rank: int,
                  world: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of `epoch` as (global position, sample index): what both loaders
    train on, so a position holds the same sample whichever loader or world size reads it."""
    order = global_order(n, seed, epoch, epoch_length(n, global_batch * grad_accum))
    return rank_slices(order, global_batch, rank, world)


def divisible_choices(global_batch: int, world: int) -> str:
    """The nearest valid alternatives when `global_batch` does not divide over `world` ranks."""
    below, above = (global_batch // world) * world, (global_batch // world + 1) * world
    sizes = [b for b in (below, above) if b > 0]
    worlds = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
    near = sorted(worlds, key=lambda w: (abs(w - world), w))[:2]
    return (f"use --batch-size {' or '.join(map(str, sizes))} on {world} ranks, or keep "
            f"--batch-size {global_batch} on {' or '.join(map(str, sorted(near)))} ranks")
