"""Shard verification: compare each shard with the sha256 and size its manifest.json records.

`--verify-shards` (train, evaluate):
  quick (default)  size check, then the sha256 from a cache keyed by (path, size, mtime_ns);
                   only shards that are new or changed since the last check are hashed, so a
                   10 TB dataset is hashed once, not at every start.
  full             rehash every shard (bit rot that keeps size and mtime is only caught here).
  off              no check.

Hashing runs in threads (hashlib releases the GIL while it hashes), once per node: local rank
0 hashes, the other ranks wait for it, then every rank learns every node's verdict, so all
ranks fail (or go on) together. The cache lives in a per-user cache dir
($TUMORSEG_CACHE_DIR, else $XDG_CACHE_HOME/tumorseg_dist, else ~/.cache/tumorseg_dist), or
beside the shards when that is not writable. Run it on its own to warm the cache:
`python -m tumorseg_dist.data.verify shards/NAME [--mode full]`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Iterable, Literal

import tyro

from .shards import (MANIFEST, SPLITS, ShardError, read_manifest, repack_command, sha256_file,
                     shard_paths)

MODES = ("full", "quick", "off")
CACHE_VERSION = 1
_LOCAL_CACHE = ".shard-hashes.json"   # beside the shards, when the per-user dir is not writable


@dataclass
class VerifyReport:
    """What one verification did; `hashed` tells a cache hit from a rehash without timing."""

    mode: str
    shards: int = 0
    hashed: list[str] = field(default_factory=list)   # shard names hashed this time
    cached: int = 0                                   # shards whose hash came from the cache
    cache_path: Path | None = None

    def line(self, splits: Iterable[str]) -> str:
        if self.mode == "off":
            return "shards: not verified (--verify-shards off)"
        where = f"cache {self.cache_path}" if self.cache_path else "no writable cache: every start rehashes"
        return (f"shards: {self.shards} of {', '.join(splits)} match manifest.json (--verify-shards {self.mode}: "
                f"hashed {len(self.hashed)}, cached {self.cached}; {where})")


# ---------------------------------------------------------------- cache

def _user_cache_dir() -> Path:
    if os.environ.get("TUMORSEG_CACHE_DIR"):
        return Path(os.environ["TUMORSEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tumorseg_dist"


def cache_path(shard_dir: Path) -> Path | None:
    """Where this dataset's hashes are cached: one file per dataset, so datasets never contend."""
    shard_dir = Path(shard_dir).resolve()
    d = _user_cache_dir() / "shard-hashes"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK | os.X_OK):
            return d / f"{hashlib.sha256(str(shard_dir).encode()).hexdigest()[:24]}.json"
    except OSError:
        pass
    if os.access(shard_dir, os.W_OK | os.X_OK):
        return shard_dir / _LOCAL_CACHE
    return None


def _read_cache(path: Path | None) -> dict[str, list]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}   # a torn or foreign file is only a lost cache: rehash
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    return data.get("entries", {})


def _write_cache(path: Path | None, entries: dict[str, list]) -> None:
    if path is None:
        return
    # Another node may write the same file: merge with what is there and replace atomically, so
    # a race loses at most some entries (rehashed next time), never the file.
    merged = {**_read_cache(path), **entries}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": merged}, indent=0) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)   # a full or read-only cache only costs a rehash next start


# ---------------------------------------------------------------- checking

def _mismatch(shard_dir: Path, manifest: dict, bad: list[str]) -> ShardError:
    more = f"; {len(bad) - 1} more shard(s) differ too" if len(bad) > 1 else ""
    return ShardError(f"{bad[0]}{more}. The shards no longer match what pack wrote (a damaged copy, "
                      f"a disk fault or an edit): re-pack: {repack_command(shard_dir, manifest)}")


def verify_local(shard_dir: Path, splits: Iterable[str], mode: str = "quick", threads: int | None = None,
                 manifest: dict | None = None) -> VerifyReport:
    """Check the splits' shards in this process; raise ShardError naming the first bad shard."""
    if mode not in MODES:
        raise ShardError(f"--verify-shards {mode!r}: choose one of {', '.join(MODES)}")
    report = VerifyReport(mode)
    if mode == "off":
        return report
    shard_dir = Path(shard_dir)
    manifest = manifest or read_manifest(shard_dir)
    todo: list[tuple[Path, dict, os.stat_result]] = []
    bad: list[str] = []
    cpath = cache_path(shard_dir)
    cache = _read_cache(cpath)
    report.cache_path = cpath
    fresh: dict[str, list] = {}
    for split in splits:
        entries = {sh["name"]: sh for sh in manifest["splits"][split]["shards"]} if split in manifest["splits"] else {}
        for path in shard_paths(shard_dir, split, manifest):
            sh = entries[path.name]
            st = path.stat()
            report.shards += 1
            if "bytes" in sh and st.st_size != sh["bytes"]:
                bad.append(f"{path} is {st.st_size} bytes but {MANIFEST} records {sh['bytes']} (truncated or replaced)")
                continue
            key = str(path.resolve())
            hit = cache.get(key)
            if mode == "quick" and hit and hit[:2] == [st.st_size, st.st_mtime_ns] and hit[2] == sh["sha256"]:
                report.cached += 1
                continue
            todo.append((path, sh, st))
    if bad:
        raise _mismatch(shard_dir, manifest, bad)
    if todo:
        n = threads or min(8, len(todo), 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="verify") as pool:
            digests = list(pool.map(lambda t: sha256_file(t[0]), todo))
        for (path, sh, st), digest in zip(todo, digests):
            report.hashed.append(path.name)
            if digest != sh["sha256"]:
                bad.append(f"{path} is corrupt: sha256 {digest} but {MANIFEST} records {sh['sha256']}")
            else:
                fresh[str(path.resolve())] = [st.st_size, st.st_mtime_ns, digest]
        _write_cache(cpath, fresh)   # the good ones, even when another shard is bad
    if bad:
        raise _mismatch(shard_dir, manifest, bad)
    return report


def verify_shards(shard_dir: Path, splits: Iterable[str], mode: str = "quick", dist=None,
                  log: Callable[[str], None] | None = print) -> VerifyReport:
    """`verify_local` once per node (local rank 0), the verdict shared by every rank.

    `dist` is the run's DistInfo (None: one process). Every rank raises the same ShardError if
    any node found a bad shard, so no rank trains on data another rank refused."""
    import torch.distributed as tdist
    splits = list(splits)
    together = tdist.is_available() and tdist.is_initialized()
    verdict: tuple[str, object] | None = None
    if dist is None or dist.local_rank == 0:
        try:
            verdict = ("ok", verify_local(shard_dir, splits, mode))
        except Exception as e:   # any failure must reach the gather, or the other ranks hang
            verdict = ("bad", str(e) if isinstance(e, ShardError) else
                       f"cannot verify the shards of {shard_dir} ({type(e).__name__}: {e})")
    verdicts = [verdict]
    if together:
        verdicts = [None] * tdist.get_world_size()
        tdist.all_gather_object(verdicts, verdict)   # also the barrier the other local ranks wait at
    for v in verdicts:
        if v is not None and v[0] == "bad":
            raise ShardError(v[1])
    report = next((v[1] for v in [verdict, *verdicts] if v is not None), VerifyReport(mode))
    if log is not None and (dist is None or dist.is_main):
        log(report.line(splits))
    return report


@dataclass
class VerifyArgs:
    """Check a packed dataset's shards against manifest.json (and warm the hash cache that
    training's quick check reads)."""

    shards: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="SHARDS")]
    """Packed shard directory."""
    mode: Literal["full", "quick"] = "full"
    split: Annotated[tuple[Literal[SPLITS], ...], tyro.conf.UseAppendAction,  # type: ignore[valid-type]
                     tyro.conf.arg(help_behavior_hint="(default: every split)")] = ()
    """Only this split (repeatable)."""


def main(argv: list[str] | None = None) -> int:
    from .. import cli
    args = cli.parse(VerifyArgs, argv, name="verify", prog="python -m tumorseg_dist.data.verify")

    def run() -> int:
        verify_shards(args.shards, args.split or SPLITS, args.mode)
        return 0
    return cli.guarded("verify", run)


if __name__ == "__main__":
    sys.exit(main())
