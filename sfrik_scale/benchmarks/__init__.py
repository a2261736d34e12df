"""``sfrik-scale bench NAME``: benchmarks that print tables (tests assert correctness, not timings).

Each benchmark is a module of this package with ``add_parser(subparsers)`` (registering its
sub-command) and ``main(args) -> int``; list it in ``BENCHMARKS``.
"""
from __future__ import annotations

import importlib

#: sub-command name -> module (imported lazily: only the chosen benchmark's imports are paid)
BENCHMARKS = {
    "loss": "sfrik_scale.benchmarks.loss",
    "data": "sfrik_scale.benchmarks.data",
    "step": "sfrik_scale.benchmarks.step",
}


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="speed and memory benchmarks (print tables)")
    sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHMARKS.items():
        mod = importlib.import_module(module)
        mod.add_parser(sub).set_defaults(handler=lambda args, extra, mod=mod: mod.main(args))
