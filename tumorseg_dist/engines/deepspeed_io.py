"""DeepSpeed's shard files, read and written on our terms.

Reading: DeepSpeed 0.19 loads its shards with weights_only=False (its
`TorchCheckpointEngine.load`, and direct calls for universal checkpoints), so a crafted
`mp_rank_00_model_states.pt` or `zero_pp_rank_R_mp_rank_00_optim_states.pt` would run code.
`reading()` checks every shard of the tag on every rank first (weights-only, memory-mapped:
the ranks agree on one error before DeepSpeed touches a file) and then lets DeepSpeed load
inside `checkpoint.refuse_code`, which makes each of its torch.load calls weights-only.

Writing: `writing()` puts each shard through `checkpoint.atomic_save` (temp file + rename) and
records a failure (a full disk) instead of raising it inside DeepSpeed, so every rank still
reaches DeepSpeed's own barriers and the ranks then stop together.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .. import checkpoint


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
