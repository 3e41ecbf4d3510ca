"""How a command writes a file it promises: whole or not at all, and a full disk said once.

Every output (checkpoint, shard, ONNX file, mask, overlay) is written to a temp file beside it
and renamed into place, so a crash, a signal or a full disk never leaves a half file under the
real name. A write that does not fit (no space, quota, file-size limit) is one line naming the
file, what happened and what was kept; `cli.guarded` says the same for any write that no
command caught. This module imports nothing from the package: every layer may use it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

# Out of room, whatever the limit: the filesystem, the user's quota, or `ulimit -f`.
FULL_DISK = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file size limit reached (EFBIG)"}


class OutputError(RuntimeError):
    """An output that could not be written; the message names it and what was kept."""


def full_disk(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT/EFBIG behind `exc`, following its cause and context: libraries wrap it
    (torch.save raises 'enforce fail at inline_container.cc' with the OSError as context)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_DISK:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def free_space(folder: Path) -> str:
    """', 12.3 MiB free' on `folder`'s filesystem, or '' where that cannot be read."""
    try:
        return f", {shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        return ""


def write_error(exc: BaseException, path: Path | None, kept: str, fix: str = "choose another --out") \
        -> OutputError:
    """The one line for a failed write of `path` (None: a library's write that names no file):
    what happened, `kept` (what is still there), then what to do: make room (or raise the
    file-size limit), or `fix`."""
    target = f" writing {path}" if path is not None else ""
    full = full_disk(exc)
    if full is not None and full.errno == errno.EFBIG:
        return OutputError(f"{FULL_DISK[full.errno]}{target}{_file_limit()}: {kept}; raise the limit "
                           f"(ulimit -f) or {fix}")
    if full is not None:
        room = free_space(Path(path).parent) if path is not None else ""
        return OutputError(f"{FULL_DISK[full.errno]}{target}{room}: {kept}; free space or {fix}")
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    return OutputError(f"cannot write {path} ({why}): {kept}; {fix}")


def _file_limit() -> str:
    """', the limit is 1024 KiB': this process's RLIMIT_FSIZE, what `ulimit -f` shows."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return ""
    return "" if soft == resource.RLIM_INFINITY else f", the limit is {soft // 1024} KiB"


TEMP_GLOB = ".*.tmp-*"   # every temp_name: what a killed writer may leave (`.last.pt.tmp-<pid>`)


def temp_name(path: Path, suffix: str = "") -> Path:
    """The hidden temp file beside `path` that `atomic` writes first (`.NAME.tmp-PID`, then
    `suffix` for a writer that picks the format by the name: `.nii.gz`)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic(path: Path, kept: str = "nothing was written", fix: str = "choose another --out",
           suffix: str = "") -> Iterator[Path]:
    """Yield a temp path to write `path`'s content to; on success it is renamed onto `path`. On
    any failure the temp file is removed and `path` is as it was; an OSError (a full disk, a
    read-only folder) becomes one OutputError naming `path` and `kept`. A body that removes the
    temp file (a check of the written file failed) leaves `path` as it was too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)   # before the free space is measured
        raise write_error(e, path, kept, fix) from e
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str, kept: str = "nothing was written") -> None:
    """`text` into `path` through `atomic`: a reader (or a killed run) sees the old file or the
    new one, never half of one."""
    with atomic(path, kept) as tmp:
        tmp.write_text(text)
