"""The work of `python -m tumorseg_dist.train` (its flags: tumorseg_dist/config.py): the run
from data and resume checks to the test-split metrics, as one readable function, `run`."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import checkpoint, dist as distmod, resume_guard, scoring, threads, tracking
from ..config import Config, save_toml
from ..config import check_classes
from ..data.loader import build_loader, resolve_norm
from ..data.shards import SPLITS, check_fold, read_manifest
from ..data.shards import label_classes
from ..data.synthetic import ensure_synthetic
from ..data.verify import verify_shards
from ..engines import NonFiniteLossError, build_engine
from ..figures import plot_overlays
from ..inference import Predictor, predictor_of
from ..log import RunLog, fmt
from ..loop import TrainState, checkpoint_state, class_options, evaluate, fit, restore
from ..losses import build_multiclass_loss_fn
from ..models import build_model, model_name
from ..precision import resolve_precision

SHARDS_ROOT = Path("shards")


def deterministic(device: torch.device) -> None:
    """--deterministic: no nondeterministic kernels (an op without a deterministic version is an
    error naming it). The torch loader's augmentation is seeded per global position already, so
    worker count and scheduling do not change what a sample gets."""
    if device.type == "cuda":   # cuBLAS needs a fixed workspace to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def prepare_data(cfg: Config, dist: distmod.DistInfo) -> Path:
    """The packed dataset to train on; the built-in set is packed by rank 0, once."""
    if cfg.data.path is not None:
        # fail early, on every rank, with the pack command to run
        check_fold(read_manifest(cfg.data.path), cfg.data.fold, cfg.data.path, training=True)
        # Absolute, so evaluate/export find the data from the checkpoint whatever their cwd.
        return Path(cfg.data.path).resolve()
    out = None
    if cfg.data.fold is not None:
        raise ValueError(f"--fold {cfg.data.fold} needs --data: a dataset packed with --folds K "
                         f"(the built-in synthetic set has no folds)")
    if dist.is_main:
        out = ensure_synthetic(SHARDS_ROOT, cfg.data.synthetic_samples, cfg.data.synthetic_size, cfg.train.seed)
    distmod.barrier()
    return Path(distmod.broadcast_object(str(out.resolve()) if out else None))


def resolve_run_dir(cfg: Config, data_dir: Path) -> Path:
    if cfg.run.out is not None:
        return Path(cfg.run.out)
    name = cfg.run.name or f"{data_dir.name}-{model_name(cfg.model.arch, cfg.model.encoder, '-')}"
    if cfg.data.fold is not None:
        name += f"-f{cfg.data.fold}"   # one run per fold, side by side (a recipe's name too)
    return Path("runs") / name


def resume(engine, src: resume_guard.Source | None, dist, log: RunLog, batch: int) -> TrainState:
    """Continue from `src` (full state, or its weights only), else start fresh; counters in
    micro-batches of this run's global `batch`."""
    if src is None or src.weights_only:
        if dist.is_main:  # a fresh run, or fine-tuning: new logs
            log.metrics_path.unlink(missing_ok=True)
            log.steps_path.unlink(missing_ok=True)
        if src is None:
            return TrainState()
    state = restore(engine, src.ckpt, src.path, src.weights_only, global_batch=batch)
    if src.weights_only:
        log.info(f"loaded weights only from {src.path}; optimizer, lr schedule and progress start "
                 f"fresh (fine-tuning)")
        return state
    log.rewind(state.epoch, state.last_record)
    log.rewind_steps(int(src.ckpt["train_state"]["step"]))   # the checkpoint's own unit
    log.info(f"resumed from {src.path}: epoch {state.epoch}, step {state.step}"
             + (f", sample {state.samples_in_epoch} of the next epoch" if state.samples_in_epoch else ""))
    return state


def resolve_classes(cfg: Config, data_dir: Path) -> None:
    """--classes 0 (the default) becomes the dataset's K when it was packed with label masks
    (`pack --classes`, K > 2), with the class names; binary datasets keep 0 (one output)."""
    names = label_classes(read_manifest(data_dir))
    check_classes(cfg, names)
    if names:
        cfg.model.classes, cfg.model.class_names = len(names), tuple(names)


def test_predictor(cfg: Config, engine, state: TrainState, dist, source: Path) -> Predictor:
    """The predictor `evaluate --checkpoint SOURCE` rebuilds, from the weights now in the engine:
    the dict a checkpoint holds (config, normalisation, the engine's weights and EMA) through the
    same `predictor_of`, so no file is re-read, yet the model is the file's: fp32, its EMA
    weights when on, eager, contiguous, whatever the engine runs (fp16 DeepSpeed parameters,
    torch.compile, channels_last). On every rank rank 0's weights, as the checkpoint has them:
    DDP broadcasts buffers at the start of a training forward, so each rank's last forward left
    BatchNorm statistics of its own batch (DeepSpeed's eval() broadcasts them itself)."""
    engine.eval()
    model = predictor_of(checkpoint_state(cfg, engine, state), source, dist.device)
    if dist.distributed:
        for t in model.model.state_dict().values():   # views of the parameters and buffers
            torch.distributed.broadcast(t, src=0)
    return model


def evaluate_test_split(cfg: Config, engine, data_dir: Path, dist, loss_fn, log: RunLog, state, reason: str,
                        run_dir: Path, workers: int, source: Path) -> None:
    """test_metrics.json with the weights now in the engine (those of `source`): the metrics as
    `evaluate --checkpoint SOURCE` scores them (scoring.score_split: each image through the
    predictor, compared at its original size), and the loss and overlays.png from the training
    loop's pass over the test loader at the training size (the loss is the training loss, defined
    on the model's output there, as val_loss)."""
    test_loader = build_loader(cfg, data_dir, "test", dist, training=False, precision=engine.precision,
                               workers=workers)
    view, shown = evaluate(engine, test_loader, loss_fn, cfg.train.threshold, log, "test", keep=8,
                           **class_options(cfg))
    model = test_predictor(cfg, engine, state, dist, source)
    shards = scoring.split_shards(data_dir, "test", read_manifest(data_dir), model.classes)
    # No surface distances: MONAI costs seconds to import, and `evaluate` reports them.
    scores = scoring.score_split(model, shards, dist, log, threshold=model.threshold, workers=workers,
                                 surface=False, desc="test (original size)")
    test = {**scores.metrics, **({} if scores.matrix is None else {"confusion_matrix": scores.matrix}),
            "loss": view["loss"], "resolution": scores.resolution, "inference": "whole"}
    log.write_json("test_metrics.json", {"best_epoch": state.best_epoch, "stopped": reason, **test})
    if dist.is_main and shown is not None:
        plot_overlays(shown, run_dir / "overlays.png", cfg.data.mean, cfg.data.std, cfg.train.threshold)
    log.info(f"test ({test['samples']} images at their original size, best epoch {state.best_epoch}): dice "
             f"{fmt(test['dice'])} iou {fmt(test['iou'])} precision {fmt(test['precision'])} recall "
             f"{fmt(test['recall'])} -> {run_dir}")
    per_class = [f"{k[5:]} {fmt(v)}" for k, v in test.items() if k.startswith("dice/")]
    if per_class:
        log.info(f"test dice per class: {', '.join(per_class)}")


def test_split(cfg: Config, engine, data_dir: Path, dist, loss_fn, log: RunLog, state, reason: str,
               run_dir: Path, workers: int) -> None:
    """The end-of-run test evaluation with best.pt's weights (last.pt's when no epoch improved)."""
    best = run_dir / "checkpoints" / "best.pt"
    distmod.barrier()  # before looking: rank 0 may still be writing best.pt
    source = run_dir / "checkpoints" / "last.pt"   # the weights in the engine, on disk
    if best.is_file():
        engine.load_weights(checkpoint.load(best, dist.device))  # and its EMA weights, if any
        source = best
    if read_manifest(data_dir)["splits"]["test"]["samples"] == 0:
        log.info(f"{data_dir} has an empty test split: no test_metrics.json (re-pack with a larger "
                 f"test fraction in --split to get one) -> {run_dir}")
    else:
        evaluate_test_split(cfg, engine, data_dir, dist, loss_fn, log, state, reason, run_dir, workers, source)


def run(cfg: Config, preset: str | None) -> int:
    dist = distmod.init(cfg.train.device)
    cfg.train.device = dist.device.type
    precision = resolve_precision(cfg.train, dist.device)  # the one decision, handed down
    cfg.train.amp = precision.amp  # config.toml records what runs ("auto" resolved)
    budget = threads.plan(cfg.data.num_workers, min_workers=1 if cfg.data.loader == "dali" else 0)
    threads.apply(budget)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        deterministic(dist.device)
    data_dir = prepare_data(cfg, dist)
    cfg.data.path = data_dir
    cfg.data.mean, cfg.data.std = resolve_norm(cfg, data_dir)  # recorded in config + checkpoints
    resolve_classes(cfg, data_dir)   # K classes from manifest.json, recorded the same way
    run_dir = resolve_run_dir(cfg, data_dir)
    log = RunLog(run_dir, dist.is_main)
    # Before anything is written or trained: a corrupt shard would otherwise train silently.
    verify_shards(data_dir, SPLITS, cfg.data.verify_shards, dist, log.info)
    if preset:
        log.info(f"no --data: built-in synthetic set {data_dir} with the {preset} preset "
                 f"(size {cfg.data.size}, {cfg.model.arch}/{cfg.model.encoder}, {cfg.train.epochs} epochs"
                 f"{', CPU-sized: no CUDA device' if preset.endswith('cpu') else ''})")
    log.info(f"run {run_dir}: world size {dist.world_size}, device {dist.device}, amp {cfg.train.amp}, "
             f"channels_last {cfg.train.channels_last}, global batch {cfg.train.batch_size}")
    log.info(f"threads: {budget.describe()}")
    if cfg.train.resume not in ("auto", "never"):  # recorded absolute: a rerun finds it from any cwd
        cfg.train.resume = str(Path(cfg.train.resume).resolve())
    src = resume_guard.source(cfg, run_dir, dist.device)
    for line in [] if src is None else resume_guard.check(cfg, src.ckpt, src.path, src.weights_only):
        log.info(line)
    if src is not None and not src.weights_only:
        for line in resume_guard.relayout(cfg, src.ckpt, src.path, dist.world_size):
            log.info(line)
    model = build_model(cfg.model, cfg.data.in_channels)  # first: missing weights fail at once

    train_loader = build_loader(cfg, data_dir, "train", dist, training=True, precision=precision,
                                workers=budget.workers)
    val_loader = build_loader(cfg, data_dir, "val", dist, training=False, precision=precision,
                              workers=budget.workers)
    steps = len(train_loader) * cfg.train.epochs
    total_steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
    loss_fn = build_multiclass_loss_fn(cfg.loss, cfg.model.classes or 1, cfg.loss.class_weights or None,
                                       cfg.loss.ignore_index)   # binary: build_loss_fn(cfg.loss) itself
    engine = build_engine(cfg, model, dist, loss_fn, total_steps, precision)
    for line in engine.describe():
        log.info(f"engine: {line}")
    # Only now, with the resume checked and the model built: a run refused before this point
    # leaves no directory, and an existing config.toml as it was.
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_toml(cfg, run_dir / "config.toml")
        log.open_file()  # RUN/train.log: every line shown so far, then the rest
        for tmp in checkpoint.remove_stale_temps(run_dir / "checkpoints"):
            log.info(f"removed {tmp}: the temp file of a checkpoint write that was killed")
    engine.write_run_files(run_dir)  # DeepSpeed: RUN/deepspeed_config.json

    state = resume(engine, src, dist, log, cfg.train.batch_size)
    if state.epoch >= cfg.train.epochs or state.stopped_early:
        log.info("nothing left to train: the checkpoint already finished its epochs")
        reason = "done"
    else:
        tracker = tracking.start(cfg, run_dir, run_dir.name, dist.is_main, log.info)
        try:
            state, reason = fit(cfg, engine, train_loader, val_loader, loss_fn, state, run_dir, dist, log,
                                tracker=tracker)
        except NonFiniteLossError as e:  # say which files on disk are still good, read from them
            raise NonFiniteLossError(f"{e} {checkpoint.last_good(run_dir / 'checkpoints')}") from None
        if tracker is not None:
            tracker.finish(distmod.REQUEUE_EXIT_CODE if reason == "preempted" else 0)
    if reason == "preempted":
        distmod.cleanup()
        return distmod.REQUEUE_EXIT_CODE

    if cfg.train.test_eval:
        test_split(cfg, engine, data_dir, dist, loss_fn, log, state, reason, run_dir, budget.workers)
    else:
        log.info(f"--no-test-eval: the test split was not scored (evaluate --checkpoint "
                 f"{run_dir / 'checkpoints' / 'best.pt'} scores it) -> {run_dir}")
    distmod.cleanup()
    log.close()
    return 0

