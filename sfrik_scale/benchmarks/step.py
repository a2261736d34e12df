"""``sfrik-scale bench step``: the DeepSpeed trainer's step against a bare PyTorch loop.

Both loops run the same model, loss, LARS optimiser, LR schedule and the same batches,
loaded into memory beforehand so that data loading is not part of either figure. The
trainer side is the real ``Trainer.train_step`` (engine forward, loss in fp32, the agreed
status all-reduce and its host sync, engine backward and step); the bare side is the
textbook loop. One process on this machine's device.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch


def add_parser(sub):
    p = sub.add_parser("step", help="steps/s of the DeepSpeed trainer vs a bare PyTorch loop")
    p.add_argument("--config", default=None, help="recipe or YAML (default: the demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.backbone=resnet18")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repetition")
    p.add_argument("--repeats", type=int, default=3, help="alternating repetitions of both loops")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    return p


def _time_steps(step: Callable[[int], None], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        step(i)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..config import load_config
    from ..losses import build_loss, loss_parameters
    from ..models import build_model
    from ..optim import build_optimizer, build_scheduler, optimizer_options
    from ..topology import init_distributed, resolve_launch_env
    from ..train import Trainer

    resolve_launch_env(os.environ)
    cfg = load_config(args.config, list(args.overrides) + ["monitor.progress=false", "monitor.tensorboard=false",
                                                           "train.resume=false", "train.run_dir=/tmp/sfrik-bench-step"])
    cfg.validate(int(os.environ["WORLD_SIZE"]))
    topo = init_distributed()
    trainer = Trainer(cfg, topo).build()
    n_batches = args.warmup + args.steps
    batches = []
    for view1, view2, _ in trainer.loader:
        batches.append((view1.to(topo.device), view2.to(topo.device)))  # in memory: no loading timed
        if len(batches) == n_batches:
            break
    batches = [batches[i % len(batches)] for i in range(n_batches)]

    # the bare loop: same model, loss, optimiser and schedule, no engine
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.backbone, cfg.model.projector).to(topo.device).train()
    if trainer.input_dtype != torch.float32:  # as the engine: low-precision weights, fp32 BatchNorm
        from ..models import batchnorm_in_fp32

        model = batchnorm_in_fp32(model.to(trainer.input_dtype))
    layout = torch.channels_last if cfg.model.channels_last else torch.preserve_format  # as Trainer.train_step
    batches = [(a.to(trainer.input_dtype, memory_format=layout), b.to(trainer.input_dtype, memory_format=layout))
               for a, b in batches]
    lc = cfg.loss
    loss_fn = build_loss(lc.name, q=model.q, **{k: getattr(lc, k) for k in loss_parameters(lc.name) if hasattr(lc, k)})
    o = cfg.optim
    opt = build_optimizer(o.name, model, lr=cfg.peak_lr, **optimizer_options(o.name, o))  # as the engine
    sched = build_scheduler(opt, o.base_lr, cfg.train.global_batch_size, trainer.steps_per_epoch, cfg.train.epochs,
                            o.warmup_epochs, o.final_lr_ratio)

    def bare(i: int) -> None:
        v1, v2 = batches[i % n_batches]
        loss = loss_fn(model(v1).float(), model(v2).float())["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    def deepspeed_step(i: int) -> None:
        v1, v2 = batches[i % n_batches]
        trainer.train_step(v1, v2)

    for fn in (bare, deepspeed_step):
        _time_steps(fn, args.warmup)
    times: dict[str, list[float]] = {"bare PyTorch loop": [], "DeepSpeed trainer": []}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
        times["bare PyTorch loop"].append(_time_steps(bare, args.steps))
        times["DeepSpeed trainer"].append(_time_steps(deepspeed_step, args.steps))

    batch = cfg.train.global_batch_size
    table = Table(title=f"train step: {cfg.model.backbone} + {cfg.model.projector}, {cfg.loss.name}, batch {batch}, "
                        f"ZeRO {cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}, {topo.device} "
                        f"({torch.get_num_threads()} threads), median of {args.repeats} x {args.steps} steps")
    for col in ("loop", "steps/s", "images/s", "ms/step", "overhead"):
        table.add_column(col, justify="right" if col != "loop" else "left")
    base = statistics.median(times["bare PyTorch loop"])
    for name, ts in times.items():
        t = statistics.median(ts)
        table.add_row(name, f"{args.steps / t:.2f}", f"{args.steps * batch / t:,.0f}", f"{1e3 * t / args.steps:.1f}",
                      f"{100 * (t / base - 1):+.1f}%")
    Console().print(table)
    return 0
