"""``sfrik-scale profile-memory`` and ``sfrik-scale plan``.

    # the paper's table, simulated (no GPU needed), next to the published figures
    sfrik-scale profile-memory --simulate --preset paper
    # this project's trainer at ZeRO 0-3 in bf16, simulated for 8 GPUs
    sfrik-scale profile-memory --simulate --preset trainer
    # memory against q, SFRIK and VICReg (table + log-log plot)
    sfrik-scale profile-memory --simulate --preset scaling
    # measured: a few real steps of the trainer per configuration, each in a fresh process
    sfrik-scale profile-memory --methods sfrik vicreg --batch-sizes 256 512 --q 8192 --zero-stages 0 2 \\
        --precisions bf16 --world-size 8 --steps 3
    # the largest per-GPU batch for a 40 GB GPU
    sfrik-scale plan --memory-gb 40 --q 32768 --world-size 8 --zero-stage 2 --precision bf16

Outputs of profile-memory (``--out``, default runs/memory): results.json, memory.csv,
memory.md, memory.png (and scaling.md / scaling.png for the scaling preset).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from ..helptext import plain

#: what each preset sweeps (simulated unless --measure-able axes are given)
PRESETS = {
    "paper": dict(methods=["vicreg", "sfrik"], batch_sizes=[256, 512, 1024], q=[32768], implementation="paper",
                  zero_stages=[0], precisions=["fp16"]),
    "trainer": dict(methods=["vicreg", "sfrik"], batch_sizes=[256, 512, 1024], q=[32768], implementation="trainer",
                    zero_stages=[0, 1, 2, 3], precisions=["bf16"]),
    "scaling": dict(methods=["vicreg", "sfrik"], batch_sizes=[256],
                    q=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], implementation="paper",
                    zero_stages=[0], precisions=["fp16"]),
}


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("profile-memory", help="per-GPU memory tables: measured runs or --simulate",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--simulate", action="store_true",
                   help="predict with the simulator (fake tensors; no GPU, seconds per configuration) "
                        "instead of training each configuration for a few steps")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper: the paper's table (simulated, its implementation); trainer: ZeRO 0-3 bf16; "
                        "scaling: q from 1024 to 131072. Explicit options below override a preset's axes")
    p.add_argument("--methods", nargs="+", default=None, help="losses (default: vicreg sfrik)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="GLOBAL batch sizes (default: 256)")
    p.add_argument("--q", nargs="+", type=int, default=None, help="embedding widths (default: 32768)")
    p.add_argument("--zero-stages", nargs="+", type=int, choices=[0, 1, 2, 3], default=None, help="default: 0")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16")
    p.add_argument("--implementation", choices=["trainer", "paper"], default=None,
                   help="trainer (this project; default) or paper (official code: DDP, fp16 autocast, gathered "
                        "losses; simulate only)")
    p.add_argument("--world-size", type=int, default=None,
                   help="GPUs (ranks); default 8 when simulating, 1 when measuring")
    p.add_argument("--backbone", default="resnet50",
                   help="a sfrik_scale.models backbone or torchvision classifier name (default resnet50)")
    p.add_argument("--hidden", default="8192-8192", help="projector widths before q (default 8192-8192)")
    p.add_argument("--image-size", type=int, default=224, help="side of the square crops in pixels (default 224)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="simulate: the allocator to model (cuda: 512-byte blocks; cpu: exact bytes)")
    p.add_argument("--reduce-bucket-size", type=int, default=None,
                   help="DeepSpeed's zero_optimization.reduce_bucket_size in elements for the trainer (measured: "
                        "passed as deepspeed.extra; default: DeepSpeed's 5e8)")
    p.add_argument("--batchnorm-low-precision", action="store_true",
                   help="simulate the trainer with BatchNorm in bf16/fp16 instead of its fp32 BatchNorm (what-if)")
    p.add_argument("--steps", type=int, default=3, help="measured: optimiser steps per configuration (>= 2)")
    p.add_argument("--config", default=None,
                   help="measured: base recipe or YAML for every run (default: the built-in synthetic data)")
    p.add_argument("--timeout", type=float, default=1800.0, help="measured: seconds per configuration")
    p.add_argument("--keep-checkpoints", action="store_true", help="measured: keep the runs' final checkpoints")
    p.add_argument("--out", default="runs/memory", help="output directory")
    p.add_argument("overrides", nargs="*", help="measured: dotted config overrides passed to every run")
    p.set_defaults(handler=main_profile_memory)

    q = subparsers.add_parser("plan", help="largest per-GPU batch that fits a GPU, with the memory breakdown",
                              description=(
                                  "The largest per-GPU batch whose simulated steady-state peak fits --memory-gb, "
                                  "found by doubling then bisecting with the simulator (no GPU needed), and the "
                                  "memory breakdown at that batch: parameters, gradients, optimizer state, "
                                  "activations, loss workspace, step temporaries."))
    q.add_argument("--memory-gb", type=float, required=True, help="GPU memory budget, GB of 10^9 bytes "
                   "(leave room for the CUDA context and cuDNN/NCCL workspaces: e.g. 0.9 x the card)")
    q.add_argument("--config", default=None,
                   help="start from this recipe/YAML (model, loss, ZeRO stage, precision, buckets); the options "
                        "below override it")
    q.add_argument("overrides", nargs="*", help="dotted overrides of --config")
    q.add_argument("--method", default=None, help="loss (default sfrik)")
    q.add_argument("--backbone", default=None, help="default resnet50")
    q.add_argument("--projector", default=None, help="full spec (default: 8192-8192-<q>)")
    q.add_argument("--q", type=int, default=None, help="embedding width (default 32768)")
    q.add_argument("--world-size", type=int, default=8,
                   help="data-parallel GPUs; the plan is per GPU, at a global batch of world size x per-GPU batch "
                        "(default 8)")
    q.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="default 2")
    q.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default bf16")
    q.add_argument("--implementation", choices=["trainer", "paper"], default="trainer",
                   help="trainer (this project, default) or paper (the official code: DDP, fp16 autocast)")
    q.add_argument("--image-size", type=int, default=None, help="default 224")
    q.add_argument("--reduce-bucket-size", type=int, default=None,
                   help="DeepSpeed's zero_optimization.reduce_bucket_size (default: DeepSpeed's 5e8 elements)")
    q.add_argument("--multiple", type=int, default=1, help="only per-GPU batches that are multiples of this")
    q.add_argument("--max-batch", type=int, default=1 << 14, help="largest per-GPU batch considered")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.set_defaults(handler=main_plan)


# ------------------------------------------------------------------------------ profile-memory
def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)  # logs and pipes: wide tables


def _axes(args: argparse.Namespace) -> dict:
    preset = dict(PRESETS.get(args.preset, {}))
    defaults = dict(methods=["vicreg", "sfrik"], batch_sizes=[256], q=[32768], implementation="trainer",
                    zero_stages=[0], precisions=["bf16"])
    axes = {k: getattr(args, k) if getattr(args, k) is not None else preset.get(k, v) for k, v in defaults.items()}
    return axes


def main_profile_memory(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from .sweep import measure, simulate_sweep, sweep_points

    console = _console()
    axes = _axes(args)
    simulate = args.simulate or axes["implementation"] == "paper"
    if axes["implementation"] == "paper" and not args.simulate:
        console.print("[yellow]the paper's implementation can only be simulated: --simulate implied")
    world = args.world_size or (8 if simulate else 1)
    if world < 1:
        raise ValueError(f"--world-size must be >= 1, got {world}")
    for flag, values, least in (("--batch-sizes", axes["batch_sizes"], 1), ("--q", axes["q"], 2)):
        low = [v for v in values if v < least]
        if low:
            raise ValueError(f"{flag} must be >= {least}, got {' '.join(map(str, low))}")
    bad = [b for b in axes["batch_sizes"] if b % world]
    if bad:
        raise ValueError(f"--batch-sizes are global: {bad} not divisible by --world-size {world}")
    points = sweep_points(axes["methods"], axes["batch_sizes"], axes["q"], axes["zero_stages"], axes["precisions"],
                          axes["implementation"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"{len(points)} configuration(s), {'simulated' if simulate else 'measured'}, "
                  f"{world} GPU(s), {args.backbone} + {args.hidden}-q -> {out}")

    def progress(point, r):
        value = "error: " + r["error"].splitlines()[0] if r.get("error") else f"{r['peak_bytes'] / 1e9:.2f} GB"
        console.print(f"  {point.name}: {value} ({r['seconds']} s)")

    if simulate:
        results = simulate_sweep(points, args.backbone, args.hidden, world, args.image_size, args.device,
                                 batchnorm_fp32=not args.batchnorm_low_precision,
                                 reduce_bucket_size=args.reduce_bucket_size, progress=progress)
    else:
        if args.steps < 2:
            raise ValueError("--steps must be >= 2 (the first step has no optimizer state yet)")
        overrides = list(args.overrides) + [e for e in extra if "=" in e]
        if args.reduce_bucket_size is not None:
            overrides.append(f"deepspeed.extra.zero_optimization.reduce_bucket_size={args.reduce_bucket_size}")
        results = measure(points, out, args.backbone, args.hidden, world, args.image_size, args.steps, args.config,
                          overrides, args.timeout, args.keep_checkpoints, progress=progress)
    write_outputs(results, out, scaling=args.preset == "scaling" or len(axes["q"]) > 2, console=console)
    return 0 if all(not r.get("error") for r in results) else 1


def write_outputs(results: list[dict], out: Path, scaling: bool = False, console=None) -> dict:
    """results.json, memory.csv, memory.md, memory.png (+ scaling.md/.png); prints the tables."""
    from . import tables

    written = {"json": tables.write_json(results, out / "results.json"),
               "csv": tables.write_csv(results, out / "memory.csv")}
    headers, rows = tables.memory_rows(results)
    md = tables.to_markdown(headers, rows)
    if scaling:
        sh, sr = tables.scaling_rows(results)
        (out / "scaling.md").write_text(tables.to_markdown(sh, sr) + f"\n{tables.INCREMENT_RATIO_NOTE}.\n")
        written["scaling_md"] = out / "scaling.md"
        written["scaling_png"] = tables.plot_scaling(results, out / "scaling.png")
        if console is not None:
            console.print(tables.to_rich(sh, sr, title="peak memory per GPU against q (GB)",
                                         note=tables.INCREMENT_RATIO_NOTE))
    note = tables.notes_for(results)
    (out / "memory.md").write_text(md + (f"\n{note}.\n" if note else ""))
    written["markdown"] = out / "memory.md"
    written["png"] = tables.plot_batches(results, out / "memory.png")
    if console is not None:
        console.print(tables.to_rich(headers, rows, note=tables.notes_for(results)))
        if written["png"] is None:
            console.print("[yellow]matplotlib is not installed: no PNG chart")
        console.print(f"written: {', '.join(str(p) for p in written.values() if p)}")
    return written


# ------------------------------------------------------------------------------ plan
def main_plan(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from rich.table import Table

    from .plan import plan

    if not args.memory_gb > 0:
        raise ValueError(f"--memory-gb must be a positive number of GB, got {args.memory_gb:g}")
    template = _plan_template(args)
    result = plan(args.memory_gb * 1e9, template, multiple=args.multiple, max_batch=args.max_batch)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    console = _console()
    console.print(f"[bold]{template.label(batch=False)}[/], {template.backbone}, projector "
                  f"{template.projector}, {args.memory_gb:g} GB per GPU")
    if result.per_gpu_batch == 0:
        need = result.over.peak_bytes / 1e9 if result.over else float("nan")
        console.print(f"[red]nothing fits: the smallest batch needs {need:.2f} GB per GPU")
        return 1
    est = result.estimate
    console.print(f"largest per-GPU batch: [bold]{result.per_gpu_batch}[/] (global {result.global_batch}); "
                  f"peak {est.peak_bytes / 1e9:.2f} GB in {est.peak_phase}"
                  + (f"; {result.per_gpu_batch + args.multiple} would need {result.over.peak_bytes / 1e9:.2f} GB"
                     if result.over else "") + f" ({result.simulations} simulations)")
    table = Table(title=f"memory per GPU at batch {result.per_gpu_batch} (GB)")
    table.add_column("part")
    table.add_column("at the peak", justify="right")
    table.add_column("largest in the step", justify="right")
    largest = est.grouped("largest")
    for name, value in est.grouped().items():
        table.add_row(name.replace("_", " "), f"{value / 1e9:.3f}", f"{largest.get(name, 0) / 1e9:.3f}")
    table.add_row("[bold]total", f"[bold]{est.peak_bytes / 1e9:.3f}", "")
    console.print(table)
    return 0


def _plan_template(args: argparse.Namespace):
    import dataclasses

    from .simulate import Scenario

    if args.config is not None:
        from ..config import load_config

        cfg = load_config(args.config, list(args.overrides)).validate(args.world_size)
        base = Scenario.from_config(cfg, args.world_size)
    else:
        if args.overrides:
            raise ValueError(f"overrides {' '.join(args.overrides)} need --config")
        base = Scenario(method="sfrik", global_batch=2 * args.world_size, world_size=args.world_size,
                        zero_stage=2, precision="bf16")
    q = args.q or (base.q if args.config is not None else 32768)
    projector = args.projector or (base.projector if args.config is not None and args.q is None
                                   else f"{base.projector.rsplit('-', 1)[0]}-{q}")
    changes = dict(method=args.method, backbone=args.backbone, image_size=args.image_size,
                   zero_stage=args.zero_stage, precision=args.precision)
    changes = {k: v for k, v in changes.items() if v is not None}
    buckets = base.buckets
    if args.reduce_bucket_size is not None:
        buckets = dataclasses.replace(buckets, reduce_bucket_size=args.reduce_bucket_size)
    return dataclasses.replace(base, projector=projector, implementation=args.implementation, buckets=buckets,
                               global_batch=2 * args.world_size, **changes)

