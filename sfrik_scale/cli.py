"""``sfrik-scale``: the command-line entry point.

Each command lives with the code it drives: a module listed in ``COMMAND_MODULES`` defines
``add_commands(subparsers)``, which adds its sub-parsers and sets ``handler=fn(args, extra)``
on each. This module only wires them up, and turns input errors (ValueError and friends)
into one clear line and exit status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

#: modules contributing sub-commands, in help order
COMMAND_MODULES = (
    "sfrik_scale.pretrain",      # pretrain
    "sfrik_scale.checkpoint",    # export
    "sfrik_scale.benchmarks",    # bench loss|...
    "sfrik_scale.eval.cli",      # linear-eval, knn-eval, finetune, svm-eval, report
    "sfrik_scale.profiling.cli",  # profile-memory, plan
)

#: commands that take free-form dotted overrides after their options
_PASS_THROUGH = {"pretrain"}


def one_line(message: object) -> str:
    """The message on one line: control characters a user typed (\\r, \\n, ...) are escaped."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in str(message))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfrik-scale",
        description="DeepSpeed-scaled self-supervised learning with rotation-invariant kernels (SFRIK).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _PASS_THROUGH:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args, extra) or 0)
    except (ValueError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sfrik-scale {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # our own run failures (a peer died, disk full...) carry their story
        if not type(err).__module__.startswith("sfrik_scale"):
            raise
        print(f"sfrik-scale {args.command}: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
