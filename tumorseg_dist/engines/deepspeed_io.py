"""DeepSpeed's shard files, read and written on our terms.

Reading: DeepSpeed 0.19 loads its shards with weights_only=False (its
`TorchCheckpointEngine.load`, and direct calls for universal checkpoints), so a crafted
`mp_rank_00_model_states.pt` or `zero_pp_rank_R_mp_rank_00_optim_states.pt` would run code.
`reading()` checks every shard of the tag on every rank first (weights-only, memory-mapped:
the ranks agree on one error before DeepSpeed touches a file) and then lets DeepSpeed load
inside `checkpoint.refuse_code`, which makes each of its torch.load calls weights-only.

Another world size: `consolidate()` gathers the ZeRO-1/2 partitions of every saved rank (fp32
master weights and the optimizer's partition-shaped state: Adam's exp_avg, exp_avg_sq) into full
tensors keyed by parameter name, read weights-only; `partition()` cuts them for the live
optimizer's own layout on this rank, in the per-rank format DeepSpeed's ZeRO optimizer loads
(`load_state_dict`). Nothing is converted on disk: the saved tag stays as it is.

Writing: `writing()` puts each shard through `checkpoint.atomic_save` (temp file + rename) and
records a failure (a full disk) instead of raising it inside DeepSpeed, so every rank still
reaches DeepSpeed's own barriers and the ranks then stop together.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint

MODEL_STATES = "mp_rank_00_model_states.pt"
_OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


def shard_globals() -> list:
    """The non-tensor objects DeepSpeed pickles into its ZeRO shards, allowed by name and nothing
    else (docs/engine.md lists them): LossScaler/DynamicLossScaler (the loss-scale state: numbers
    only, restored by updating __dict__), ZeroStageEnum (an IntEnum) and fragment_address (a
    dataclass of two ints). None has a __setstate__ or __reduce__ that runs code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def reading(tag_dir: Path):
    """Collective: refuse the tag on every rank if any shard in it holds code, then run the
    block (DeepSpeed's load_checkpoint) with every torch.load weights-only."""
    allowed = shard_globals()
    checkpoint.raise_agreed(checkpoint.check_files(sorted(Path(tag_dir).glob("*.pt")), allowed))
    with checkpoint.refuse_code(allowed):
        yield


def optim_shards(tag_dir: Path, world_size: int) -> list[Path]:
    """The tag's ZeRO optimizer shards in rank order; an error unless ranks 0..world_size-1 (the
    world that wrote it) are all there and no other."""
    found = {int(m.group(1)): p for p in Path(tag_dir).iterdir() if (m := _OPTIM.fullmatch(p.name))}
    if sorted(found) != list(range(world_size)):
        raise checkpoint.CheckpointError(f"{tag_dir}: written on {world_size} ranks, but holds the ZeRO "
                                         f"optimizer shards of ranks {sorted(found)}; resume from another checkpoint")
    return [found[r] for r in range(world_size)]


@dataclass
class Consolidated:
    """A ZeRO-1/2 optimizer state with the partitioning undone (`consolidate`)."""
    world_size: int
    fp32: dict[str, torch.Tensor]                   # parameter name -> fp32 master weight
    state: dict[str, dict[str, torch.Tensor]]       # name -> {exp_avg: ..., exp_avg_sq: ...}
    group_scalars: list[dict] = field(default_factory=list)   # per group: step and other unpartitioned values
    param_groups: list = field(default_factory=list)          # the base optimizer's (lr, betas, ...)
    globals: dict = field(default_factory=dict)               # loss scaler, clip_grad, ds_version, ...


def _equal(a, b) -> bool:
    return bool(torch.equal(a, b)) if torch.is_tensor(a) and torch.is_tensor(b) else a == b


def consolidate(tag_dir: Path, world_size: int, names: set[str] | None = None) -> Consolidated:
    """The full tensors of a ZeRO-1/2 tag written on `world_size` ranks (only the parameters in
    `names`, if given). Every file is read weights-only and memory-mapped, so a rank touches only
    the bytes of the parameters it asks for.

    The layout is DeepSpeed's own record of it: each shard's `param_slice_mappings` (per group,
    parameter name -> start and length of its piece in that rank's flat partition; a parameter
    that straddles ranks has one piece on each, in rank order) and `param_shapes` in the model
    states. Padding is never addressed, so the result does not depend on the saved alignment."""
    tag_dir = Path(tag_dir)
    allowed = shard_globals()

    def load(p: Path):
        return checkpoint.load_file(p, "cpu", allowed, mmap=True)

    shapes = {n: torch.Size(s) for group in load(tag_dir / MODEL_STATES)["param_shapes"] for n, s in group.items()}
    paths = optim_shards(tag_dir, world_size)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    out = Consolidated(len(paths), {}, {})
    for rank, path in enumerate(paths):
        sd = load(path)["optimizer_state_dict"]
        base = sd["base_optimizer_state"]
        if not isinstance(base, dict) or "state" not in base:
            raise checkpoint.CheckpointError(f"{path}: an elastic-format ZeRO shard (zero_optimization."
                                             f"elastic_checkpoint); resume it on {len(paths)} ranks")
        if rank == 0:
            out.param_groups = base["param_groups"]
            out.globals = {k: v for k, v in sd.items()
                           if k not in ("base_optimizer_state", "single_partition_of_fp32_groups",
                                        "param_slice_mappings", "group_paddings", "partition_count",
                                        "param_alignment_paddings")}
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            flat = sd["single_partition_of_fp32_groups"][g]
            st = base["state"].get(base["param_groups"][g]["params"][0], {})
            # Partition-shaped state: the flat partition, padded to the partition size (the
            # fp32 copy above is saved without the padding of the last rank).
            parted = {k: v for k, v in st.items()
                      if torch.is_tensor(v) and v.dim() == 1 and v.numel() >= flat.numel()}
            scalars = {k: v for k, v in st.items() if k not in parted}
            if rank == 0:
                out.group_scalars.append(scalars)
            elif not all(_equal(v, out.group_scalars[g].get(k)) for k, v in scalars.items()):
                raise checkpoint.CheckpointError(f"{path}: its optimizer step differs from rank 0's; "
                                                 f"the tag mixes two saves, resume from another checkpoint")
            for name, frag in mapping.items():
                if names is not None and name not in names:
                    continue
                mine = pieces.setdefault(name, {})
                mine.setdefault("fp32", []).append(flat.narrow(0, frag.start, frag.numel))
                for k, v in parted.items():
                    mine.setdefault(k, []).append(v.narrow(0, frag.start, frag.numel))
    for name, parts in pieces.items():
        shape = shapes.get(name)
        full = {k: torch.cat(v) for k, v in parts.items()}
        if shape is None or any(t.numel() != shape.numel() for t in full.values()):
            raise checkpoint.CheckpointError(
                f"{tag_dir}: the ZeRO shards hold {full['fp32'].numel()} values of {name}, its shape is "
                f"{tuple(shape) if shape is not None else 'not recorded'}; the tag is damaged, resume from "
                f"another checkpoint")
        out.fp32[name] = full.pop("fp32").view(shape)
        out.state[name] = {k: t.view(shape) for k, t in full.items()}
    missing = (set(shapes) if names is None else names) - set(out.fp32)
    if missing:
        raise checkpoint.CheckpointError(f"{tag_dir}: no ZeRO shard holds {sorted(missing)[:3]}; the tag "
                                         f"is damaged or of another model, resume from another checkpoint")
    return out


@dataclass
class Fragment:
    """Where one parameter's piece of this rank's partition lies (DeepSpeed's `_hp_mapping`)."""
    name: str
    group: int
    in_param: int      # start within the flattened parameter
    in_partition: int  # start within this rank's flat partition
    numel: int

    def piece(self, full: torch.Tensor) -> torch.Tensor:
        return full.reshape(-1).narrow(0, self.in_param, self.numel)


def partition(full: Consolidated, fragments: list[Fragment], partition_numel: list[int], live: dict) -> dict:
    """This rank's shard of `full` for a live optimizer whose pieces are `fragments` (flat
    partitions of `partition_numel` values per group, zero padding elsewhere), in the format of
    DeepSpeed's ZeRO-1/2 `state_dict()` for one rank. `live`: the values DeepSpeed checks
    against itself on load (group_paddings, param_alignment_paddings, partition_count)."""
    fp32 = [torch.zeros(n, dtype=torch.float32) for n in partition_numel]
    keys = sorted({k for s in full.state.values() for k in s})
    moments = [{k: torch.zeros(n, dtype=torch.float32) for k in keys} for n in partition_numel]
    for f in fragments:
        fp32[f.group].narrow(0, f.in_partition, f.numel).copy_(f.piece(full.fp32[f.name]))
        for k, t in full.state[f.name].items():
            moments[f.group][k].narrow(0, f.in_partition, f.numel).copy_(f.piece(t))
    # torch's optimizer state_dict numbers the parameters of all groups in order: one flat
    # partition per group, so group g's is parameter g.
    state = {g: {**full.group_scalars[g], **moments[g]} for g in range(len(partition_numel))}
    groups = [{**pg, "params": [g]} for g, pg in enumerate(full.param_groups)]
    return {**full.globals, "base_optimizer_state": {"state": {g: v for g, v in state.items() if v},
                                                      "param_groups": groups},
            "single_partition_of_fp32_groups": fp32, "group_paddings": live["group_paddings"],
            "param_alignment_paddings": live["param_alignment_paddings"],
            "partition_count": live["partition_count"]}


class _Writer:
    """DeepSpeed's checkpoint engine with `save` replaced; everything else is delegated."""

    def __init__(self, inner, previous: Path):
        self.inner, self.previous, self.errors = inner, previous, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path) -> None:
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
        try:
            if type(self.inner) is TorchCheckpointEngine:
                checkpoint.atomic_save(state_dict, Path(path),
                                       _use_new_zipfile_serialization=self.inner.zipfile_serialization)
            else:  # an expert's engine (--deepspeed-config "checkpoint"): its own write
                self.inner.save(state_dict, path)
        except (OSError, RuntimeError) as e:
            err = e if isinstance(e, checkpoint.CheckpointError) else None
            self.errors.append(str(checkpoint.write_error(err.__cause__ if err else e, Path(path),
                                                          checkpoint.tensor_bytes(state_dict), self.previous)))


@contextlib.contextmanager
def writing(ds_engine, previous: Path):
    """Inside the block, DeepSpeed's save_checkpoint writes every file atomically; yields the
    list that collects this rank's write errors (one line each)."""
    writer = _Writer(ds_engine.checkpoint_engine, previous)
    ds_engine.checkpoint_engine = writer
    try:
        yield writer.errors
    finally:
        ds_engine.checkpoint_engine = writer.inner
