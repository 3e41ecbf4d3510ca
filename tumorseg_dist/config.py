"""One typed configuration for every command: dataclasses, TOML recipes, CLI overrides.

Precedence, lowest first: field defaults -> built-in preset (only for the built-in synthetic
run) -> `--config recipe.toml` -> command-line flags. Flags are flat (`--lr`, not
`--optim.lr`); TOML files use one table per dataclass (`[optim] lr = 1e-3`). Unknown TOML keys
and unknown flags are errors that name the key. The resolved config is written to
`RUN/config.toml` so a run can be reproduced with `--config RUN/config.toml`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import tomli_w
import tyro

from . import cli, outputs

VerifyMode = Literal["full", "quick", "off"]  # data/verify.py
Arch = Literal["unet", "unetplusplus", "deeplabv3", "deeplabv3plus", "fpn", "unet-classic"]


class ConfigError(ValueError):
    """A recipe or flag that cannot be used; the message names the key and the fix."""


# An empty mean/std is the train split's, read from the dataset's manifest.json.
FromManifest = tyro.conf.arg(help_behavior_hint="(default: from manifest.json)")


@dataclass
class DataConfig:
    """Where samples come from and how they reach the model."""

    path: Annotated[Optional[Path], tyro.conf.arg(name="data")] = None
    """Packed shard directory (from `tumorseg_dist.pack`). None: the built-in synthetic set,
    packed once under `shards/synthetic-*`."""
    loader: Literal["torch", "dali"] = "dali"
    """`dali` (default): NVIDIA DALI pipeline, decoding and augmenting on the GPU (CPU
    operators without CUDA). `torch`: indexed shard reader + torch DataLoader workers."""
    size: int = 640
    """Training/eval side length in pixels; images are resized in the loader."""
    geometry: Literal["squash", "letterbox", "crop"] = "squash"
    """How an image becomes size × size (docs/loader.md "Geometry"): `squash` resizes it (aspect
    ratio lost); `letterbox` resizes the long side and pads, aspect ratio kept; `crop` trains on
    size × size windows (see --crop-scale, --crop-foreground; evaluated as letterbox). Padding
    is excluded from the loss and metrics."""
    crop_scale: Literal["resize", "native"] = "resize"
    """--geometry crop: `resize` scales the short side to --size first; `native` keeps the
    source's pixels (no resampling) and crops them."""
    crop_foreground: float = 0.33
    """--geometry crop: fraction of training crops centred on a random lesion pixel (the rest
    uniform over the image), as nnU-Net oversamples the foreground."""
    in_channels: int = 3
    """Channels the model sees; grey images are repeated to this many."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    synthetic_samples: int = 400
    """Built-in set only: number of phantom images to generate."""
    synthetic_size: int = 256
    """Built-in set only: side length of the generated phantoms."""
    mean: Annotated[tuple[float, ...], FromManifest] = ()
    """Input normalisation mean per model channel in [0, 1] units. Empty: the train split's
    statistics from the dataset's manifest.json (recorded here in the run's config)."""
    std: Annotated[tuple[float, ...], FromManifest] = ()
    """Input normalisation std per model channel (empty: from manifest.json)."""
    fold: Optional[int] = None
    """Cross-validation fold of a dataset packed with `--folds K`: validate on fold k, train on
    the other folds (the test split stays held out). Run dir default: NAME-fK."""
    verify_shards: VerifyMode = "quick"
    """Before the first epoch, check the shards against manifest.json's sha256 and size:
    `quick` hashes only shards new or changed since the last check (cache keyed by path, size
    and mtime), `full` rehashes all, `off` skips (docs/pack.md "Verified shards")."""


# An augmentation setting the user did not give (None) is the preset's (data/augment.resolve).
FromPreset = cli.optional(float, "the preset's")


# The one declaration of the augmentation fields: data/augment.AugmentParams, the numbers the
# loaders apply, is made from these names.
@dataclass
class AugmentConfig:
    """Training-time augmentation, applied identically to image and mask. Never on val/test.

    Each augmentation has a per-sample probability (`*_p`) and a range; one not given is the
    preset's. See docs/loader.md for the order and the exact formulas (same in both loaders)."""

    augment: Literal["none", "light", "standard", "strong"] = "standard"
    """Preset: `none` disables augmentation; the others set probabilities and ranges below."""
    flip_p: FromPreset = None
    """Probability of each of horizontal and vertical flip."""
    affine_p: FromPreset = None
    """Probability of the rotation + scale + translation affine (one transform)."""
    rotate_deg: FromPreset = None
    """Max absolute rotation in degrees: uniform in [-rotate_deg, rotate_deg]."""
    scale: FromPreset = None
    """Max relative zoom, e.g. 0.1 = uniform in [0.9, 1.1]."""
    translate: FromPreset = None
    """Max translation as a fraction of the side, uniform per axis."""
    brightness_p: FromPreset = None
    """Probability of the brightness change."""
    brightness: FromPreset = None
    """Max relative brightness change: multiply by uniform [1-b, 1+b]."""
    contrast_p: FromPreset = None
    """Probability of the contrast change."""
    contrast: FromPreset = None
    """Max relative contrast change: stretch around the image mean by uniform [1-c, 1+c]."""
    gamma_p: FromPreset = None
    """Probability of the gamma change."""
    gamma: FromPreset = None
    """Gamma exponent range, e.g. 0.2 = x**g with g uniform in [0.8, 1.2]."""
    noise_p: FromPreset = None
    """Probability of additive Gaussian noise."""
    noise: FromPreset = None
    """Max noise standard deviation in [0, 1] image units; drawn uniformly in [0, noise] per
    sample."""


@dataclass
class ModelConfig:
    """Architecture and initial weights."""

    arch: Arch = "unet"
    """segmentation-models-pytorch architecture, or `unet-classic` (the seeds' own U-Net)."""
    encoder: str = "resnet34"
    """smp encoder name (ignored by unet-classic)."""
    encoder_weights: str = "imagenet"
    """`imagenet` (must be in the local Hugging Face cache: nothing is downloaded), `none`, or
    a path to a state dict for the encoder. Ignored by unet-classic."""
    classes: Annotated[int, FromManifest] = 0
    """Output classes K. 0: from the dataset (one sigmoid output for binary masks; K softmax
    outputs for a dataset packed with `pack --classes`, K counting the background)."""
    class_names: Annotated[tuple[str, ...], FromManifest] = ()
    """Class names by id (recorded from manifest.json; empty for binary masks)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 1e-4
    momentum: float = 0.9
    """SGD only."""
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    """`cosine` decays per step to 0 after warm-up; `plateau` is ReduceLROnPlateau on --monitor."""
    warmup_steps: int = 0
    """Linear warm-up over this many optimizer steps from 0 to --lr (cosine and none)."""
    plateau_factor: float = 0.1
    plateau_patience: int = 3


@dataclass
class LossConfig:
    """Training loss; the reference implementation is the spec for the fused kernel."""

    loss: Literal["dice_bce", "bce", "dice"] = "dice_bce"
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    dice_reduction: Literal["batch", "image"] = "batch"
    """`batch`: one Dice over the whole batch (smp DiceLoss semantics); `image`: mean of
    per-image Dice losses (MONAI style)."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    """`auto`: the Triton kernel on CUDA, the PyTorch reference elsewhere."""
    class_weights: Annotated[tuple[float, ...], tyro.conf.arg(help_behavior_hint="(default: all 1)")] = ()
    """K classes: a weight per class id, background first, for the cross-entropy and the
    class-weighted Dice mean (empty: all 1). Binary masks take none."""
    ignore_index: Optional[int] = None
    """K classes: a label value left out of the loss and the metrics (None: every pixel counts)."""


@dataclass
class TrainConfig:
    """The loop: length, precision, early stopping, resume."""

    batch_size: int = 16
    """GLOBAL batch size; each rank gets batch_size / world_size."""
    epochs: int = 50
    max_steps: Optional[int] = None
    """Stop after this many micro-batches in total, i.e. `step` in the logs (None: run all
    epochs); optimizer steps are this / --grad-accum (the same with --grad-accum 1)."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Autocast dtype. `auto`: bf16 on GPUs that support it (else fp16 + GradScaler), off on
    CPU. fp16 needs CUDA."""
    channels_last: bool = True
    compile: bool = False
    patience: int = 10
    """Early stopping: epochs without improvement of --monitor (0 disables)."""
    min_delta: float = 0.0
    monitor: str = "val_dice"
    """`val_dice` (maximised; with K classes the mean over the foreground classes), `val_loss`
    (minimised), or one class's Dice, `val_dice/NAME` (e.g. val_dice/malignant)."""
    threshold: float = 0.5
    """Probability threshold for metrics and predictions."""
    resume: str = "auto"
    """`auto`: continue from RUN/checkpoints/last.pt if present; `never`; or a checkpoint path.
    Resuming checks the checkpoint's config: see MAY_CHANGE_ON_RESUME."""
    weights_only: bool = False
    """With --resume PATH: load only the model (and EMA) weights of PATH and start the
    optimizer, lr schedule and progress fresh (fine-tuning; any other setting may differ)."""
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    log_every: int = 10
    """Micro-batches (`step` in the logs) between loss/lr log lines (and the only CPU-GPU
    syncs in the loop)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (and CUBLAS_WORKSPACE_CONFIG on CUDA): the same
    losses run after run, and across world sizes up to float reduction order (docs/cluster.md)."""
    test_eval: bool = True
    """At the end, score the test split with best.pt as `evaluate --checkpoint RUN/checkpoints/best.pt`
    does (test_metrics.json, overlays.png). --no-test-eval skips it: a sweep, or a large test
    split scored later with evaluate."""
    record_keys: bool = False
    """Debug: each steps.jsonl line also lists the sample keys of its global micro-batch (rank
    0's slice first; one gather per logged step). With --log-every 1 that is every step."""


@dataclass
class EngineConfig:
    """How the model is distributed, updated and tracked (docs/engine.md)."""

    engine: Literal["ddp", "deepspeed"] = "ddp"
    """`ddp`: torch DistributedDataParallel (or one process). `deepspeed`: DeepSpeed with ZeRO
    --zero-stage; on CPU it runs with DS_ACCELERATOR=cpu on gloo."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (replicated, like DDP), 1 (optimizer state sharded), 2 (optimizer
    state and gradients sharded). DeepSpeed only."""
    deepspeed_config: Optional[Path] = None
    """Expert DeepSpeed JSON merged with the generated one (RUN/deepspeed_config.json); a key
    that our flags also set must agree, or the run stops naming both values."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the effective batch is --batch-size x --grad-accum.
    `step` in logs and --max-steps count micro-batches."""
    clip_grad: float = 0.0
    """Max global gradient L2 norm (0: no clipping)."""
    ema_decay: float = 0.0
    """EMA of the weights, e.g. 0.999 (0: off). When on, validation, best.pt selection and the
    test evaluation use the EMA weights; checkpoints hold both."""
    max_bad_steps: int = 20
    """Stop with an error after this many consecutive optimizer steps with a non-finite loss or
    gradient (each is skipped); checked at log intervals, so no per-step host sync."""
    wandb: Literal["auto", "online", "offline", "disabled"] = "disabled"
    """Weights & Biases tracking on rank 0: `auto` is online when an API key is configured
    (WANDB_API_KEY or ~/.netrc) and offline otherwise; offline runs are written to RUN/wandb/
    for `wandb sync`. metrics.jsonl is written in every mode."""
    wandb_project: str = "tumorseg_dist"
    """W&B project; runs are grouped by the run name."""


@dataclass
class RunConfig:
    """Where the run writes."""

    out: Optional[Path] = None
    """Run directory (default: runs/<name>)."""
    name: Optional[str] = None
    """Run name (default: derived from data and arch)."""


@dataclass
class Config:
    """Everything a training run needs. Flags are flat: `--lr 3e-4 --arch fpn`. Start from a
    recipe with `--config recipes/NAME.toml` (flags override it); every run saves its resolved
    config as RUN/config.toml, reusable the same way."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)


# What a resume may change. Everything else decides what the run computes (model, input,
# loss, optimisation, augmentation, data order, engine layout) and must equal the checkpoint's
# config, or the run stops listing the differences: a new field is frozen until listed here.
# These change how long the run goes, when it stops, where and how fast it runs, and what it
# logs: a resume applies them and logs each one.
MAY_CHANGE_ON_RESUME = frozenset({
    "data.num_workers", "train.epochs", "train.max_steps", "train.patience", "train.min_delta",
    "train.device", "train.channels_last", "train.compile", "train.log_every",
    "engine.max_bad_steps", "engine.wandb", "engine.wandb_project", "run.out", "run.name",
    "data.verify_shards", "train.record_keys", "train.test_eval",
})
# How to resume, not what is resumed: never compared.
RESUME_MECHANICS = frozenset({"train.resume", "train.weights_only"})


def flag_name(section: str, key: str) -> str:
    """The command-line flag of a config field (`data.path` is `--data`)."""
    return "--data" if (section, key) == ("data", "path") else "--" + key.replace("_", "-")


# The built-in default run: with no --data, a preset sized for the machine. Applied under the
# user's recipe and flags, so anything the user sets still wins.
SYNTHETIC_PRESET_CPU: dict[str, dict[str, Any]] = {
    "data": {"size": 128, "in_channels": 1, "synthetic_samples": 240, "synthetic_size": 128,
             "num_workers": 1},
    "model": {"arch": "unet", "encoder": "resnet18", "encoder_weights": "none"},
    "optim": {"lr": 3e-3, "warmup_steps": 5},
    "train": {"batch_size": 8, "epochs": 6, "amp": "off", "channels_last": False,
              "patience": 0, "log_every": 5},
}
SYNTHETIC_PRESET_CUDA: dict[str, dict[str, Any]] = {
    "data": {"size": 640, "in_channels": 1, "synthetic_samples": 1000, "synthetic_size": 640},
    "model": {"arch": "unet", "encoder": "resnet34", "encoder_weights": "none"},
    "train": {"batch_size": 32, "epochs": 20},
}


def _unwrap(tp: Any) -> Any:
    """Strip Annotated/Optional wrappers: the runtime type a TOML value must coerce to."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp = _unwrap(tp)
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} = {value!r}: must be one of {', '.join(map(str, choices))}")
        return value
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):  # TOML gives lists, a checkpoint's config tuples
            raise ConfigError(f"{where} = {value!r}: expected a list")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, where) for v in value)
    if tp is Path:
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: must be true or false")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where} = {value!r}: expected {getattr(tp, '__name__', tp)}")


def apply_overrides(cfg: Config, table: dict[str, Any], source: str) -> Config:
    """Return a copy of cfg with a {section: {key: value}} table applied; unknown keys are errors."""
    cfg = dataclasses.replace(cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name))
                                      for f in dataclasses.fields(cfg)})
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section, values in table.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section [{section}]; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys")
        group = getattr(cfg, section)
        hints = typing.get_type_hints(type(group), include_extras=True)
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{key}; known keys in "
                                  f"[{section}]: {', '.join(hints)}")
            if section == "augment" and value == -1:  # how older runs wrote "the preset's"
                setattr(group, key, None)
                continue
            setattr(group, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))
    return cfg


def load_toml(path: Path, base: Config | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see recipes/ for examples)")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return apply_overrides(base or Config(), table, str(path))


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain TOML-able dict; None fields are left out (they are the defaults for those keys)."""
    out: dict[str, dict[str, Any]] = {}
    for section, values in dataclasses.asdict(cfg).items():
        out[section] = {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in values.items() if v is not None}
    return out


def save_toml(cfg: Config, path: Path) -> None:
    outputs.write_text(Path(path), "# resolved configuration of this run; reuse with --config\n"
                       + tomli_w.dumps(to_dict(cfg)))


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def parse(argv: list[str] | None = None, prog: str = "python -m tumorseg_dist.train") -> tuple[Config, str | None]:
    """Parse `--config FILE` + flags. Returns the config and, for the built-in run, the name of
    the preset that was applied (for the first log line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, rest = pre.parse_known_args(argv)

    def layered(preset: dict | None) -> Config:
        cfg = Config()
        if preset:
            cfg = apply_overrides(cfg, preset, "built-in preset")
        if known.config is not None:
            cfg = load_toml(known.config, cfg)
        return cli.parse(Config, rest, name="train", prog=prog, default=cfg)

    cfg = layered(None)
    preset_name = None
    if cfg.data.path is None:
        on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and cuda_available())
        preset_name = "synthetic-cuda" if on_cuda else "synthetic-cpu"
        cfg = layered(SYNTHETIC_PRESET_CUDA if on_cuda else SYNTHETIC_PRESET_CPU)
    validate(cfg)
    return cfg, preset_name


def monitor_mode(monitor: str) -> str:
    """"min" for val_loss, "max" for a Dice (val_dice, val_dice/NAME)."""
    return "min" if monitor == "val_loss" else "max"


def check_classes(cfg: Config, names: list[str] | None) -> None:
    """The K-class settings against the dataset's classes (None: binary masks)."""
    m, loss = cfg.model, cfg.loss
    k = len(names) if names else 1
    if m.classes not in (0, k):
        what = f"{k} classes ({', '.join(names)})" if names else "binary masks (one output)"
        raise ConfigError(f"--classes {m.classes}: the dataset {cfg.data.path} has {what}; leave --classes "
                          f"out (it is read from manifest.json) or re-pack with pack --classes")
    if not names and (loss.class_weights or loss.ignore_index is not None):
        raise ConfigError("--class-weights and --ignore-index are for K classes; the dataset has binary "
                          "masks (pack it with --classes for more than one class)")
    if loss.class_weights and len(loss.class_weights) != k:
        raise ConfigError(f"--class-weights has {len(loss.class_weights)} values for {k} classes "
                          f"({', '.join(names)}): give one per class, background first")
    mon = cfg.train.monitor
    if mon.startswith("val_dice/") and mon[9:] not in (names or [])[1:]:
        raise ConfigError(f"--monitor {mon}: the dataset has no foreground class {mon[9:]!r} "
                          + (f"(its classes: {', '.join(names[1:])})" if names else "(its masks are binary)"))


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    t = cfg.train
    if t.monitor not in ("val_loss", "val_dice") and not (t.monitor.startswith("val_dice/") and t.monitor[9:]):
        raise ConfigError(f"--monitor {t.monitor!r}: use val_dice, val_loss or val_dice/CLASS "
                          f"(a class name from the dataset's manifest.json)")
    if t.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {t.batch_size}")
    if t.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {t.epochs}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {t.max_steps}")
    if cfg.data.size < 32 or cfg.data.size % 32:
        raise ConfigError(f"--size must be a multiple of 32 (encoders downsample 5 times), got {cfg.data.size}")
    if not 0.0 <= cfg.data.crop_foreground <= 1.0:
        raise ConfigError(f"--crop-foreground is a fraction of the crops and must be in [0, 1], "
                          f"got {cfg.data.crop_foreground}")
    if cfg.data.in_channels not in (1, 3):
        raise ConfigError(f"--in-channels must be 1 or 3, got {cfg.data.in_channels}")
    e = cfg.engine
    if e.zero_stage not in (0, 1, 2):
        raise ConfigError(f"--zero-stage must be 0, 1 or 2, got {e.zero_stage}")
    if e.zero_stage and e.engine != "deepspeed":
        raise ConfigError(f"--zero-stage {e.zero_stage} needs --engine deepspeed (DDP has no ZeRO)")
    if e.deepspeed_config is not None and e.engine != "deepspeed":
        raise ConfigError("--deepspeed-config needs --engine deepspeed")
    if e.deepspeed_config is not None and not Path(e.deepspeed_config).is_file():
        raise ConfigError(f"--deepspeed-config {e.deepspeed_config}: no such file "
                          f"(see launch/deepspeed/ for examples)")
    if e.grad_accum < 1:
        raise ConfigError(f"--grad-accum must be >= 1, got {e.grad_accum}")
    if e.clip_grad < 0:
        raise ConfigError(f"--clip-grad must be >= 0 (0 disables clipping), got {e.clip_grad}")
    if not 0 <= e.ema_decay < 1:
        raise ConfigError(f"--ema-decay must be in [0, 1) (0 disables the EMA), got {e.ema_decay}")
    if e.max_bad_steps < 1:
        raise ConfigError(f"--max-bad-steps must be >= 1, got {e.max_bad_steps}")
    if t.resume not in ("auto", "never") and not Path(t.resume).is_file():
        raise ConfigError(f"--resume {t.resume}: no such checkpoint file (use auto, never, or a path to a .pt file)")
    if t.weights_only and t.resume in ("auto", "never"):
        raise ConfigError(f"--weights-only needs --resume PATH (the checkpoint whose weights to start "
                          f"from), not --resume {t.resume}")
