"""Slurm array packing: task I of N writes `OUT.parts/part-I/`, then `--merge` joins the parts.

Every task scans the whole input (names only), assigns splits for the whole dataset with the
seed, and packs its contiguous slice of the sorted item list into a complete shard directory of
its own. The merge renumbers the parts' tars in task order (`{split}-{index:06d}.tar`, links
or copies, never moves, so a failed merge leaves the parts intact), sums the counts and the
train pixel sums (exact mean/std), concatenates `skipped`, and publishes OUT atomically.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..data.formats.volumes import merge_summaries
from ..data.formats.classes import merge_records
from ..data.shards import (MANIFEST, SPLITS, ShardError, SplitStats, check_output, count_folds, output_is_complete,
                      publish, read_manifest, sha256_file, shard_prefix)


def parts_root(out: Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.parts"


def part_dir(out: Path, index: int, count: int) -> Path:
    return parts_root(out) / f"part-{index:05d}-of-{count:05d}"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def merge_parts(out: Path, log=print, overwrite: bool = False) -> dict:
    out = Path(out)
    root = parts_root(out)
    parts = sorted(root.glob("part-*-of-*")) if root.is_dir() else []
    if not parts:
        if output_is_complete(out):
            log(f"{out} is already merged; nothing to do")
            return read_manifest(out)
        raise ShardError(f"no parts to merge in {root}: run the array tasks first "
                         f"(python -m tumorseg_dist.pack INPUT --out {out} --task-index I --num-tasks N)")
    count = int(parts[0].name.rsplit("-", 1)[1])
    expected = [part_dir(out, i, count) for i in range(count)]
    missing = [i for i, p in enumerate(expected) if not output_is_complete(p)]
    if missing:
        raise ShardError(f"{len(missing)} of {count} tasks have not finished ({root}: missing "
                         f"{', '.join(map(str, missing[:10]))}); re-run those tasks, e.g. sbatch --array="
                         f"{','.join(map(str, missing[:10]))} slurm/pack.sh ...")
    manifests = [read_manifest(p) for p in expected]
    job = {m.get("job_fingerprint") for m in manifests}
    if len(job) != 1:
        raise ShardError(f"the parts in {root} come from different inputs or options; "
                         f"remove {root} and run all tasks again")
    job_fp = job.pop()
    old = check_output(out, job_fp, overwrite)
    if old is not None:
        log(f"{out} is up to date; nothing to do")
        shutil.rmtree(root, ignore_errors=True)
        return old
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
        splits = {sp: {"samples": 0, "positive_samples": 0, "shards": []} for sp in SPLITS}
        train = SplitStats()
        sizes: dict[str, int] = {}
        skipped, nonbinary, nb_count = [], [], 0
        for part, m in zip(expected, manifests):
            for sp in SPLITS:
                s = m["splits"][sp]
                splits[sp]["samples"] += s["samples"]
                splits[sp]["positive_samples"] += s["positive_samples"]
                for sh in s["shards"]:
                    # a fold's shards keep their own names (train-fold2-000000.tar)
                    n = sum(x.get("fold") == sh.get("fold") for x in splits[sp]["shards"])
                    name = f"{shard_prefix(sp, sh.get('fold'))}-{n:06d}.tar"
                    _link_or_copy(part / sh["name"], stage / name)
                    shutil.copyfile((part / sh["name"]).with_suffix(".idx"), (stage / name).with_suffix(".idx"))
                    if sha256_file(stage / name) != sh["sha256"]:
                        raise ShardError(f"{part / sh['name']} does not match its manifest; re-run task "
                                         f"{m['task']['index']}")
                    splits[sp]["shards"].append({**sh, "name": name})
            st = m["train_pixel_stats"]
            if st["pixels"]:
                train.add_pixels(np.array(st["sum"]), np.array(st["sum_sq"]), st["pixels"])
            for k, v in m["size_histogram"].items():
                sizes[k] = sizes.get(k, 0) + v
            skipped += m["skipped"]
            nb_count += m.get("nonbinary_masks", {}).get("count", 0)
            nonbinary += m.get("nonbinary_masks", {}).get("examples", [])
        mean, std = train.mean_std()
        first = manifests[0]
        manifest = {**{k: v for k, v in first.items() if k != "task"},
                    "fingerprint": job_fp, "splits": splits, "skipped": skipped, "mean": mean, "std": std,
                    "train_pixel_stats": {"pixels": train.pixels,
                                          "sum": [float(v) for v in (train.pixel_sum if train.pixels else [])],
                                          "sum_sq": [float(v) for v in (train.pixel_sq if train.pixels else [])]},
                    "size_histogram": dict(sorted(sizes.items())),
                    "nonbinary_masks": {"count": nb_count, "examples": nonbinary[:50]},
                    "merged_from_tasks": count}
        if "volumes" in first:
            manifest["volumes"] = merge_summaries([m["volumes"] for m in manifests])
        if "classes" in first:   # pack --classes: the per-class counts of every part
            manifest["classes"] = merge_records([m["classes"] for m in manifests])
        if "folds" in first:
            count_folds(manifest)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(root, ignore_errors=True)
    counts = ", ".join(f"{k} {v['samples']}" for k, v in splits.items())
    log(f"merged {count} parts -> {out} ({counts}; skipped {len(skipped)})")
    return manifest
