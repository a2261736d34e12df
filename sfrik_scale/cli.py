"""``sfrik-scale``: the command-line entry point.

Each command lives with the code it drives: a module listed in ``COMMAND_MODULES`` defines
``add_commands(subparsers)``, which adds its sub-parsers and sets ``handler=fn(args, extra)``
on each. This module only wires them up; `sfrik_scale.errors.run_command` turns input errors
into one clear line and exit status 2 (run failures: exit 1) instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sfrik_scale import benchmarks, export, pretrain, selftest
from sfrik_scale.errors import run_command
from sfrik_scale.eval import cli as eval_cli
from sfrik_scale.planning import cli as planning_cli
from sfrik_scale.topology import quiet_cpu_accelerator

#: modules contributing sub-commands, in help order
COMMAND_MODULES = (
    pretrain,       # pretrain
    export,         # export
    benchmarks,     # bench loss|...
    eval_cli,       # linear-eval, knn-eval, finetune, supervised, svm-eval, report
    planning_cli,   # profile-memory, plan
    selftest,       # selftest --gpu
)

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

#: commands that take free-form dotted overrides after their options
_PASS_THROUGH = {"pretrain"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfrik-scale",
        description="DeepSpeed-scaled self-supervised learning with rotation-invariant kernels (SFRIK).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _PASS_THROUGH:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if argv is None and args.command == "pretrain" and args.handler is pretrain.main_pretrain:
        pretrain.hold_stop_signals()  # a process started to pretrain: see sfrik_scale.preemption
    quiet_cpu_accelerator()
    return run_command(args.command, lambda: args.handler(args, extra))

if __name__ == "__main__":
    sys.exit(main())
