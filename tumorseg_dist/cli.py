"""How every command reads its flags and reports a user's mistake.

One mechanism for all of them: the options are one typed dataclass, parsed by `parse` with tyro
(field docstrings are the help, every default is shown, `--no-x` turns a boolean off, dashes in
flag names), and a bad flag, a bad value or a bad combination is one line
`NAME: error: ...` with exit status 2, exactly like a bad input file caught by `guarded`.

Bad input (a missing file, a wrong flag value, an unreadable checkpoint) is not a crash, so
no traceback; set TUMORSEG_DEBUG=1 to get it anyway when reporting a bug.

A write that does not fit (disk full, quota, file-size limit) that no command caught is one line
too, naming the file (outputs.py: the commands' own writes say also what was kept).

This module imports only `outputs` from the package, so config.py (train's layered parse) can use it.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Optional, Sequence, TypeVar

import tyro

from .outputs import full_disk, write_error

T = TypeVar("T")

# Every error class of the package derives from one of these (ConfigError, LayoutError,
# PackInputError, ImageFileError from ValueError; ShardError, ModelError, CheckpointError,
# PackAbort, WorkerDied from RuntimeError); tests/test_cli.py checks that each still does.
USER_ERRORS = (ValueError, RuntimeError)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BOX = str.maketrans("", "", "│╭╮╰╯")


def optional(tp: Any, meaning: str) -> Any:
    """The type of a field whose None means something (`--threshold`: the model's): the help
    says `(default: MEANING)` and the flag takes only a TP, never the word None."""
    return Annotated[Optional[tp], tyro.conf.DisallowNone,
                     tyro.conf.arg(help_behavior_hint=f"(default: {meaning})")]


def usage_error(name: str, message: str) -> NoReturn:
    """A flag combination that cannot work: one line, exit 2 (the same as a bad flag)."""
    print(f"{name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _one_line(report: str) -> str | None:
    """The message of tyro's boxed error report, on one line (None if it has no recognisable
    message). The box is made for a terminal; a log or a test wants `NAME: error: ...`."""
    lines = [_ANSI.sub("", ln).translate(_BOX).strip() for ln in report.splitlines()]
    sections: list[list[str]] = [[]]
    for ln in lines[1:]:  # lines[0] is the box's title ("Value error", "Required options")
        if ln and set(ln) <= set("─- "):
            sections.append([])
        elif ln:
            sections[-1].append(ln)
    sections = [sec for sec in sections if sec and not sec[0].startswith("For full helptext")]
    if not sections:
        return None
    parts = [" ".join(sections[0])]
    parts += [" ".join(sec) for sec in sections[1:] if sec[0].startswith("Unrecognized options")]
    message = "; ".join(parts)
    # "Error parsing --split: --split '0.5': ..." when our own parser's message names the flag
    m = re.match(r"Error parsing (\S+): (.*)", message)
    if m and m.group(2).startswith("--"):
        message = m.group(2)
    return re.sub(r"^Missing from .*?: ", "missing ", message)


def parse(cls: Callable[..., T], argv: Sequence[str] | None, *, name: str, prog: str | None = None,
          description: str | None = None, default: Any = None) -> T:
    """Parse argv into cls (a dataclass) the way every command does. `name` starts error
    lines (`pack: error: ...`); `prog` is what --help shows (default `python -m
    tumorseg_dist.NAME`); `default` is an instance whose values the flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or f"python -m tumorseg_dist.{name}"
    kwargs = {} if default is None else {"default": default}

    def run() -> T:
        return tyro.cli(cls, args=argv, prog=prog, description=description,
                        config=(tyro.conf.OmitArgPrefixes, tyro.conf.DisallowNone), **kwargs)

    if any(a in ("-h", "--help") for a in argv):  # help: to stdout, at the terminal's width
        return run()
    report = io.StringIO()
    try:
        with _wide_terminal(), contextlib.redirect_stderr(report):
            return run()
    except SystemExit as e:
        if e.code in (0, None):
            raise
        message = _one_line(report.getvalue())
        if message is None:  # an unfamiliar report: show it as tyro wrote it
            sys.stderr.write(report.getvalue())
            raise
        usage_error(name, f"{message} (see {prog} --help)")


@contextlib.contextmanager
def _wide_terminal():
    """So that tyro does not wrap the message inside its box."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "1000"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


def guarded(prog: str, fn: Callable[..., int], *args) -> int:
    """Run fn; a user's mistake becomes `PROG: error: ...` and exit status 2."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        if os.environ.get("TUMORSEG_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        full = full_disk(e)
        if full is None or os.environ.get("TUMORSEG_DEBUG"):
            raise
        what = write_error(full, Path(full.filename) if full.filename else None,
                           "the files written before it are complete")
        print(f"{prog}: error: {what}", file=sys.stderr)
        return 2


# The status a process ending through `exit_with` ends with; None until then.
exit_status: int | None = None


def exit_with(code: int | None) -> NoReturn:
    """End a command's process with `code` once its work is done, without the interpreter's
    teardown: freeing torch's, smp's and DALI's modules object by object takes 1-3 s per process
    (paid again by every rank of every run), and a finished command has nothing left to free.
    What a normal exit does that matters still happens here, in CPython's order: threading's
    own exit hooks (which stop executors' worker threads: inductor's compile pool) and the join of
    every non-daemon thread (`threading._shutdown`, what the interpreter calls first), then the
    atexit handlers (wandb, multiprocessing's children, torch), then the standard streams.
    Only for `python -m tumorseg_dist.CMD`, whose process this is; `main()` called from Python
    returns as usual. `exit_status` holds the code while the atexit handlers run
    (launch/record_exit.py records it from there)."""
    import atexit
    import threading
    global exit_status
    exit_status = 0 if code is None else code if isinstance(code, int) else 1
    threading._shutdown()   # a bare join of the threads would wait forever on an executor's workers
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):   # a closed or broken pipe: nothing left to say
            stream.flush()
    os._exit(exit_status)
