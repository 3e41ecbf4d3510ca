"""What every entry point does with a user's mistake: one line naming the problem, exit 2.

Bad input (a missing file, a wrong flag value, an unreadable checkpoint) is not a crash, so
no traceback; set TUMORSEG_DEBUG=1 to get it anyway when reporting a bug.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.shards import ShardError
from .models import ModelError

USER_ERRORS = (ConfigError, ShardError, ModelError, CheckpointError, ValueError, RuntimeError)


def guarded(prog: str, fn: Callable[..., int], *args) -> int:
    try:
        return fn(*args)
    except USER_ERRORS as e:
        if os.environ.get("TUMORSEG_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
