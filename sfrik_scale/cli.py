"""``sfrik-scale``: the command-line entry point and its subcommands.

Each subcommand lives with the code it drives; this module only wires them up, and turns
input errors (ValueError and friends) into a one-line message and exit status 2 instead
of a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_bench_parser

    parser = argparse.ArgumentParser(
        prog="sfrik-scale",
        description="DeepSpeed-scaled self-supervised learning with rotation-invariant kernels (SFRIK).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    try:  # the trainer arrives with issue 3; keep the CLI usable without it
        from .pretrain import add_pretrain_parser
    except ImportError:
        add_pretrain_parser = None
    if add_pretrain_parser is not None:
        add_pretrain_parser(sub)
    export = sub.add_parser("export", help="fp32 backbone and projector weights of a run (any ZeRO stage)")
    export.add_argument("run_dir", help="the pretraining run directory")
    export.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    export.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "pretrain":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "bench":
            from .bench import main_bench
            return main_bench(args)
        if args.command == "export":
            import json

            from .checkpoint import export_run
            print(json.dumps(export_run(args.run_dir, args.out, args.tag), indent=2))
            return 0
        if args.command == "pretrain":
            from .pretrain import main_pretrain
            return main_pretrain(args, extra)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"sfrik-scale {args.command}: error: {err}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
