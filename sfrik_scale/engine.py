"""The DeepSpeed engine of a run: DeepSpeed's specifics in one place.

`build_engine` turns a run's configuration and model into a ready engine: the optimiser
(`sfrik_scale.optim`, with the options its builder takes from ``cfg.optim``) and the
per-iteration schedule, the DeepSpeed config (`sfrik_scale.ds_config`), ``deepspeed.initialize``,
the ZeRO layout the layer-wise optimisers need (`sfrik_scale.zero_layout.attach_zero_layout`) and
the dtype the inputs are given in. Checkpoint calls on the engine live in
`sfrik_scale.checkpoint`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import Config
from .ds_config import build_ds_config
from .topology import Topology


@dataclass
class EngineParts:
    engine: Any              # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ds_config: dict          # what was given to deepspeed.initialize (saved as ds_config.json)
    zero_layout: str         # zero_layout.attach_zero_layout's answer (shown in the run header)
    input_dtype: torch.dtype  # the dtype the engine takes its inputs in (bf16, fp16 or fp32)


def build_engine(cfg: Config, topo: Topology, model: torch.nn.Module, steps_per_epoch: int) -> EngineParts:
    """``deepspeed.initialize`` on ``model`` with the run's optimiser, schedule and DeepSpeed config."""
    import deepspeed

    from .optim import build_optimizer, build_scheduler, optimizer_options
    from .zero_layout import attach_zero_layout

    if cfg.deepspeed.precision == "fp16" and topo.device.type != "cuda":
        raise ValueError("deepspeed.precision: fp16 (dynamic loss scaling) needs a CUDA device; "
                         "use bf16 or fp32 on CPU")
    o = cfg.optim
    optimizer = build_optimizer(o.name, model, lr=cfg.peak_lr, **optimizer_options(o.name, o))
    scheduler = build_scheduler(optimizer, o.base_lr, cfg.train.global_batch_size, steps_per_epoch,
                                cfg.train.epochs, warmup_epochs=o.warmup_epochs, final_ratio=o.final_lr_ratio)
    ds_config = build_ds_config(cfg, topo.world_size)
    # config= only (never also --deepspeed_config: DeepSpeed asserts)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    zero_layout = attach_zero_layout(optimizer, engine)
    if engine.bfloat16_enabled():
        input_dtype = torch.bfloat16
    elif engine.fp16_enabled():
        input_dtype = torch.float16
    else:
        input_dtype = torch.float32
    return EngineParts(engine, optimizer, scheduler, ds_config, zero_layout, input_dtype)
