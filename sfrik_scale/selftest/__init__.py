"""``sfrik-scale selftest --gpu``: GPU acceptance in one command.

    sfrik-scale selftest --gpu --quick          # about 3 minutes on one H100/H200
    sfrik-scale selftest --gpu --out DIR        # about 8 minutes

Runs, in this priority order (a run cut short still returns the first results), each part
in a fresh process with its own time box; a part that fails or times out is recorded and
the next one runs:

1. tests           the gpu-marked tests (pytest -m gpu)
2. memory-paper    the paper's step (ResNet-50, 8192-8192-32768, DDP + fp16 autocast, world
                   size 1, per-GPU batches 32/64/128, VICReg and SFRIK as the official code
                   runs them): torch.cuda.max_memory_allocated against the simulator, and
                   the simulator's three assumptions (DDP bucket copy, .grad kept, autocast
                   weight cache) and SyncBatchNorm toggled
3. memory-trainer  this trainer (DeepSpeed ZeRO 0/1/2, bf16 and fp16, q = 32768, world
                   size 1), measured by its profiler against the simulator
4. steps           fp16 (dynamic loss scaling, forced overflows) and bf16 training steps at
                   q = 32768: finite losses, overflow skips counted, the loss scale's moves
5. gram            kernel_mean forward+backward against its GEMM floor (fp32 with TF32 off
                   and on, bf16), and SFRIK against VICReg for a full step at q = 16384
6. dali            DALI "mixed" decoding against torchvision (when DALI is importable)

On a machine without CUDA every part is skipped with one line and the command returns 0.
Results: DIR/selftest.json and DIR/selftest.md (device, torch/CUDA/DeepSpeed/DALI versions,
date, one table per part), rewritten after every part, and DIR/selftest.log (each part's
output tail). DIR defaults to $OUT when set, else ./gpu-validation. It installs nothing:
see scripts/gpu-acceptance and docs/gpu-validation.md.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

from ..helptext import plain
from .runner import BUDGET_S, Part, exit_status, run_parts
from .skips import dali_skip, no_cuda

PARTS = (
    Part("tests", "the gpu-marked tests", "sfrik_scale.selftest.checks:run_gpu_tests", 45, 60, no_cuda),
    Part("memory-paper", "memory of the paper's step, measured against simulated",
         "sfrik_scale.selftest.memory:paper_part", 40, 110, no_cuda),
    Part("memory-trainer", "memory of this trainer (DeepSpeed ZeRO 0/1/2), measured against simulated",
         "sfrik_scale.selftest.memory:trainer_part", 30, 130, no_cuda),
    Part("steps", "fp16 and bf16 training steps at q = 32768",
         "sfrik_scale.selftest.training:steps_part", 35, 60, no_cuda),
    Part("gram", "kernel_mean against its GEMM floor; SFRIK against VICReg steps",
         "sfrik_scale.selftest.gram:gram_part", 50, 90, no_cuda),
    Part("dali", "DALI mixed decoding against torchvision", "sfrik_scale.selftest.checks:dali_part", 30, 60,
         dali_skip),
)


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu-validation")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("selftest", help="GPU acceptance in one command (--gpu): JSON + Markdown report",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="run the GPU acceptance checks (the only selftest so far)")
    p.add_argument("--quick", action="store_true",
                   help=f"smaller grids, budget {BUDGET_S['quick']:.0f} s (default: full, {BUDGET_S['full']:.0f} s)")
    p.add_argument("--out", default=None, help="output folder (default: $OUT if set, else ./gpu-validation)")
    p.add_argument("--parts", default=None,
                   help=f"comma-separated subset of {','.join(x.key for x in PARTS)} (default: all, in that order)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole command (default: by mode)")
    p.add_argument("--part-timeout", type=float, default=None, help="seconds per part, replacing the time boxes")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    if not args.gpu:
        raise ValueError("selftest: choose what to check; --gpu is the only selftest so far")
    parts = select_parts(args.parts)
    out = Path(args.out) if args.out else default_out()
    report = run_parts(parts, out, quick=args.quick, budget=args.budget, part_timeout=args.part_timeout)
    print_summary(report)
    return exit_status(report)  # 0 without CUDA: every part skipped, each with its line


def select_parts(names: Optional[str]) -> tuple[Part, ...]:
    if not names:
        return PARTS
    keys = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [k for k in keys if k not in {p.key for p in PARTS}]
    if unknown:
        raise ValueError(f"--parts: unknown part(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(p.key for p in PARTS)}")
    return tuple(p for p in PARTS if p.key in keys)


def print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["environment"]
    table = Table(title=f"selftest ({report['mode']}) on {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, "
                        f"DeepSpeed {env['deepspeed'] or '-'}, DALI {env['dali'] or '-'}, {env['date']}")
    for col in ("part", "status", "seconds", "note"):
        table.add_column(col, justify="right" if col == "seconds" else "left", overflow="fold")
    for p in report["parts"]:
        table.add_row(p["key"], p["status"], str(p.get("seconds", "")), p.get("note") or "")
    console = Console()
    (console if console.is_terminal else Console(width=160)).print(table)
