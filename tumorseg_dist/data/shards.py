"""The shard contract (docs/pack.md): tar shards + DALI `.idx` + `manifest.json`, written atomically.

Every importer produces `Sample`s; `write_dataset` turns an iterable of them into
`OUT/{split}-{index:06d}.tar` (+ `.idx`) and `OUT/manifest.json`. Output goes to a temporary
sibling directory that is renamed into place only when complete, so an interrupted pack never
leaves half a dataset, and an existing complete output is never damaged.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from ..outputs import FULL_DISK, free_space

SPLITS = ("train", "val", "test")
CODECS = ("png", "jp2", "raw", "jpeg")
IMAGE_EXT = {"png": "image.png", "jp2": "image.jp2", "raw": "image.npy", "jpeg": "image.jpg"}
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


class ShardError(RuntimeError):
    """A shard directory that cannot be written or read; the message names the file and the fix."""


@dataclass(frozen=True)
class WorkerFailure:
    """A ShardError raised in a DataLoader worker, carried back as a value: torch would re-raise it
    with the worker's traceback folded into the message, and the user should see one line."""

    message: str

    def reraise(self):
        raise ShardError(self.message)


@dataclass
class Sample:
    """One image/mask pair ready to be written. `image` keeps its dtype and channels."""

    key: str
    image: np.ndarray           # H×W or H×W×C, uint8 or uint16
    mask: np.ndarray            # H×W, any dtype; non-zero = tumour
    source: str                 # image path relative to the input root
    mask_sources: list[str] = field(default_factory=list)
    group: str | None = None    # patient / case id for splitting
    dataset: str = ""
    split: str | None = None    # given split (COCO); None = assigned by group
    meta: dict = field(default_factory=dict)   # more keys for the json (a volume slice: case, spacing_mm)
    labels: bool = False        # mask holds class ids (pack --classes, K > 2): stored as they are
    fold: int | None = None     # cross-validation fold of its group (pack --folds); None: no folds


def safe_key(text: str) -> str:
    """A `__key__` that webdataset and DALI both accept: ASCII, no spaces, no dots."""
    key = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return key or "sample"


def encode_image(image: np.ndarray, codec: str, jpeg_quality: int = 95) -> bytes:
    if codec == "raw":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
        return buf.getvalue()
    pil = _to_pil(image)
    buf = io.BytesIO()
    if codec == "png":
        pil.save(buf, format="PNG", compress_level=6)
    elif codec == "jp2":
        pil.save(buf, format="JPEG2000", irreversible=False)
    elif codec == "jpeg":
        if image.dtype != np.uint8:
            raise ShardError("--codec jpeg needs 8-bit images; use png, jp2 or raw for 16-bit data")
        pil.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        raise ShardError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return buf.getvalue()


def _to_pil(image: np.ndarray) -> Image.Image:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype == np.uint16:
        if image.ndim != 2:
            raise ShardError("16-bit multi-channel images can only be stored with --codec raw")
        return Image.fromarray(np.ascontiguousarray(image))   # mode I;16 (Pillow >= 10 infers it)
    if image.dtype != np.uint8:
        raise ShardError(f"images must be uint8 or uint16, got {image.dtype}; use --codec raw")
    return Image.fromarray(image)


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Any non-zero pixel (in any channel) is tumour -> uint8 {0,255}, one channel."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    return np.where(mask != 0, 255, 0).astype(np.uint8)


def encode_mask(mask: np.ndarray, labels: bool = False) -> bytes:
    """The mask member: 0/255 (binary), or with `labels` the class ids as an 8-bit label PNG."""
    if labels:
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.dtype != np.uint8:
            raise ShardError(f"a label mask must be H×W uint8 class ids, got {mask.dtype} {mask.shape}")
    else:
        mask = binarize_mask(mask)
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def label_classes(manifest: dict) -> list[str] | None:
    """The class names (by id) of a dataset packed with label masks (`pack --classes`, K > 2
    classes), else None: its masks are binary."""
    c = manifest.get("classes") or {}
    return list(c["names"]) if c.get("mask") == "label" else None


def sample_members(s: Sample, codec: str, jpeg_quality: int = 95,
                   image_bytes: bytes | None = None) -> list[tuple[str, bytes]]:
    """The three tar members of one sample, in a fixed order."""
    if not _KEY_OK.match(s.key):
        raise ShardError(f"sample key {s.key!r} from {s.source} is not safe ASCII; use safe_key()")
    img_hw = s.image.shape[:2]
    if tuple(s.mask.shape[:2]) != tuple(img_hw):
        raise ShardError(f"mask {', '.join(s.mask_sources) or '?'} is {s.mask.shape[1]}×{s.mask.shape[0]} "
                         f"but image {s.source} is {img_hw[1]}×{img_hw[0]}: fix or remove this pair")
    meta = {"source": s.source, "mask_sources": list(s.mask_sources), "group": s.group,
            "height": int(img_hw[0]), "width": int(img_hw[1]),
            "channels": 1 if s.image.ndim == 2 else int(s.image.shape[2]), "dataset": s.dataset, **s.meta}
    if image_bytes is None:
        image_bytes = encode_image(s.image, codec, jpeg_quality)
    return [(f"{s.key}.{IMAGE_EXT[codec]}", image_bytes),
            (f"{s.key}.mask.png", encode_mask(s.mask, s.labels)),
            (f"{s.key}.json", json.dumps(meta, sort_keys=True).encode())]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so that the same input gives byte-identical shards.
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.uid, ti.gid = size, 0o644, 0, 0, 0
    ti.uname = ti.gname = ""
    return ti


def write_dali_index(tar_path: Path) -> Path:
    """Write DALI's webdataset index next to the tar: format v1.2, the same bytes as DALI's own
    `wds2idx` tool (a test compares them), without shelling out to `tar` twice per shard."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = Path(m.name).name
            key, _, ext = base.partition(".")
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append((ext, m.offset_data, m.size, m.name))
    lines = [f"v1.2 {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) for comps in samples]
    idx = tar_path.with_suffix(".idx")
    idx.write_text("\n".join(lines) + "\n")
    return idx


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Rolls `{split}-{index:06d}.tar` files of about `shard_size` bytes each."""

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        self.out_dir, self.split, self.shard_size = Path(out_dir), split, shard_size
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._bytes = 0
        self._count = 0

    def _open(self) -> None:
        self._path = self.out_dir / f"{self.split}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)
        self._bytes = self._count = 0

    def write(self, members: list[tuple[str, bytes]]) -> None:
        size = sum(len(b) for _, b in members)
        if self._tar is not None and self._count and self._bytes + size > self.shard_size:
            self._finish()
        if self._tar is None:
            self._open()
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self._bytes += size
        self._count += 1

    def _finish(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        with open(self._path, "rb+") as f:
            os.fsync(f.fileno())
        write_dali_index(self._path)
        self.shards.append({"name": self._path.name, "samples": self._count,
                            "bytes": self._path.stat().st_size, "sha256": sha256_file(self._path)})
        self._tar = None

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards


def assign_splits(groups: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Map each group to train/val/test so that no group spans two splits.

    Groups are shuffled with `seed` and cut by cumulative sample count, which keeps every
    split within one group of the requested fraction; deterministic for a given input."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ShardError(f"--split must be three non-negative fractions summing to 1, got {fractions}")
    counts: dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    order = sorted(counts)
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    total = sum(counts.values())
    bounds = np.cumsum(fractions) * total
    out, seen = {}, 0
    for g in order:
        centre = seen + counts[g] / 2
        out[g] = SPLITS[min(int(np.searchsorted(bounds, centre, side="right")), 2)]
        seen += counts[g]
    _fill_empty_splits(out, order, counts, fractions, total)
    return out


def _fill_empty_splits(out: dict[str, str], order: list[str], counts: dict[str, int],
                       fractions, total: int) -> None:
    """A split asked for (fraction > 0) but left without a group, as happens with few patients
    (3 LGG cases at 0.7/0.2/0.1), gets one group from the split most over its target, so that
    validation and test always exist when there are enough groups to go round."""
    wanted = [sp for sp, f in zip(SPLITS, fractions) if f > 0]
    if len(order) < len(wanted):
        return
    for sp in wanted:
        members = {s: [g for g in order if out[g] == s] for s in SPLITS}
        if members[sp]:
            continue
        excess = {s: sum(counts[g] for g in members[s]) - f * total
                  for s, f in zip(SPLITS, fractions) if len(members[s]) > 1}
        donor = max(excess, key=excess.get)
        smallest = min(members[donor][::-1], key=lambda g: counts[g])  # stay near the fractions
        out[smallest] = sp


# ---------------------------------------------------------------- cross-validation folds

def assign_folds(groups: list[str], k: int, seed: int) -> dict[str, int]:
    """Map each group (patient) to one of `k` folds, balanced by sample count.

    Groups are shuffled with `seed`, then taken largest first (a stable sort, so equal sizes
    keep the shuffled order) and each goes to the fold with the fewest samples so far (the
    lowest-numbered on a tie): the longest-processing-time rule, which keeps every fold within
    one group's size of the others. Deterministic for a given input; a group is in one fold."""
    counts: dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    if k < 2:
        raise ShardError(f"--folds {k}: cross-validation needs at least 2 folds")
    if len(counts) < k:
        raise ShardError(f"--folds {k} needs at least {k} groups (patients) outside the test split, "
                         f"there are {len(counts)}; use fewer folds or a smaller test fraction in --split")
    order = sorted(counts)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda g: -counts[g])
    totals = [0] * k
    out = {}
    for g in order:
        f = min(range(k), key=lambda i: (totals[i], i))
        out[g] = f
        totals[f] += counts[g]
    return out


def shard_prefix(split: str, fold: int | None) -> str:
    """`train-000000.tar`, or a fold's own `train-fold2-000000.tar`."""
    return split if fold is None else f"{split}-fold{fold}"


def count_folds(manifest: dict) -> None:
    """manifest["folds"]["samples"]: each fold's samples, from its shards (after a pack, and
    again after a Slurm merge)."""
    folds = manifest["folds"]
    per = [0] * folds["count"]
    for sh in manifest["splits"]["train"]["shards"]:
        per[sh["fold"]] += sh["samples"]
    folds["samples"] = per


def fold_split(split: str, fold: int | None) -> str:
    """The split name a loader reads for `split` under `train --fold K`: `train:fold2` (the
    train shards of every other fold), `val:fold2` (fold 2's own); test (and any split without
    a fold) as it is."""
    return split if fold is None or split not in ("train", "val") else f"{split}:fold{fold}"


def check_fold(manifest: dict, fold: int | None, shard_dir: Path, training: bool = False) -> None:
    """A fold that this dataset has, or a one-line error naming the fix. `training`: a dataset
    packed with folds has no val split of its own, so a fold must be chosen."""
    folds = manifest.get("folds")
    if fold is None:
        if training and folds:
            raise ShardError(f"{shard_dir} was packed with --folds {folds['count']}: its validation data "
                             f"are the folds; pass --fold 0 to {folds['count'] - 1} (or re-pack without --folds)")
        return
    if not folds and manifest.get("format") == "synthetic":
        raise ShardError(f"--fold {fold}: {shard_dir} is a synthetic set, which has no folds; pack a "
                         f"dataset with --folds K to train on its folds")
    if not folds:
        raise ShardError(f"--fold {fold}: {shard_dir} was packed without folds; re-pack it with "
                         f"--folds K: {repack_command(Path(shard_dir), manifest, '--folds 5')}")
    if not 0 <= fold < folds["count"]:
        raise ShardError(f"--fold {fold}: {shard_dir} has {folds['count']} folds, "
                         f"--fold 0 to {folds['count'] - 1}")


def split_shards(manifest: dict, split: str, shard_dir: Path) -> list[dict]:
    """The manifest's shard entries of a split or of a fold selection (`fold_split`)."""
    name, _, fold = split.partition(":fold")
    if name not in manifest["splits"]:
        raise ShardError(f"{shard_dir}/{MANIFEST} has no split {name!r}")
    if not fold:
        return manifest["splits"][name]["shards"]
    k = int(fold)
    check_fold(manifest, k, shard_dir)
    return [sh for sh in manifest["splits"]["train"]["shards"] if (sh["fold"] == k) == (name == "val")]


@dataclass
class EncodedSample:
    """A sample after encoding: its tar members plus what the manifest needs. Small and
    picklable, so worker processes can encode and the writer only writes (see `encode_sample`)."""

    key: str
    split: str | None
    source: str
    members: list[tuple[str, bytes]]
    height: int
    width: int
    positive: bool
    pixel_sum: np.ndarray       # per channel, in [0, 1] units
    pixel_sq: np.ndarray
    extra: dict = field(default_factory=dict)   # importer notes (e.g. non-binary mask sources)
    fold: int | None = None     # cross-validation fold (pack --folds): its own train shards


def pixel_sums(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = image.astype(np.float64)
    img = img[:, :, None] if img.ndim == 2 else img
    img /= 65535.0 if image.dtype == np.uint16 else 255.0
    return img.sum(axis=(0, 1)), (img * img).sum(axis=(0, 1))


def encode_sample(s: Sample, codec: str, jpeg_quality: int = 95,
                  image_bytes: bytes | None = None) -> EncodedSample:
    """Encode one sample. `image_bytes` replaces the encoded image (a JPEG input kept as it is
    under `--codec jpeg`)."""
    members = sample_members(s, codec, jpeg_quality, image_bytes=image_bytes)
    ps, pq = pixel_sums(s.image)
    return EncodedSample(s.key, s.split, s.source, members, int(s.image.shape[0]), int(s.image.shape[1]),
                         bool(np.any(s.mask)), ps, pq, fold=s.fold)


@dataclass
class SplitStats:
    samples: int = 0
    positive_samples: int = 0
    pixel_sum: np.ndarray | None = None
    pixel_sq: np.ndarray | None = None
    pixels: int = 0

    def add(self, e: EncodedSample, is_train: bool) -> None:
        self.samples += 1
        self.positive_samples += int(e.positive)
        if is_train:
            self.add_pixels(e.pixel_sum, e.pixel_sq, e.height * e.width)

    def add_pixels(self, ps: np.ndarray, pq: np.ndarray, n: int) -> None:
        ps, pq = np.asarray(ps, dtype=np.float64), np.asarray(pq, dtype=np.float64)
        if self.pixel_sum is None:
            self.pixel_sum, self.pixel_sq = np.zeros_like(ps), np.zeros_like(pq)
        elif self.pixel_sum.shape != ps.shape:   # mixed channel counts: one grey channel
            ps, pq = ps.mean(keepdims=True), pq.mean(keepdims=True)
            self.pixel_sum = self.pixel_sum.mean(keepdims=True)
            self.pixel_sq = self.pixel_sq.mean(keepdims=True)
        self.pixel_sum = self.pixel_sum + ps
        self.pixel_sq = self.pixel_sq + pq
        self.pixels += n

    def mean_std(self) -> tuple[list[float], list[float]]:
        if not self.pixels:
            return [0.5], [0.25]
        mean = self.pixel_sum / self.pixels
        std = np.sqrt(np.maximum(self.pixel_sq / self.pixels - mean ** 2, 1e-12))
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def _remove_stale_staging(out: Path) -> None:
    """Staging dirs of runs that were killed (SIGKILL, power loss) and whose process is gone."""
    for d in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def output_is_complete(out: Path) -> bool:
    return (Path(out) / MANIFEST).is_file()


def check_output(out: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """Before any work: the existing manifest if `out` is already complete with the same
    fingerprint (nothing to do), None if we may write; an error naming the fix otherwise."""
    out = Path(out)
    if output_is_complete(out):
        old = read_manifest(out)
        if old.get("fingerprint") == fingerprint and not overwrite:
            return old
        if not overwrite:
            raise ShardError(f"{out} already holds a packed dataset made from other inputs or options; "
                             f"pass --overwrite to replace it or choose another --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShardError(f"{out} exists, is not empty and holds no {MANIFEST}; remove it or choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ShardError(f"cannot write to {out.parent} ({parent} is not a writable folder): "
                         f"choose a writable --out")
    return None


def publish(stage: Path, out: Path) -> None:
    """Move a complete staging dir into place; an old output is replaced only after that works.

    Ctrl-C/SIGTERM are held back until it is done (then delivered, not lost), so a stop signal
    cannot leave the old output in its trash folder or land between the two renames."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            try:
                stage.rename(out)
            except BaseException:
                trash.rename(out)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            stage.rename(out)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def disk_error(e: OSError, where: Path) -> ShardError:
    if e.errno in FULL_DISK:
        return ShardError(f"{FULL_DISK[e.errno]} while writing {where}{free_space(where)}: free space or "
                          f"choose another --out (nothing was left behind)")
    return ShardError(f"cannot write {where} ({e.strerror or e}): choose a writable --out "
                      f"(nothing was left behind)")


def write_dataset(samples: Iterable[Sample | EncodedSample], out: Path, *, fmt: str, input_root: str,
                  codec: str = "png", shard_size: int = 256 << 20, fingerprint: str = "",
                  extra: dict | None = None, skipped: list[dict] | None = None,
                  jpeg_quality: int = 95, overwrite: bool = False,
                  progress=None) -> dict:
    """Write samples (split already set on each) to `out` atomically and return the manifest.

    `samples` may be `Sample`s (encoded here) or `EncodedSample`s (encoded by workers).
    `fingerprint` identifies the inputs and options; a complete output with the same
    fingerprint is left as it is (the manifest is returned), a different one needs
    `overwrite=True`. `skipped` is read after the last sample, so an importer may append to it
    while the samples are produced. Any exception (Ctrl-C included) removes the staging dir."""
    out = Path(out)
    if codec not in CODECS:
        raise ShardError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    old = check_output(out, fingerprint, overwrite)
    if old is not None:
        return old
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, out.parent) from e
    _remove_stale_staging(out)
    stage = _staging_dir(out)
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
        writers: dict[tuple[str, int | None], ShardWriter] = {}
        stats = {sp: SplitStats() for sp in SPLITS}
        sizes: dict[str, int] = {}
        for s in samples:
            if s.split not in SPLITS:
                raise ShardError(f"sample {s.source} has no split (got {s.split!r})")
            e = s if isinstance(s, EncodedSample) else encode_sample(s, codec, jpeg_quality)
            w = (s.split, e.fold)
            if w not in writers:
                writers[w] = ShardWriter(stage, shard_prefix(*w), shard_size)
            writers[w].write(e.members)
            stats[s.split].add(e, s.split == "train")
            hw = f"{e.width}x{e.height}"
            sizes[hw] = sizes.get(hw, 0) + 1
            if progress is not None:
                progress(s)
        splits = {}
        for sp in SPLITS:
            shards = [{**sh, **({} if f is None else {"fold": f})}
                      for (wsp, f), wr in sorted(writers.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1))
                      if wsp == sp for sh in wr.close()]
            splits[sp] = {"samples": stats[sp].samples, "positive_samples": stats[sp].positive_samples,
                          "shards": shards}
        tr = stats["train"]
        mean, std = tr.mean_std()
        from .. import __version__
        manifest = {
            "manifest_version": MANIFEST_VERSION, "format": fmt, "input_root": input_root,
            "codec": codec, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "package_version": __version__, "fingerprint": fingerprint, "splits": splits,
            "skipped": list(skipped or []), "mean": mean, "std": std,
            "train_pixel_stats": {"pixels": tr.pixels,
                                  "sum": [float(v) for v in (tr.pixel_sum if tr.pixels else [])],
                                  "sum_sq": [float(v) for v in (tr.pixel_sq if tr.pixels else [])]},
            "size_histogram": dict(sorted(sizes.items())), **(extra or {}),
        }
        if "folds" in manifest:
            count_folds(manifest)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        publish(stage, out)
        return manifest
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise disk_error(e, out) from e
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def read_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: {shard_dir} is not a packed dataset. "
                         f"Create it with `python -m tumorseg_dist.pack INPUT --out {shard_dir}`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); re-run pack with --overwrite") from e


def shard_paths(shard_dir: Path, split: str, manifest: dict | None = None) -> list[Path]:
    """The split's tar files, checked to exist (a missing one names the fix)."""
    manifest = manifest or read_manifest(shard_dir)
    paths = []
    for sh in split_shards(manifest, split, shard_dir):
        p = Path(shard_dir) / sh["name"]
        if not p.is_file():
            raise ShardError(f"{p} is listed in {MANIFEST} but missing: copy the dataset again if it was "
                             f"copied, or rebuild it: {repack_command(Path(shard_dir), manifest)}")
        paths.append(p)
    return paths



def repack_command(shard_dir: Path, manifest: dict, more: str = "") -> str:
    """The command that rebuilds `shard_dir` from its inputs (printed with a corrupt shard);
    `more`: flags to add (e.g. `--folds 5`)."""
    if manifest.get("format") == "synthetic":
        s = manifest.get("synthetic", {})
        return (f"python -m tumorseg_dist.pack --format synthetic --out {shard_dir} --samples {s.get('samples')} "
                f"--size {s.get('size')} --seed {s.get('seed')} --overwrite")
    return (f"python -m tumorseg_dist.pack {manifest.get('input_root', 'INPUT')} --out {shard_dir} "
            f"--codec {manifest.get('codec', 'png')}{' ' + more if more else ''} --overwrite (with the other "
            f"options it was packed "
            f"with; see {shard_dir / MANIFEST})")


# ---------------------------------------------------------------- reading by offset

@dataclass(frozen=True)
class SampleRef:
    shard: int
    members: tuple[tuple[str, int, int], ...]   # (ext, offset, size)
    key: str


def read_index(tar: Path) -> list[SampleRef]:
    """A shard's samples from its DALI `.idx` file (the index both loaders read by)."""
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


class IndexedShards:
    """Map-style view of a split's tars: sample i -> its raw members (`read_member`) or, decoded,
    a `ShardSample` (`read_sample`, also `shards[i]`). Picklable into DataLoader workers.

    The sample list comes from the `.idx` files (checked against the tar sizes first, so a
    truncated shard is one line before anything opens it); the bytes come from wids' indexed tar
    reader (`wids.wids.IndexedTarSamples`, memory-mapped), opened lazily, one per shard and
    process. Why not `wids.ShardListDataset`: see docs/loader.md."""

    def __init__(self, tars: list[Path], labels: bool = False):
        self.tars = tars
        self.labels = labels   # masks are class ids (label_classes), not 0/255
        self.refs: list[SampleRef] = []
        self._first: list[int] = []        # index of each shard's first sample in `refs`
        for si, t in enumerate(tars):
            self._first.append(len(self.refs))
            self.refs += [SampleRef(si, r.members, r.key) for r in read_index(t)]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def _shard(self, si: int):
        shard = self._open.get(si)
        if shard is None:
            from wids.wids import IndexedTarSamples
            tar = self.tars[si]
            try:
                shard = IndexedTarSamples(path=str(tar))
            except Exception as e:   # a header that does not parse: the tar itself is damaged
                raise ShardError(f"{tar} is not a readable tar ({type(e).__name__}: {e}); "
                                 f"re-pack: {_repack_hint(tar)}") from e
            n = (self._first[si + 1] if si + 1 < len(self._first) else len(self.refs)) - self._first[si]
            if len(shard) != n:
                raise ShardError(f"{tar} holds {len(shard)} samples but its .idx lists {n}; "
                                 f"re-pack: {_repack_hint(tar)}")
            self._open[si] = shard
        return shard

    def read_member(self, i: int) -> dict[str, bytes]:
        ref = self.refs[i]
        sample = self._shard(ref.shard)[i - self._first[ref.shard]]
        if sample["__key__"] != ref.key:
            tar = self.tars[ref.shard]
            raise ShardError(f"{tar}: sample {i - self._first[ref.shard]} is {sample['__key__']!r} in the tar "
                             f"but {ref.key!r} in its .idx; re-pack: {_repack_hint(tar)}")
        # wids keys members by ".ext"; ours (and DALI's .idx) by "ext".
        return {ext[1:]: data.getvalue() for ext, data in sample.items() if ext != "__key__"}

    def __getitem__(self, i: int) -> ShardSample:
        return read_sample(self, i)

    def __getstate__(self):
        # Memory maps do not cross process boundaries; each worker opens its own.
        return {**self.__dict__, "_open": {}}


@dataclass(frozen=True)
class ShardSample:
    """One decoded sample, as every reader of shards sees it (torch loader, evaluate, predict, export)."""

    key: str
    image: np.ndarray   # H×W×C float32 in [0, 1] (16-bit scaled by 65535)
    mask: np.ndarray    # H×W float32 {0, 1}, or class ids for label masks
    meta: dict          # the sample's json member ({} if it has none)


def read_sample(shards: IndexedShards, i: int) -> ShardSample:
    """Sample i of `shards`: finds its image member, decodes image, mask and json.

    A member that does not decode (bit rot, a partial copy, an edited tar) is a ShardError
    naming the shard, the sample and the command that rebuilds the shards, never a decoder's
    traceback."""
    ref = shards.refs[i]
    tar = shards.tars[ref.shard]
    members = shards.read_member(i)
    img_ext = next((e for e in members if e.startswith("image.")), None)
    if img_ext is None or "mask.png" not in members:
        raise ShardError(f"sample {ref.key} in {tar} lacks image or mask; re-pack: {_repack_hint(tar)}")
    decoders = ((img_ext, lambda b: decode_image(b, img_ext)),
                ("mask.png", lambda b: decode_mask(b, getattr(shards, "labels", False))),
                ("json", lambda b: json.loads(b) if b else {}))
    out = {}
    for ext, decode in decoders:
        try:
            out[ext] = decode(members.get(ext, b""))
        except Exception as e:   # whatever the decoder raises, the cause is the bytes in the shard
            raise ShardError(f"{tar}: sample {ref.key}: its {ext} member does not decode ({type(e).__name__}: "
                             f"{e}); the shard is damaged, re-pack: {_repack_hint(tar)}") from e
    return ShardSample(ref.key, out[img_ext], out["mask.png"], out["json"])


def _repack_hint(tar: Path) -> str:
    shard_dir = tar.parent
    try:
        manifest = read_manifest(shard_dir)
    except ShardError:
        manifest = {}
    return repack_command(shard_dir, manifest)


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


def decode_mask(data: bytes, labels: bool = False) -> np.ndarray:
    """H×W float32: {0, 1} (any non-zero pixel), or with `labels` the class ids as they are."""
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr.astype(np.float32) if labels else (arr > 0).astype(np.float32)
