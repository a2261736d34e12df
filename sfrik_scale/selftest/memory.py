"""Parts 2 and 3 of the self-test: peak memory measured on the GPU against the simulator.

* The paper's step (:func:`paper_step`): the official code's loop as it ran on PyTorch
  1.10 (DDP with its default ``gradient_as_bucket_view=False``, ``torch.autocast`` fp16
  with a ``GradScaler``, ``zero_grad(set_to_none=False)`` before ``scale(loss).backward()``,
  VICReg's LARS), with the losses' op sequences of :mod:`sfrik_scale.planning.reference`
  computed inside the autocast region as the official forward does, one process (world
  size 1, so the all-gather is a copy). ``torch.cuda.max_memory_allocated`` over the first
  step applied after one that created the LARS momentum (steady state), against ``simulate(Scenario(implementation="paper", world_size=1))`` with the
  same :class:`~sfrik_scale.planning.engines.PaperAssumptions`; each of the three
  assumptions is then toggled on both sides, and SyncBatchNorm on the measured side (the
  simulator has no SyncBatchNorm; at world size 1 PyTorch's SyncBatchNorm runs plain
  ``batch_norm``, so one GPU cannot settle the 8-GPU question).
* This trainer: ``profile-memory``'s measured runs (:func:`sfrik_scale.planning.sweep.measure`,
  a fresh ``sfrik_scale.pretrain`` process per configuration, its profiler's steady-state
  peak) against ``simulate`` of the same configuration.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Optional

import torch

from .common import SFRIK, VICREG, Deadline, gb, rel_error
from .worker import record_partial

#: measured within this fraction of the simulated peak (the gpu-marked test's 10%)
TOLERANCE = 0.10
ASSUMPTIONS = ("gradient_as_bucket_view", "grad_set_to_none", "autocast_cache")


class _PaperLARS(torch.optim.Optimizer):
    """VICReg's LARS as the official code steps it (``reference.paper_lars_step``), as an
    optimizer a GradScaler can step."""

    def __init__(self, params) -> None:
        super().__init__(list(params), {"lr": 0.1})
        self.momentum: dict = {}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - the GradScaler API
        from ..planning.reference import paper_lars_step

        paper_lars_step([p for g in self.param_groups for p in g["params"]], self.momentum)


class _TwoViewLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(y1), self.model(y2))


def _ensure_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    from ..topology import free_port

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def paper_step(method: str, per_gpu_batch: int, q: int = 32768, hidden: str = "8192-8192",
               backbone: str = "resnet50", image_size: int = 224, gradient_as_bucket_view: bool = False,
               grad_set_to_none: bool = False, autocast_cache: bool = True, sync_bn: bool = False,
               max_steps: int = 8, init_scale: float = 2.0 ** 10, device: str = "cuda") -> dict:
    """Run the paper's training step in this process until a step is applied with the LARS
    momentum already there (at least the third step; at most ``max_steps``, ``steady`` False
    then); the peak of that last step (bytes allocated by PyTorch's caching allocator on CUDA;
    None on CPU, where the step only runs, for the tests)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..models import build_model
    from ..planning.reference import PAPER_LOSSES

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    _ensure_process_group(dev)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the official code
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(dev) if cuda else 0
    torch.manual_seed(0)
    with dev:
        model = build_model(backbone, f"{hidden}-{q}")
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # as the official code: one DDP forward computes both views and the loss
    ddp = DDP(_TwoViewLoss(model, PAPER_LOSSES[method](q, 1)), device_ids=[dev.index or 0] if cuda else None,
              gradient_as_bucket_view=gradient_as_bucket_view)
    optimizer = _PaperLARS(model.parameters())
    # a low initial scale: the overflow-skipped steps of a scale still settling create no LARS
    # momentum and no step temporaries, so they are not the steady state being measured
    scaler = torch.amp.GradScaler(dev.type, init_scale=init_scale)
    shape = (per_gpu_batch, 3, image_size, image_size)
    losses, scales, skipped, applied = [], [], 0, 0
    peak, steady = None, False
    for step in range(max_steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        y1, y2 = torch.randn(shape, device=dev), torch.randn(shape, device=dev)  # the loader's batch, copied in
        with torch.autocast(dev.type, dtype=torch.float16, cache_enabled=autocast_cache):
            loss = ddp(y1, y2)
        optimizer.zero_grad(set_to_none=grad_set_to_none)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        overflow = scaler.get_scale() < scale
        skipped += int(overflow)
        losses.append(float(loss.detach()))
        scales.append(scale)
        del y1, y2, loss
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(dev)
        if not overflow:
            applied += 1
            if applied >= 2 and step >= 2:  # momentum existed before this applied step: steady state
                steady = True
                break
    del ddp, model, optimizer, scaler
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"peak_bytes": None if peak is None else peak - before, "allocated_before": before, "losses": losses,
            "loss_scales": scales, "overflow_skips": skipped, "steps": len(losses), "steady": steady}


def paper_simulated(method: str, per_gpu_batch: int, q: int = 32768, hidden: str = "8192-8192",
                    backbone: str = "resnet50", image_size: int = 224, gradient_as_bucket_view: bool = False,
                    grad_set_to_none: bool = False, autocast_cache: bool = True, device: str = "cuda") -> dict:
    from ..planning.engines import PaperAssumptions
    from ..planning.simulate import Scenario, simulate

    assumptions = PaperAssumptions(gradient_as_bucket_view=gradient_as_bucket_view,
                                   grad_set_to_none=grad_set_to_none, autocast_cache=autocast_cache)
    est = simulate(Scenario(method=method, global_batch=per_gpu_batch, world_size=1, backbone=backbone,
                            projector=f"{hidden}-{q}", image_size=image_size, implementation="paper",
                            device=device, paper_assumptions=assumptions))
    return {"peak_bytes": est.peak_bytes, "peak_phase": est.peak_phase}


def paper_configs(quick: bool) -> list[dict]:
    """Per-GPU batches of the paper's table (256/512/1024 on 8 GPUs), then the toggles at 32."""
    base = [dict(method=m, per_gpu_batch=n) for n in ((32,) if quick else (32, 64, 128)) for m in (VICREG, SFRIK)]
    toggled = [dict(method=m, per_gpu_batch=32, **{a: not getattr(_DEFAULTS, a)})
               for a in ASSUMPTIONS for m in ((SFRIK,) if quick else (VICREG, SFRIK))]
    sync = [] if quick else [dict(method=m, per_gpu_batch=32, sync_bn=True) for m in (VICREG, SFRIK)]
    return base + toggled + sync


def _defaults():
    from ..planning.engines import PaperAssumptions

    return PaperAssumptions()


_DEFAULTS = _defaults()


def variant(config: dict) -> str:
    changed = [a for a in ASSUMPTIONS if config.get(a, getattr(_DEFAULTS, a)) != getattr(_DEFAULTS, a)]
    if config.get("sync_bn"):
        changed.append("SyncBatchNorm")
    return ", ".join(f"{c}={config[c]}" if c in config else c for c in changed) or "as the official code"


def paper_part(quick: bool, work: str, timeout: float, configs: Optional[list] = None, device: str = "cuda",
               **sizes) -> dict:
    """Part 2. ``configs``/``sizes``/``device`` are for the CPU tests (tiny models)."""
    deadline = Deadline(timeout)
    configs = paper_configs(quick) if configs is None else configs
    rows, checks = [], []
    defaults: dict = {}
    for config in configs:
        if not deadline.allows(15):
            rows.append({**config, "variant": variant(config), "error": "not run: time box"})
            continue
        start = time.perf_counter()
        row = {**config, "variant": variant(config)}
        try:
            measured = paper_step(**config, **sizes, device=device)
            sim_args = {k: v for k, v in config.items() if k != "sync_bn"}
            simulated = paper_simulated(**sim_args, **sizes, device="cuda" if device == "cuda" else "cpu")
            row.update(measured_bytes=measured["peak_bytes"], simulated_bytes=simulated["peak_bytes"],
                       simulated_phase=simulated["peak_phase"], overflow_skips=measured["overflow_skips"],
                       losses=measured["losses"], allocated_before=measured["allocated_before"],
                       steady=measured["steady"], steps=measured["steps"])
            if not measured["steady"]:
                row["error"] = (f"no steady-state step in {measured['steps']} steps (GradScaler overflows: "
                                f"{measured['overflow_skips']}); the peak shown is the last step's")
        except Exception as err:  # noqa: BLE001 - recorded; the next configuration runs
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        if row["variant"] == "as the official code" and "error" not in row:
            defaults[row["method"], row["per_gpu_batch"]] = row
        record_partial({"rows": rows})
    for row in rows:
        base = defaults.get((row["method"], row["per_gpu_batch"]))
        if base is not None and base is not row and "error" not in row:
            row["simulated_delta_gb"] = gb(row["simulated_bytes"] - base["simulated_bytes"])
            if row["measured_bytes"] is not None and base["measured_bytes"] is not None:
                row["measured_delta_gb"] = gb(row["measured_bytes"] - base["measured_bytes"])
        if row is base and row["measured_bytes"] is not None:
            err = rel_error(row["measured_bytes"], row["simulated_bytes"])
            checks.append({"name": f"paper step {row['method']} batch {row['per_gpu_batch']}: simulated within "
                                   f"{TOLERANCE:.0%} of measured", "ok": abs(err) <= 100 * TOLERANCE,
                           "detail": f"measured {gb(row['measured_bytes'])} GB, simulated "
                                     f"{gb(row['simulated_bytes'])} GB ({err:+.1f}%)"})
        if "error" in row and not row["error"].startswith("not run"):
            checks.append({"name": f"paper step {row['method']} batch {row['per_gpu_batch']} ({row['variant']})",
                           "ok": False, "detail": row["error"]})
    table = [[r["method"], r["per_gpu_batch"], r["variant"], gb(r.get("measured_bytes")), gb(r.get("simulated_bytes")),
              rel_error(r.get("measured_bytes"), r.get("simulated_bytes")), r.get("measured_delta_gb"),
              r.get("simulated_delta_gb"), r.get("error", "")] for r in rows]
    return {"rows": rows, "checks": checks,
            "tables": [{"title": "the paper's step (DDP, fp16 autocast, GradScaler, LARS), world size 1: peak GB "
                                 "(10^9 B) of a steady-state step; deltas against the official settings",
                        "headers": ["method", "batch/GPU", "variant", "measured", "simulated", "error %",
                                    "measured delta", "simulated delta", "error"], "rows": table}]}


# ------------------------------------------------------------------------------ the trainer
def trainer_points(quick: bool) -> list:
    from ..planning.sweep import Point

    if quick:
        return [Point(SFRIK, 32768, 64, 2, "bf16")]
    return [Point(SFRIK, 32768, 64, stage, precision) for precision in ("bf16", "fp16") for stage in (0, 1, 2)] + \
        [Point(VICREG, 32768, 64, 2, "bf16")]


def trainer_part(quick: bool, work: str, timeout: float, points: Optional[list] = None, backbone: str = "resnet50",
                 hidden: str = "8192-8192", image_size: int = 224, overrides: Optional[list] = None) -> dict:
    """Part 3: DeepSpeed ZeRO 0/1/2 in bf16 and fp16, world size 1, measured against simulated."""
    from pathlib import Path

    from ..planning.simulate import Scenario, simulate
    from ..planning.sweep import measure
    from .skips import deepspeed_missing

    reason = deepspeed_missing()
    if reason is not None:
        return {"status": "skipped", "note": reason}
    deadline = Deadline(timeout)
    points = trainer_points(quick) if points is None else points
    overrides = ["data.num_workers=4"] if overrides is None else overrides
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, checks = [], []
    for point in points:
        row = dataclasses.asdict(point)
        if not deadline.allows(20):
            rows.append({**row, "error": "not run: time box"})
            continue
        (measured,) = measure([point], Path(work), backbone=backbone, hidden=hidden, world_size=1,
                              image_size=image_size, steps=3, overrides=overrides, timeout=max(deadline.left() - 5, 10))
        row.update(measured_bytes=measured.get("peak_bytes"), measured_phase=measured.get("peak_phase"),
                   seconds=measured.get("seconds"))
        if measured.get("error"):
            row["error"] = measured["error"][:300]
            checks.append({"name": f"trainer {point.name}", "ok": False, "detail": row["error"]})
        else:
            est = simulate(Scenario(method=point.method, global_batch=point.global_batch, world_size=1,
                                    backbone=backbone, projector=f"{hidden}-{point.q}", image_size=image_size,
                                    zero_stage=point.zero_stage, precision=point.precision, device=device))
            row.update(simulated_bytes=est.peak_bytes, simulated_phase=est.peak_phase)
            err = rel_error(row["measured_bytes"], est.peak_bytes)
            checks.append({"name": f"trainer {point.name}: simulated within {TOLERANCE:.0%} of measured",
                           "ok": abs(err) <= 100 * TOLERANCE,
                           "detail": f"measured {gb(row['measured_bytes'])} GB ({row['measured_phase']}), simulated "
                                     f"{gb(est.peak_bytes)} GB ({est.peak_phase}), {err:+.1f}%"})
        rows.append(row)
        record_partial({"rows": rows})
    table = [[r["method"], r["global_batch"], r["zero_stage"], r["precision"], gb(r.get("measured_bytes")),
              r.get("measured_phase"), gb(r.get("simulated_bytes")), r.get("simulated_phase"),
              rel_error(r.get("measured_bytes"), r.get("simulated_bytes")), r.get("error", "")] for r in rows]
    return {"rows": rows, "checks": checks,
            "tables": [{"title": f"this trainer, {backbone} + {hidden}-q, world size 1, steady-state peak GB "
                                 "(profiler, steps 2-3) against simulated",
                        "headers": ["method", "batch", "ZeRO", "precision", "measured", "phase", "simulated", "phase",
                                    "error %", "error"], "rows": table}]}
