"""`--engine deepspeed`: the same interface as `DDPEngine`, on DeepSpeed (ZeRO stage 0, 1 or 2).

Our config is translated into a DeepSpeed config (`deepspeed_config()`), optionally merged with
an expert's `--deepspeed-config FILE` (`merge_config()`: a key that our flags set must agree), and
written to RUN/deepspeed_config.json. Translation:

* batch: `train_micro_batch_size_per_gpu` = --batch-size / world, `gradient_accumulation_steps`
  = --grad-accum, `train_batch_size` = their product x world;
* `--amp bf16` -> `torch_autocast` (bfloat16): fp32 parameters and BatchNorm statistics, the
  forward under torch.autocast, exactly what DDP does. (DeepSpeed's `bf16` mode casts the
  parameters but, since 0.19, not the buffers, and BatchNorm then fails on mixed dtypes.)
  `--amp fp16` -> `fp16.enabled` with dynamic loss scaling and `data_types.buffer_dtype` fp16,
  so BatchNorm's buffers match its fp16 parameters;
* `--optimizer/--lr/--weight-decay/--momentum` -> `optimizer` (built by DeepSpeed as the PyTorch
  fused optimizer, `torch_adam` + `fused`, so both engines update weights with the same kernel and
  no CUDA extension has to be compiled);
* `--clip-grad` -> `gradient_clipping`; `--zero-stage` -> `zero_optimization.stage`;
* the lr schedule (`--scheduler`, `--warmup-steps`) is our `Schedule`, handed to DeepSpeed as
  its client lr_scheduler: DeepSpeed steps it at accumulation boundaries (not on skipped
  overflow steps) and stores it in its checkpoint. DeepSpeed's own WarmupLR/WarmupCosineLR run
  their first step at lr 0 and have no ReduceLROnPlateau, so they would not match `--engine ddp`.
  A `scheduler` section in --deepspeed-config replaces ours (stated in the log).

Checkpoints: DeepSpeed's own sharded format (`mp_rank_00_model_states.pt` + one
`zero_pp_rank_R_mp_rank_00_optim_states.pt` per rank) under RUN/checkpoints/deepspeed/<tag>/,
written collectively by every rank, then our metadata file (RUN/checkpoints/last.pt or best.pt:
progress, RNG, config, the fp32 model weights and EMA) written atomically by rank 0, naming
the tag. The metadata is written last, so a save killed half-way leaves the previous last.pt
and the tag it names intact; stale tags are deleted after the metadata is in place. A ZeRO-1/2
tag resumes on another world size: its partitions are re-cut in memory (`_load_other_world`).
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint
from .. import dist as distmod
from ..config import Config, ConfigError
from ..dist import DistInfo
from ..precision import Precision
from . import deepspeed_io
from .parts import (EMA, EngineBase, Health, LossFn, Mark, Schedule, amp_autocast, mark_phase, nonfinite_gradients,
                    optimizer_state_bytes, optimizer_steps)

DS_DIR = "deepspeed"  # RUN/checkpoints/deepspeed/<tag>/

# Keys that our flags set: a --deepspeed-config value that differs is an error naming both.
# Everything else we generate is a default that the file may override (logged).
FLAG_KEYS = {
    ("train_batch_size",): "--batch-size x --grad-accum",
    ("train_micro_batch_size_per_gpu",): "--batch-size / world size",
    ("gradient_accumulation_steps",): "--grad-accum",
    ("gradient_clipping",): "--clip-grad",
    ("zero_optimization", "stage"): "--zero-stage",
    ("torch_autocast", "enabled"): "--amp",
    ("fp16", "enabled"): "--amp",
    ("optimizer", "type"): "--optimizer",
    ("optimizer", "params", "lr"): "--lr",
    ("optimizer", "params", "weight_decay"): "--weight-decay",
    ("optimizer", "params", "momentum"): "--momentum",
}


def deepspeed_config(cfg: Config, world_size: int, amp: str) -> dict:
    """The DeepSpeed JSON equivalent of our config (before merging an expert file)."""
    t, o, e = cfg.train, cfg.optim, cfg.engine
    if t.batch_size % world_size:
        raise ConfigError(f"--batch-size {t.batch_size} is the global batch; it must divide evenly "
                          f"over {world_size} ranks")
    micro = t.batch_size // world_size
    if o.optimizer in ("adamw", "adam"):
        opt = {"type": "AdamW" if o.optimizer == "adamw" else "Adam",
               "params": {"lr": o.lr, "weight_decay": o.weight_decay, "betas": [0.9, 0.999],
                          "eps": 1e-8, "torch_adam": True, "fused": True}}
        if o.optimizer == "adam":
            opt["params"]["adam_w_mode"] = False  # L2 weight decay, like torch.optim.Adam
    else:
        opt = {"type": "SGD", "params": {"lr": o.lr, "weight_decay": o.weight_decay,
                                         "momentum": o.momentum, "nesterov": True, "fused": True}}
    ds = {
        "train_batch_size": micro * e.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": e.clip_grad,
        "optimizer": opt,
        "zero_optimization": {"stage": e.zero_stage},
        # No "lower precision safe" modules: gradients are reduced in fp32, as DDP does.
        "torch_autocast": {"enabled": amp == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "fp16": {"enabled": amp == "fp16"},
        "steps_per_print": 2 ** 31 - 1,  # our loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if amp == "fp16":
        ds["data_types"] = {"buffer_dtype": "fp16"}
        ds["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                           "hysteresis": 2, "min_loss_scale": 1})
    return ds


def merge_config(ours: dict, theirs: dict, source: str) -> tuple[dict, list[str]]:
    """Deep-merge an expert DeepSpeed config into ours. Returns the merged dict and notes for the
    log. A key set by one of our flags with a different value is a ConfigError naming both; the
    value "auto" (Hugging Face style) means "take ours"."""
    notes: list[str] = []

    def walk(a: dict, b: dict, path: tuple) -> dict:
        out = copy.deepcopy(a)
        for k, v in b.items():
            p = path + (k,)
            name = ".".join(p)
            if v == "auto":
                continue
            if k not in a:
                out[k] = copy.deepcopy(v)
                notes.append(f"{name} = {json.dumps(v)} from {source}")
            elif isinstance(a[k], dict) and isinstance(v, dict):
                out[k] = walk(a[k], v, p)
            elif a[k] != v:
                if p in FLAG_KEYS:
                    raise ConfigError(
                        f"{source} sets {name} = {json.dumps(v)} but {FLAG_KEYS[p]} gives "
                        f"{json.dumps(a[k])}; change the flag or remove the key from {source}")
                notes.append(f"{name} = {json.dumps(v)} from {source} (default {json.dumps(a[k])})")
                out[k] = copy.deepcopy(v)
        return out

    if not isinstance(theirs, dict):
        raise ConfigError(f"{source}: a DeepSpeed config must be a JSON object")
    if isinstance(theirs.get("bf16"), dict) and theirs["bf16"].get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{source} enables DeepSpeed's bf16 mode, which casts parameters but not "
                          f"BatchNorm's buffers and then fails in every model here; remove the bf16 "
                          f"section and pass --amp bf16 (DeepSpeed torch_autocast, as with DDP)")
    return walk(ours, theirs, ()), notes


def load_config_file(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed-config {path}: not valid JSON ({e})") from e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed(dist: DistInfo):
    """Import DeepSpeed for this device (DS_ACCELERATOR=cpu on CPU) and make it use our process
    group; a single process gets a one-rank group (DeepSpeed always needs one)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if dist.device.type == "cuda" else "cpu")
    import deepspeed
    ds_comm = importlib.import_module("deepspeed.comm.torch")   # `import ... as` finds the torch package
    if dist.device.type == "cpu" and hasattr(ds_comm, "build_shm_op"):
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ build at run
        # time: a compiler on every node, a minute of one core, the other ranks waiting on its
        # lock) that only its inference all-reduce uses. Training reduces through the gloo
        # group, and DeepSpeed falls back to it when the op is absent.
        ds_comm.build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        os.environ.setdefault("RANK", str(dist.rank))
        os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))
        os.environ.setdefault("WORLD_SIZE", str(dist.world_size))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if dist.device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    return deepspeed


class DeepSpeedEngine(EngineBase):
    """DeepSpeed engine with ZeRO 0/1/2; AMP via torch_autocast (bf16) or DeepSpeed's fp16 mode."""

    name = "deepspeed"

    def __init__(self, cfg: Config, model: nn.Module, dist: DistInfo, loss_fn: LossFn, total_steps: int,
                 precision: Precision):
        super().__init__(cfg, dist, loss_fn, precision)
        e, p = cfg.engine, precision
        self.config = deepspeed_config(cfg, dist.world_size, p.amp)
        self.notes: list[str] = []
        if e.deepspeed_config is not None:
            self.config, self.notes = merge_config(self.config, load_config_file(e.deepspeed_config),
                                                   str(e.deepspeed_config))
        self.zero_stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        self.accum = int(self.config["gradient_accumulation_steps"])
        deepspeed = init_deepspeed(dist)
        # Parameters stay contiguous: DeepSpeed broadcasts them as byte views and ZeRO
        # flattens them into buffers, both of which need stride(-1) == 1. The loader still
        # delivers channels_last inputs when asked, so convolutions run NHWC on the GPU.
        model = model.to(self.device)
        if p.memory_format != torch.contiguous_format:
            self.notes.append("channels_last: inputs only; DeepSpeed needs contiguous parameters")
        self.ema = EMA(model, e.ema_decay) if e.ema_decay > 0 else None  # fp32, before any cast
        self.schedule: Schedule | None = None
        client_sched = None
        if "scheduler" in self.config:
            self.notes.append(f"lr schedule: DeepSpeed's {self.config['scheduler'].get('type')} "
                              f"from {e.deepspeed_config} replaces --scheduler {cfg.optim.scheduler}")
        else:
            n_steps = optimizer_steps(total_steps, self.accum)

            def client_sched(opt):
                self.schedule = Schedule(cfg, opt, n_steps)
                return self.schedule
        self.ds, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=copy.deepcopy(self.config), lr_scheduler=client_sched, dist_init_required=False)
        self.model = self.ds.module
        self.dtype = next(self.model.parameters()).dtype  # fp16 when DeepSpeed casts, else fp32
        if p.compile:
            # DeepSpeed compiles its module in place (nn.Module.compile), so evaluation runs the
            # compiled forward too and state_dict keys stay those of the plain model.
            self.ds.compile()
            if self.ema is not None:
                self.ema.module.compile()
            self.notes.append("torch.compile: on (DeepSpeed engine.compile, inductor)")
        # ZeRO 1/2 (and DeepSpeed's fp16 optimizer) check the gradient norm and skip overflow
        # steps themselves (DeepSpeed pays its own host sync for that); ZeRO-0 with fp32
        # parameters (no AMP, or bf16 autocast) uses the bare PyTorch optimizer, which we make
        # skip on the device like DDP.
        self.own_skip = isinstance(self.ds.optimizer, torch.optim.Optimizer) and self.dtype == torch.float32
        self.fused = self.own_skip and bool(self.ds.optimizer.defaults.get("fused"))
        self.health = Health(e.max_bad_steps, self.device)

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        """Eval mode, with rank 0's buffers (BatchNorm running statistics) on every rank:
        DeepSpeed, unlike DDP, does not broadcast buffers, and rank 0's model is the one that
        gets checkpointed, so that is the model every rank evaluates."""
        self.ds.eval()
        if self.dist.world_size > 1:
            for module in (self.model, self.ema.module if self.ema is not None else None):
                for b in (module.buffers() if module is not None else ()):
                    torch.distributed.broadcast(b, src=0)

    def train_step(self, image: torch.Tensor, mask: torch.Tensor, mark: Mark | None = None,
                   pad: torch.Tensor | None = None) -> torch.Tensor:
        """One micro-batch: forward, fp32 loss, DeepSpeed backward (scaled by 1/accum) and step
        (an optimizer step at accumulation boundaries). Returns the detached loss.

        `mark(phase)` (benchmarks): called as each of parts.PHASES ends; DeepSpeed's gradient
        reduction happens inside backward, so "all_reduce" is marked right after it."""
        logits = self.ds(self._input(image))
        mark_phase(mark, "forward")
        loss = self.loss_fn(logits.float(), mask, *(() if pad is None else (pad,)))
        mark_phase(mark, "loss")
        self.ds.backward(loss)
        mark_phase(mark, "backward")
        mark_phase(mark, "all_reduce")
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary and self.own_skip:
            # ZeRO-0 fp32: gradients are all-reduced in backward at the boundary, so the norm
            # (and the decision) is the same on every rank. DeepSpeed clips inside ds.step.
            self.health.step(self.ds.optimizer, nonfinite_gradients(self.model, 0.0), self.fused,
                             step=self.ds.step, host_skip=False)
        else:
            self.ds.step()
            if boundary:
                self.health.count_own_skips(self.ds.skipped_steps)
        if boundary and self.ema is not None:
            self.ema.update(self.model)
        mark_phase(mark, "optimizer")
        return loss.detach()

    def _input(self, image: torch.Tensor) -> torch.Tensor:
        # fp16 mode: the parameters are fp16. Otherwise the parameters are fp32 and a bf16 batch
        # (--amp bf16) goes in as it is: autocast computes the convolutions in bf16 anyway.
        return image.to(self.dtype) if self.dtype != torch.float32 else image

    @torch.no_grad()
    def eval_logits(self, image: torch.Tensor) -> torch.Tensor:
        # DeepSpeed autocasts only its own forward; evaluation calls the module directly.
        bf16 = self.precision.amp == "bf16"
        with amp_autocast(self.device, self.precision.compute_dtype if bf16 else None):
            if self.ema is not None:
                return self.ema.module(image if bf16 else image.float()).float()
            return self.model(self._input(image)).float()

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def end_epoch(self, monitored: float) -> None:
        if self.schedule is not None:
            self.schedule.end_epoch(monitored)

    def check_health(self) -> int:
        return self.health.check()

    # ------------------------------------------------------------------ checkpoints
    def _weights(self) -> dict:
        return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict:
        """The weights-only part (what any engine can load); optimizer and scheduler state live
        in DeepSpeed's sharded files, written by `save_checkpoint`."""
        return {"engine": self.name, "model": self._weights(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "health": self.health.state_dict()}

    def _optimizer_tensors(self) -> dict:
        """This rank's optimizer state and the fp32 master partitions it updates (what its ZeRO
        shard holds); the module's own weights are in `state_dict()`."""
        basic = getattr(self.ds, "basic_optimizer", None) or self.optimizer
        return {"state": list(basic.state.values()),
                "params": [p for g in basic.param_groups for p in g["params"]]}

    def save_checkpoint(self, path: Path, meta: dict) -> None:
        """Collective: every rank writes its ZeRO shard under RUN/checkpoints/deepspeed/<tag>/;
        then rank 0 writes the metadata file atomically and deletes the tags it replaced.

        Nothing is written if any rank holds a non-finite tensor; a failed write (disk full)
        deletes the new tag and leaves the previous metadata and its tag as they were. Either
        way every rank raises the same CheckpointError."""
        path = Path(path)
        kind = path.stem
        step = int(meta.get("train_state", {}).get("step", 0))
        tag = distmod.broadcast_object(f"{kind}-step{step:08d}-{time.time_ns()}")
        root = path.parent / DS_DIR
        info = {"dir": DS_DIR, "tag": tag, "zero_stage": self.zero_stage,
                "world_size": self.dist.world_size, "config": json.dumps(self.config)}
        state = {**meta, **self.state_dict(), "deepspeed": info} if self.dist.is_main else {}
        named = [*checkpoint.named_tensors(state),
                 *checkpoint.named_tensors(self._optimizer_tensors(), f"optimizer(rank {self.dist.rank})")]
        checkpoint.raise_agreed(checkpoint.nonfinite_message(path, checkpoint.nonfinite(named)))
        with deepspeed_io.writing(self.ds, previous=path) as write_errors:
            self.ds.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
        error = checkpoint.agreed_error(write_errors[0] if write_errors else None)
        if error is None and self.dist.is_main:
            error = checkpoint.save_checked(state, path)
        error = checkpoint.agreed_error(error)
        if self.dist.is_main:
            stale = [root / tag] if error else [p for p in root.glob(f"{kind}-step*") if p.name != tag]
            for old in stale:
                shutil.rmtree(old, ignore_errors=True)
        distmod.barrier()
        if error:
            raise checkpoint.CheckpointError(error)

    def load_state_dict(self, sd: dict, ckpt_dir: Path | None = None) -> None:
        """Full resume from a DeepSpeed checkpoint written by `save_checkpoint` with the same ZeRO
        stage, on this world size or (`_load_other_world`) another. No shard can run code: see
        `deepspeed_io.reading`."""
        info = sd.get("deepspeed")
        if not info:
            raise checkpoint.CheckpointError("this checkpoint has no DeepSpeed state; load it with "
                                             "load_weights (weights only)")
        if ckpt_dir is None:
            raise checkpoint.CheckpointError("resuming a DeepSpeed checkpoint needs its directory")
        load_dir = Path(ckpt_dir) / info["dir"]
        tag_dir = load_dir / info["tag"]
        if not tag_dir.is_dir():
            raise checkpoint.CheckpointError(
                f"{tag_dir} (the DeepSpeed shards this checkpoint names) is missing; "
                f"resume from another checkpoint or with --resume never")
        other_world = info["world_size"] != self.dist.world_size
        with deepspeed_io.reading(tag_dir):
            path, _ = self.ds.load_checkpoint(str(load_dir), tag=info["tag"], load_optimizer_states=not other_world,
                                              load_lr_scheduler_states=True)
            if path is None:
                raise checkpoint.CheckpointError(f"DeepSpeed could not load {tag_dir}")
            if other_world:
                self._load_other_world(tag_dir, int(info["world_size"]))
        if self.ema is not None:
            self.ema.load_state_dict(sd.get("ema") or self._weights())
        if sd.get("health"):
            self.health.load_state_dict(sd["health"])
        self.health.own_skips_seen = self.ds.skipped_steps  # restored with the checkpoint

    def _load_other_world(self, tag_dir: Path, saved_world: int) -> None:
        """Collective: the ZeRO-1/2 optimizer state of a tag saved on another number of ranks.
        DeepSpeed has loaded the module, lr schedule and counters (its ZeRO loader refuses
        another world size); here every rank gathers, from all saved shards, the pieces of the
        parameters its own partition covers (`deepspeed_io.consolidate`), cuts them to the live
        layout (`deepspeed_io.partition`, placed by each parameter's `_hp_mapping`, the map
        DeepSpeed's public safe_set_full_* API writes through) and hands that to the ZeRO
        optimizer's own `load_state_dict` as this rank's shard: loss scale, clip and version
        checks, the fp32 masters and the base optimizer state then load as on a same-size resume."""
        opt = self.ds.optimizer
        names = {id(p): n for n, p in self.model.named_parameters()}
        fragments = [deepspeed_io.Fragment(names[id(p)], m.param_group_index, m.lp_fragment_address.start,
                                           m.hp_fragment_address.start, m.hp_fragment_address.numel)
                     for p in self.model.parameters() if (m := getattr(p, "_hp_mapping", None)) is not None]
        error, full = None, None
        try:
            full = deepspeed_io.consolidate(tag_dir, saved_world, {f.name for f in fragments})
        except checkpoint.CheckpointError as e:
            error = str(e)
        checkpoint.raise_agreed(error)
        mine = deepspeed_io.partition(
            full, fragments, [t.numel() for t in opt.single_partition_of_fp32_groups],
            {"group_paddings": opt.groups_padding, "param_alignment_paddings": opt.round_robin_bit16_padding,
             "partition_count": opt.partition_count})
        rank = torch.distributed.get_rank(group=opt.dp_process_group)
        # The ZeRO loader reads only this rank's entry of the list (the rigid-format path).
        opt.load_state_dict([mine if r == rank else None for r in range(self.dist.world_size)],
                            load_optimizer_states=True, load_from_fp32_weights=True)

    def can_resume(self, sd: dict) -> str | None:
        """None if `sd` can be fully resumed by this engine, else why not (weights only). The
        world size may differ (see `_load_other_world`); the ZeRO stage may not."""
        info = sd.get("deepspeed")
        if sd.get("engine") != self.name or not info:
            return f"it was written by the {sd.get('engine', 'ddp')} engine"
        if info["zero_stage"] != self.zero_stage:
            return f"it was written with ZeRO stage {info['zero_stage']}, this run has stage {self.zero_stage}"
        zero_1_2 = hasattr(self.ds.optimizer, "single_partition_of_fp32_groups")
        if info["world_size"] != self.dist.world_size and not zero_1_2:
            return (f"it was written on {info['world_size']} ranks, this run has {self.dist.world_size}, and only "
                    f"ZeRO-1/2 state is re-partitioned (this run's DeepSpeed optimizer is "
                    f"{type(self.ds.optimizer).__name__})")
        return None

    def load_weights(self, ckpt_or_state: dict) -> None:
        """Weights only (either engine's checkpoint, or a model state dict); the fp32 master
        copies that ZeRO and bf16/fp16 keep are refreshed from them."""
        self.model.load_state_dict(checkpoint.weights_of(ckpt_or_state, prefer_ema=False))
        refresh = getattr(self.ds.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
        if self.ema is not None:
            ema = ckpt_or_state.get("ema") if "model" in ckpt_or_state else None
            self.ema.load_state_dict(ema or self._weights())

    def write_run_files(self, run_dir: Path) -> None:
        """RUN/deepspeed_config.json: the config DeepSpeed was given (rank 0)."""
        if self.dist.is_main:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = run_dir / ".deepspeed_config.json.tmp"
            tmp.write_text(json.dumps(self.config, indent=2) + "\n")
            tmp.replace(run_dir / "deepspeed_config.json")

    def describe(self) -> list[str]:
        return [f"DeepSpeed ZeRO stage {self.zero_stage}, {self.config['optimizer']['type']}, "
                f"micro-batch {self.config['train_micro_batch_size_per_gpu']} x accum {self.accum} "
                f"x {self.dist.world_size} ranks"] + self.notes

    def memory_report(self) -> dict:
        """Bytes this rank holds: module parameters, optimizer state (ZeRO >= 1: this rank's
        shard) and fp32 master parameters kept by the optimizer apart from the module's."""
        basic = self.ds.basic_optimizer if hasattr(self.ds, "basic_optimizer") else self.optimizer
        module_ids = {id(p) for p in self.model.parameters()}
        master = [p for g in basic.param_groups for p in g["params"] if id(p) not in module_ids]
        return {"param_bytes": checkpoint.tensor_bytes(list(self.model.parameters())),
                "optimizer_state_bytes": optimizer_state_bytes(basic),
                "master_param_bytes": checkpoint.tensor_bytes(master)}
