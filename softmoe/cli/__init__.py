"""`softmoe` command line. Each sub-command lives in its own module of this package and
exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int` (and
optionally `prechecks`, functions of `args` run first, so that bad input fails before any
work). Modules are discovered, so adding a command never edits this file.

Errors a user can cause (bad arguments or configs, missing files; see `USER_ERRORS`) become
one line on stderr and exit status 2, for every command; an exception with an `exit_code`
attribute (e.g. `softmoe.train.TrainingDiverged`, 1) gets that status instead."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    from softmoe import __version__

    parser = argparse.ArgumentParser(prog="softmoe", description="Soft Mixtures of Experts for PyTorch.")
    parser.add_argument("--version", action="version", version=f"softmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        for check in getattr(args, "prechecks", ()):
            check(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `softmoe models | head`: the reader went away; silence the flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - re-raised unless it is one of ours to report
        code = 2 if isinstance(e, USER_ERRORS) else getattr(e, "exit_code", None)
        if code is None:
            raise
        print(f"softmoe {args.command}: error: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
