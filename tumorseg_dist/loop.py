"""The training loop as plain functions: `train_step`, `evaluate`, `fit`.

CPU-GPU syncs happen only at log intervals and epoch ends. Every rank runs the same number of
steps (the loaders guarantee equal batch counts), so collectives never wait on a missing rank.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, monitor_mode, to_dict
from .data.batch import Batch, Loader
from .dist import DistInfo, all_reduce_sum, broadcast_object
from .figures import OverlayBatch, plot_curves
from .log import RunLog, epoch_line
from .losses import DiceBCELoss
from .metrics import MetricAccumulator, confusion, per_image_scores, summarize
from .metrics import ClassMetricAccumulator, confusion_matrix, summarize_classes
from .metrics import class_confusion, image_class_scores


@dataclass
class TrainState:
    epoch: int = 0            # completed epochs
    step: int = 0             # micro-batches taken, each of `global_batch` samples
    # The position: global samples of epoch `epoch` already trained, whatever the world size
    # (mid-epoch resume). Checkpoints before it held `batch_in_epoch` (see `saved_state`).
    samples_in_epoch: int = 0
    global_batch: int = 0     # samples per micro-batch over all ranks when this was saved
    world_size: int = 0       # ranks that saved it (0: not recorded)
    # Their training-loss sum and batch count over all ranks, so the resumed epoch's
    # train_loss averages every batch of the epoch, not only those after the resume.
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    last_record: dict = field(default_factory=dict)


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; ranks agree on it at the next check (one small all-reduce)."""

    def __init__(self, dist: DistInfo):
        self.dist, self.flag = dist, False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. in a notebook helper)
                pass

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def agreed(self) -> bool:
        t = torch.tensor([1.0 if self.flag else 0.0], device=self.dist.device)
        return bool(all_reduce_sum(t).item() > 0)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def gather_keys(batch: Batch, dist: DistInfo) -> list[str]:
    """--record-keys: the sample keys of this global micro-batch, rank 0's slice first
    (collective: every rank calls it at the same step)."""
    if not dist.distributed:
        return list(batch.keys)
    every: list = [None] * dist.world_size
    torch.distributed.all_gather_object(every, list(batch.keys))
    return [k for keys in every for k in keys]


def train_step(engine, batch: Batch) -> torch.Tensor:
    # The pad mask (geometry padding, Batch.pad) reaches the loss only when there is one: an
    # unpadded batch runs the engine's step exactly as before.
    if batch.pad is None:
        return engine.train_step(batch.image, batch.mask)
    return engine.train_step(batch.image, batch.mask, pad=batch.pad)


class _FigurePicker:
    """Up to `n` of this rank's images for an overlay figure, those with a lesion first (an
    empty image shows little), with their Dice, and the count of lesion-free images."""

    def __init__(self, n: int, threshold: float, classes: list[str] | None = None):
        self.n, self.threshold, self.classes = n, threshold, classes   # classes: K-class names
        self.lesion: list[tuple] = []
        self.empty: list[tuple] = []
        self.without_lesion = 0

    def add(self, image: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor,
            pad: torch.Tensor | None = None) -> None:
        has = mask.flatten(1).amax(1) > 0.5
        self.without_lesion += int((~has).sum())
        if len(self.lesion) >= self.n:
            return
        if self.classes is None:
            dice, _ = per_image_scores(confusion(logits, mask, self.threshold, pad))
            probs = torch.sigmoid(logits.float())
        else:   # K classes: the mean Dice over the foreground classes, softmax probabilities
            dice = image_class_scores(class_confusion(logits, mask, pad=pad))[0].mean(1)
            probs = torch.softmax(logits.float(), 1)
        for i in range(image.shape[0]):
            pool = self.lesion if has[i] else self.empty
            if len(pool) < self.n:
                pool.append((image[i].float().cpu(), mask[i].cpu(), probs[i].cpu(), dice[i].item()))

    def result(self, split_images: int, device: torch.device) -> OverlayBatch | None:
        # Collective: the lesion-free count is the split's, summed over ranks.
        without = int(all_reduce_sum(torch.tensor([float(self.without_lesion)], device=device)).item())
        chosen = (self.lesion + self.empty)[:self.n]
        if not chosen:
            return None
        images, masks, probs, dice = zip(*chosen)
        return OverlayBatch(torch.stack(images), torch.stack(masks), torch.stack(probs), list(dice),
                            without, split_images, tuple(self.classes or ()))


@torch.no_grad()
def evaluate(engine, loader: Loader, loss_fn: DiceBCELoss | None, threshold: float,
             log: RunLog | None = None, desc: str = "val", keep: int = 0,
             classes: list[str] | None = None, ignore_index: int | None = None):
    """Dataset-level metrics over every real sample of the split, counted once across ranks.

    Pixels a batch's pad mask marks as padding count in neither the loss nor the metrics.
    "loss" is `loss_fn` over the whole split as one batch (its parts are summed over batches
    and ranks before the ratio, see docs/loss.md), so it does not depend on the world size or
    the batch size; NaN without a loss_fn. With keep > 0, also returns an OverlayBatch of up to
    `keep` of this rank's images (lesions first) for figures, else only the metrics.
    `classes` (names by id, K > 2): the K-class metrics (metrics.summarize_classes, per class
    and their foreground mean, plus the pixel confusion matrix), and the figure batch's
    probabilities are the K softmax maps."""
    engine.eval()
    if classes is None:
        acc = MetricAccumulator(engine.device, extra=DiceBCELoss.N_PARTS)
    else:
        acc = ClassMetricAccumulator(engine.device, len(classes), 0 if loss_fn is None else loss_fn.n_parts,
                                     ignore_index)
    picker = _FigurePicker(keep, threshold, classes) if keep > 0 else None
    it = loader if log is None else log.progress(loader, len(loader), desc, unit="batch")
    for batch in it:
        logits = engine.eval_logits(batch.image)
        v, pad = batch.valid, batch.pad      # pad: geometry padding counts in no loss or metric
        parts = None if loss_fn is None else (
            loss_fn.parts(logits[v], batch.mask[v]) if pad is None
            else loss_fn.parts(logits[v], batch.mask[v], pad[v]))
        if classes is None:
            acc.update(logits, batch.mask, v, threshold, parts, pad=pad)
        else:
            acc.update(logits, batch.mask, v, parts, pad=pad)
        if picker is not None:
            picker.add(batch.image[v], batch.mask[v], logits[v], None if pad is None else pad[v])
    counts, parts = acc.reduce()
    if classes is None:
        metrics = summarize(counts)
    else:
        metrics = summarize_classes(counts, classes)
        metrics["confusion_matrix"] = confusion_matrix(counts, len(classes))
    metrics["loss"] = float("nan") if loss_fn is None else loss_fn.from_parts(parts)
    if picker is None:
        return metrics
    return metrics, picker.result(int(metrics["samples"]), engine.device)


def class_options(cfg: Config) -> dict:
    """evaluate()'s K-class arguments from the run's config (none for binary masks)."""
    names = list(cfg.model.class_names)
    return {"classes": names, "ignore_index": cfg.loss.ignore_index} if len(names) > 2 else {}


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def checkpoint_meta(cfg: Config, state: TrainState) -> dict:
    """The engine-independent part of a checkpoint: progress, RNG, and what evaluate/predict/
    export need without training flags: the config (architecture, encoder, size, channels) and
    the input normalisation."""
    return {"format_version": checkpoint.FORMAT_VERSION,
            "train_state": asdict(state), "rng": checkpoint.rng_state(), "config": to_dict(cfg),
            "normalization": {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}}


def checkpoint_state(cfg: Config, engine, state: TrainState) -> dict:
    """Everything to resume, as one dict (what `--engine ddp` writes to last.pt)."""
    return {**checkpoint_meta(cfg, state), **engine.state_dict()}


def save(cfg: Config, engine, state: TrainState, path: Path, dist: DistInfo) -> None:
    """Collective: every rank calls it at the same step. The engine decides who writes what
    (DDP: rank 0, one atomic file; DeepSpeed: a shard per rank, then rank 0's metadata)."""
    engine.save_checkpoint(path, checkpoint_meta(cfg, state))


def saved_state(ckpt: dict, global_batch: int) -> TrainState:
    """The checkpoint's TrainState, its counters in micro-batches of `global_batch` samples (the
    layout this run trains with, see resume_guard.relayout). An old checkpoint's
    `batch_in_epoch` (batches of the global batch it was written with) becomes samples."""
    ts = dict(ckpt["train_state"])
    saved_batch = ts.get("global_batch") or (ckpt.get("config") or {}).get("train", {}).get("batch_size") \
        or global_batch
    if "batch_in_epoch" in ts:
        ts["samples_in_epoch"] = ts.pop("batch_in_epoch") * saved_batch
    state = TrainState(**ts)
    if saved_batch != global_batch:   # positions sit on optimizer steps: the division is exact
        state.step = state.step * saved_batch // global_batch
    state.global_batch = global_batch
    return state


def restore(engine, ckpt: dict, path: Path | None = None, weights_only: bool = False,
            global_batch: int = 0) -> TrainState:
    """Resume the full state from `ckpt` (read from `path`), or with weights_only load its model
    (and EMA) weights into a fresh TrainState. A checkpoint this engine cannot fully resume
    (`engine.can_resume` says why: another ZeRO stage, or ZeRO-0 on another world size) is an error
    that says how to use it instead. Counters come back in micro-batches of `global_batch`
    (0: the checkpoint's own), so a resume on another world size continues the same position."""
    where = "the checkpoint" if path is None else Path(path)
    if weights_only:
        _load_fitting(engine.load_weights, ckpt, where)
        return TrainState()
    why = engine.can_resume(ckpt)
    if why is not None:
        raise checkpoint.CheckpointError(
            f"{where} cannot be resumed by this run: {why}. Resume it with the layout it was "
            f"written with, or fine-tune from its weights with --out NEW_DIR --resume {where} "
            f"--weights-only")
    state = saved_state(ckpt, global_batch or ckpt["train_state"].get("global_batch") or 1)
    if "micro_batches" in ckpt:   # the DDP engine's accumulation counter, in the same unit
        ckpt = {**ckpt, "micro_batches": state.step}
    _load_fitting(lambda c: engine.load_state_dict(c, None if path is None else Path(path).parent),
                  ckpt, where)
    checkpoint.set_rng_state(ckpt["rng"])
    return state


def _load_fitting(load, ckpt: dict, where) -> None:
    """torch's key-by-key report of weights that do not fit runs to kilobytes: one line instead."""
    try:
        load(ckpt)
    except RuntimeError as e:
        lines = str(e).splitlines()
        if not lines or not lines[0].startswith("Error(s) in loading state_dict"):
            raise
        raise checkpoint.CheckpointError(
            f"{where}: its weights do not fit the model this run builds ({lines[1].strip()[:160]}...); "
            f"pass the --arch, --encoder and --in-channels it was trained with") from None


def train_epoch(cfg: Config, engine, loader: Loader, state: TrainState, epoch: int, dist: DistInfo,
                log: RunLog, stop: StopRequest, tracker, ckpt_dir: Path) -> tuple[dict, str]:
    """One epoch of steps from `state.samples_in_epoch`. Returns (train stats, outcome) with
    outcome "done", "max_steps" or "preempted" (last.pt already saved at this step).

    A stop is taken only at an optimizer-step boundary: the checkpoint then holds no half-
    accumulated gradient, and its position divides by any layout of the same optimizer batch."""
    t = cfg.train
    accum = cfg.engine.grad_accum
    state.world_size, state.global_batch = dist.world_size, t.batch_size
    start = state.samples_in_epoch // t.batch_size
    steps_per_epoch = len(loader)
    loader.set_epoch(epoch)
    engine.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    carried = torch.tensor([state.epoch_loss_sum, state.epoch_loss_count], dtype=torch.float64,
                           device=dist.device)

    def totals() -> torch.Tensor:  # collective: [loss sum, batches] of the epoch so far
        return all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(seen)])) + carried

    seen, t0, outcome, check_stop = 0, time.perf_counter(), "done", False
    bar = log.progress(loader, steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}", unit="batch")
    for i, batch in enumerate(bar):
        if i < start:
            continue  # resumed mid-epoch: these batches were trained before the stop
        loss = train_step(engine, batch)
        loss_sum += loss.double()
        seen += 1
        state.step += 1
        state.samples_in_epoch = (i + 1) * t.batch_size
        at_log = state.step % t.log_every == 0
        keys = gather_keys(batch, dist) if at_log and t.record_keys else None
        if at_log:
            skipped = engine.check_health()  # same on every rank; may raise
            if dist.is_main:
                lv, lr = loss.item(), engine.lr()
                log.info(f"  step {state.step} loss {lv:.4f} lr {lr:.2e}"
                         + (f" ({skipped} non-finite steps skipped)" if skipped else ""))
                log.append_step({"step": state.step, "epoch": epoch + 1, "loss": lv, "lr": lr,
                                 "skipped": skipped, "samples": state.step * t.batch_size,
                                 **({} if keys is None else {"keys": keys})})
                if tracker is not None:
                    tracker.log_step(state.step, lv, lr, skipped)
        if t.max_steps is not None and state.step >= t.max_steps:
            outcome = "max_steps"
            break
        check_stop |= at_log or i + 1 == steps_per_epoch
        if check_stop and (state.step % accum == 0 or i + 1 == steps_per_epoch):
            check_stop = False
            if not stop.agreed():
                continue
            engine.check_health()
            so_far = totals()
            state.epoch_loss_sum, state.epoch_loss_count = so_far[0].item(), int(so_far[1].item())
            save(cfg, engine, state, ckpt_dir / "last.pt", dist)
            log.info(f"stop requested: saved {ckpt_dir / 'last.pt'} at step {state.step} "
                     f"(epoch {epoch + 1}, sample {state.samples_in_epoch} of {steps_per_epoch * t.batch_size}); resume with --resume auto")
            return {}, "preempted"
    elapsed = time.perf_counter() - t0
    epoch_totals = totals()
    state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0  # the next epoch starts its own sums
    stats = {"train_loss": (epoch_totals[0] / epoch_totals[1].clamp_min(1)).item(),
             "images_per_s": seen * t.batch_size / max(elapsed, 1e-9), "seconds": elapsed}
    return stats, outcome


def epoch_record(state: TrainState, train: dict, val: dict, lr: float) -> dict:
    """The metrics.jsonl line of an epoch."""
    return {"epoch": state.epoch, "step": state.step, "train_loss": train["train_loss"],
            "val_loss": val["loss"], "val_dice": val["dice"], "val_iou": val["iou"],
            "val_precision": val["precision"], "val_recall": val["recall"],
            "val_accuracy": val["accuracy"], "val_mean_image_dice": val["mean_image_dice"],
            "val_mean_image_iou": val["mean_image_iou"], "val_samples": val["samples"],
            "lr": lr, "images_per_s": train["images_per_s"], "seconds": train["seconds"],
            # K classes: val_dice/NAME, val_iou/NAME, ... (none for binary masks)
            **{f"val_{k}": v for k, v in val.items() if "/" in k}}


def fit(cfg: Config, engine, train_loader: Loader, val_loader: Loader, loss_fn, state: TrainState,
        run_dir: Path, dist: DistInfo, log: RunLog, tracker=None) -> tuple[TrainState, str]:
    """Train until epochs, --max-steps, early stopping or a stop signal.

    `tracker` (rank 0, optional): a `tracking.Tracker` that gets the values logged here.
    Non-finite steps are skipped by the engine; `engine.check_health()` (at log intervals and
    epoch ends) raises NonFiniteLossError after --max-bad-steps consecutive ones, before any
    further checkpoint is written.
    Returns the state and why it ended: "done", "early_stop", "max_steps" or "preempted"."""
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    mode = monitor_mode(t.monitor)
    stop = StopRequest(dist)
    reason = "done"
    # Picking figure images ends in a collective, so every rank must agree to pick: only rank 0
    # has a tracker.
    images = bool(broadcast_object(tracker is not None and tracker.wants_images))
    try:
        for epoch in range(state.epoch, t.epochs):
            train, reason = train_epoch(cfg, engine, train_loader, state, epoch, dist, log, stop,
                                        tracker, ckpt_dir)
            if reason == "preempted":
                return state, reason
            engine.check_health()
            val = evaluate(engine, val_loader, loss_fn, t.threshold, log, keep=8 if images else 0,
                           **class_options(cfg))
            val, shown = val if images else (val, None)
            state.epoch, state.samples_in_epoch = epoch + 1, 0
            record = epoch_record(state, train, val, engine.lr())
            monitored = record[t.monitor]
            if improved(monitored, state.best, mode, t.min_delta):
                state.best, state.best_epoch, state.bad_epochs = monitored, state.epoch, 0
                state.last_record = record
                save(cfg, engine, state, ckpt_dir / "best.pt", dist)
            else:
                state.bad_epochs += 1
            engine.end_epoch(monitored)
            state.last_record = record
            if t.patience and state.bad_epochs >= t.patience:
                state.stopped_early, reason = True, "early_stop"
            save(cfg, engine, state, ckpt_dir / "last.pt", dist)
            log.append(record)
            log.info(epoch_line(record))
            if tracker is not None:
                tracker.log_epoch(record, shown)
            if dist.is_main:
                plot_curves(log.records(), run_dir / "curves.png", state.best_epoch or None, t.monitor)
            if reason != "done":
                if reason == "early_stop":
                    best = f"no epoch had a defined {t.monitor}" if state.best is None \
                        else f"best {state.best:.4f} at epoch {state.best_epoch}"
                    log.info(f"early stopping: {t.monitor} has not improved for {t.patience} epochs "
                             f"({best})")
                break
    finally:
        stop.restore()
    return state, reason
