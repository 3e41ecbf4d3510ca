"""`python -m tumorseg_dist`: list the commands; `python -m tumorseg_dist CMD [flags]` runs one."""
from __future__ import annotations

import importlib
import sys

from .cli import exit_with
from .commands import COMMANDS, usage


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tumorseg_dist: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    exit_with(main())
