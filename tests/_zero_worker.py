"""One rank of the multi-process optimiser tests (started by tests/test_optim.py).

Runs every case of `CASES` through ``deepspeed.initialize`` in one process group (one
launch for all ZeRO stages: start-up dominates the cost), each rank training on its own
half of the global batch. Rank 0 saves the results to ``OUT_DIR/results.pt``.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python tests/_zero_worker.py OUT_DIR

The model, data and schedule are defined here and imported by the test, which computes
the single-process reference from the same definitions (this module imports DeepSpeed
only inside `main`).
"""
from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

GLOBAL_BATCH = 16
IN_DIM, OUT_DIM = 13, 5
STEPS = 6
# Peak lr 76.8 x 16 / 256 = 4.8, the order of the recipes' peaks (0.4 x 2048 / 256 = 3.2), so that
# per-layer and per-shard trust ratios lead to clearly different parameters.
BASE_LR = 76.8
# Warm-up then cosine, as in the recipes, over STEPS iterations.
SCHEDULE = (("steps_per_epoch", 2), ("epochs", 3), ("warmup_epochs", 1), ("final_ratio", 0.001))
BF16_SCHEDULE = (("steps_per_epoch", 8), ("epochs", 1), ("warmup_epochs", 0), ("final_ratio", 0.001))


@dataclass(frozen=True)
class Case:
    """One deepspeed.initialize run."""

    name: str
    optimizer: str          # "lars", "lamb" or "naive_lars" (per-shard trust ratios: the bug)
    stage: int
    bf16: bool = False
    base_lr: float = BASE_LR
    schedule: Tuple[Tuple[str, float], ...] = SCHEDULE
    steps: int = STEPS
    fixed_batch: bool = False
    extra_zero: Tuple[Tuple[str, object], ...] = ()
    extra_config: Tuple[Tuple[str, object], ...] = ()
    attach: bool = True     # False: the trainer forgot attach_zero_layout; the step must refuse


CASES: List[Case] = [
    Case("lars_zero0", "lars", 0),
    Case("lars_zero1", "lars", 1),
    Case("lars_zero2", "lars", 2, extra_zero=(("round_robin_gradients", True),)),
    # Small sub-groups: stage 3 calls step() once per sub-group.
    Case("lars_zero3", "lars", 3, extra_zero=(("sub_group_size", 600), ("stage3_param_persistence_threshold", 0))),
    # Optimizer state offloaded to CPU: DeepSpeed insists on its CPU Adam unless told otherwise.
    Case("lars_zero2_offload", "lars", 2, extra_zero=(("offload_optimizer", {"device": "cpu"}),),
         extra_config=(("zero_force_ds_cpu_optimizer", False),)),
    # LAMB's ratio ||w|| / ||u|| has no eta: the step is lr x ||w||, so a far smaller lr.
    Case("lamb_zero2", "lamb", 2, base_lr=0.32),
    Case("naive_lars_zero2", "naive_lars", 2),
    Case("lars_zero2_no_layout", "lars", 2, steps=1, attach=False),
    # bf16 smoke runs: one fixed batch, cosine decay without warm-up, so the loss falls steadily.
    Case("lars_bf16_zero2", "lars", 2, bf16=True, base_lr=2.4, schedule=BF16_SCHEDULE, steps=8, fixed_batch=True),
    # bf16 without ZeRO: DeepSpeed's FP16_UnfusedOptimizer keeps one fp32 copy per parameter.
    Case("lars_bf16_zero0", "lars", 0, bf16=True, base_lr=2.4, schedule=BF16_SCHEDULE, steps=8, fixed_batch=True),
    Case("lars_bf16_zero3", "lars", 3, bf16=True, base_lr=2.4, schedule=BF16_SCHEDULE, steps=8, fixed_batch=True,
         extra_zero=(("sub_group_size", 600), ("stage3_param_persistence_threshold", 0))),
    # bf16 parameters with fp32 gradient accumulation at stage 1: DeepSpeed's BF16_Optimizer.
    Case("lars_bf16_zero1_fp32acc", "lars", 1, bf16=True, base_lr=2.4, schedule=BF16_SCHEDULE, steps=8,
         fixed_batch=True, extra_config=(("data_types", {"grad_accum_dtype": "fp32"}),)),
]


def make_model(seed: int = 0) -> nn.Module:
    """Three linear layers of different sizes, so that ZeRO partitions cut layers mid-way."""
    with torch.random.fork_rng():  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(IN_DIM, 37), nn.Tanh(), nn.Linear(37, 29), nn.Tanh(), nn.Linear(29, OUT_DIM))


def global_batch(step: int, fixed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs (GLOBAL_BATCH, IN_DIM) and random regression targets (GLOBAL_BATCH, OUT_DIM) of a step."""
    g = torch.Generator().manual_seed(1000 + (0 if fixed else step))
    return torch.randn(GLOBAL_BATCH, IN_DIM, generator=g), torch.randn(GLOBAL_BATCH, OUT_DIM, generator=g)


def build(case: Case, model: nn.Module):
    """The optimiser of a case and its schedule (the test builds the same for its reference)."""
    from sfrik_scale import optim

    kind = "lars" if case.optimizer == "naive_lars" else case.optimizer
    optimizer = optim.build_optimizer(kind, model, lr=0.0)
    if case.optimizer == "naive_lars":
        # The DeepSpeed issue #490 behaviour: each flat partition treated as one layer.
        optimizer.segments_for = lambda p, group: optim.LayerSegments.whole(p)
    scheduler = optim.build_scheduler(optimizer, case.base_lr, GLOBAL_BATCH, **dict(case.schedule))
    return optimizer, scheduler


def ds_config(case: Case, world: int) -> dict:
    zero = {"stage": case.stage, **dict(case.extra_zero)}
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": case.bf16},
        "steps_per_print": 10 ** 9,
        **dict(case.extra_config),
    }


def run_case(case: Case, rank: int, world: int) -> Dict[str, object]:
    import deepspeed
    from sfrik_scale import comm, zero_layout

    model = make_model()
    optimizer, scheduler = build(case, model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(case, world))
    layout = zero_layout.attach_zero_layout(optimizer, engine) if case.attach and case.optimizer != "naive_lars" else "none"
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    per_rank = GLOBAL_BATCH // world
    losses: List[float] = []
    lrs: List[float] = []
    for step in range(case.steps):
        x, y = global_batch(step, case.fixed_batch)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr this step uses (a Python float)
        try:
            engine.step()
        except RuntimeError as error:  # raised on every rank alike, before any collective of ours
            engine.destroy()
            return {"error": str(error)}
        mean_loss = comm.all_reduce_(loss.detach().clone()) / world
        losses.append(float(mean_loss))  # host sync: test bookkeeping
    # Stage 3 keeps only a slice of each parameter per rank: gather the full tensors.
    gather = deepspeed.zero.GatheredParameters(list(model.parameters())) if case.stage == 3 else nullcontext()
    with gather:
        params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    wrapper = type(engine.optimizer).__name__
    engine.destroy()
    return {"params": params, "losses": losses, "lrs": lrs, "layout": layout, "wrapper": wrapper}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {case.name: run_case(case, rank, world) for case in CASES}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    # Leave together: a rank that exits while its peer's gloo threads still talk to it can make
    # the peer abort at exit ("terminate called without an active exception", status -6).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
