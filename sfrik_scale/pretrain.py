"""Entry point: ``sfrik-scale pretrain`` and ``python -m sfrik_scale.pretrain``.

    sfrik-scale pretrain                                   # the built-in demo, whatever device exists
    sfrik-scale pretrain --config imagenet_sfrik_r50 data.path=/data/imagenet/train
    deepspeed --num_gpus 8 --module sfrik_scale.pretrain --config imagenet_sfrik_r50 ...
    torchrun --nproc_per_node 8 -m sfrik_scale.pretrain --config ...
    srun python -m sfrik_scale.pretrain --config ...      # SLURM variables are mapped

Builds and validates the config before anything heavy starts, then hands it to the Trainer.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .errors import run_command
from .helptext import plain
from .preemption import StopRequest, ignore_stop_signals

#: the process's stop request (SIGTERM/SIGUSR1), installed by `hold_stop_signals`; see preemption.py
_stop: Optional[StopRequest] = None


def hold_stop_signals() -> None:
    """For a process started to pretrain (the entry points call it with no argv, i.e. not from a
    test): from now on SIGTERM/SIGUSR1 ask for a checkpoint at the first step instead of killing
    the start-up, and after training they are ignored."""
    global _stop
    if _stop is None:
        _stop = StopRequest()
    _stop.install()


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", help="self-supervised pretraining (DeepSpeed)",
                                   description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(handler=main_pretrain)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="a built-in recipe name (see --list-recipes), a YAML file, or a run directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 loss.coeffs=[1,40,40]")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--list-recipes", action="store_true", help="list the built-in recipes and exit")
    parser.add_argument("--check-world-size", type=int, default=None, metavar="N",
                        help="validate the configuration for N processes (the batch arithmetic included) and "
                             "exit: 0, or 2 with one line; the launchers run it once before starting any rank")
    parser.add_argument("--show-config", action="store_true",
                        help="print every config key with its type, its value (the recipe's and overrides', else "
                             "the default) and its help, then exit")


def main_pretrain(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from .config import list_recipes, load_config, recipe_summary

    if args.list_recipes:
        for name in list_recipes():
            description, runs_on = recipe_summary(name)
            print(f"{name}\n    {description}" + (f"\n    runs on: {runs_on}" if runs_on else ""))
        return 0
    if getattr(args, "show_config", False):
        return _show_config(args, extra)
    overrides = list(args.overrides) + [e for e in extra if "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in overrides]
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
    if args.check_world_size is not None:  # the launchers' check, before any rank starts
        load_config(args.config, overrides).validate(args.check_world_size)
        return 0
    from .topology import resolve_launch_env

    resolve_launch_env(os.environ, args.local_rank)
    world_size = int(os.environ["WORLD_SIZE"])
    cfg = load_config(args.config, overrides).validate(world_size)  # errors here, before any heavy start

    from .eval.online import OnlineEvaluator
    from .topology import init_distributed
    from .train import Trainer

    stop = _stop if _stop is not None and _stop.installed else None  # the process's, see hold_stop_signals
    try:
        topo = init_distributed(args.local_rank, timeout_s=cfg.train.collective_timeout_s)
        return Trainer(cfg, topo, hooks=[OnlineEvaluator.from_config], stop=stop).run()
    finally:
        if stop is not None:
            ignore_stop_signals()  # training is over: a late signal must not kill the shutdown


def _show_config(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Every key of the configuration: type, value and help, as one table on stdout."""
    from rich.console import Console
    from rich.table import Table

    from .config import describe_fields, load_config

    overrides = list(args.overrides) + [e for e in extra if "=" in e and not e.startswith("-")]
    values = load_config(args.config, overrides).to_dict()
    table = Table(title=f"configuration of {args.config or 'the demo (no --config)'}", show_lines=False)
    for column in ("key", "type", "value", "help"):
        table.add_column(column, overflow="fold")
    for key, type_name, _default, help_text in describe_fields():
        section, name = key.split(".", 1)
        table.add_row(key, type_name, repr(values.get(section, {}).get(name)), help_text)
    Console(soft_wrap=False).print(table)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfrik_scale.pretrain", description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    if argv is None and not (args.list_recipes or args.show_config or args.check_world_size is not None):
        hold_stop_signals()  # before torch loads: a preemption signal is honoured from here on
    from .topology import quiet_cpu_accelerator

    quiet_cpu_accelerator()
    return run_command("pretrain", lambda: main_pretrain(args, extra))

if __name__ == "__main__":
    sys.exit(main())
