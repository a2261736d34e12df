"""Part 4 of the self-test (training steps, fp16 and bf16) and the step timings of part 5.

Both build the real trainer in a fresh process (``Trainer(cfg, topo).build()``, world size
1, DeepSpeed as installed) and call its ``train_step`` on random in-memory batches, as
``sfrik-scale bench step`` does: no data pipeline is timed or needed.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Optional

import torch

from .common import SFRIK, VICREG, Deadline
from .runner import isolated
from .skips import deepspeed_missing
from .worker import record_partial

#: fp16 run with forced overflows: DeepSpeed's dynamic scaler starts at 2^32 and, with
#: hysteresis 1, halves the scale at every overflow-skipped step until gradients fit fp16
FORCED_SCALE_POWER = 32


def build_trainer(method: str, per_gpu_batch: int, q: int, precision: str, zero_stage: int,
                  backbone: str = "resnet50", hidden: str = "8192-8192", image_size: int = 224,
                  extra: tuple = (), run_dir: Optional[str] = None):
    """The trainer of this configuration, built in this process (world size 1)."""
    from ..config import load_config
    from ..topology import init_distributed, resolve_launch_env
    from ..train import Trainer

    resolve_launch_env(os.environ)
    run_dir = run_dir or tempfile.mkdtemp(prefix="sfrik-selftest-run-")
    cfg = load_config(None, [
        f"model.backbone={backbone}", f"model.projector={hidden}-{q}", f"loss.name={method}",
        f"train.global_batch_size={per_gpu_batch}", "train.micro_batch_size=null",
        f"deepspeed.zero_stage={zero_stage}", f"deepspeed.precision={precision}", "data.dataset=synthetic",
        f"data.image_size={image_size}", f"data.synthetic_size={per_gpu_batch}", "data.num_workers=0",
        "train.epochs=1", "optim.warmup_epochs=0", f"train.run_dir={run_dir}", "train.resume=false",
        "train.checkpoint_every_steps=0", "monitor.progress=false", "monitor.tensorboard=false", *extra])
    cfg.validate(int(os.environ["WORLD_SIZE"]))
    return Trainer(cfg, init_distributed()).build()


def loss_scale(engine) -> Optional[float]:
    """The fp16 dynamic loss scale, wherever this DeepSpeed optimizer keeps it."""
    opt = engine.optimizer
    for get in (lambda: opt.cur_scale, lambda: opt.loss_scale, lambda: opt.loss_scaler.cur_scale):
        try:
            value = get()
        except AttributeError:
            continue
        if value is not None:
            return float(value)
    return None


def run_steps(method: str, per_gpu_batch: int, q: int, precision: str, zero_stage: int, steps: int,
              forced_overflow: bool = False, backbone: str = "resnet50", hidden: str = "8192-8192",
              image_size: int = 224) -> dict:
    """``steps`` training steps; per step the loss, the trainer's non-finite flag, whether
    DeepSpeed skipped it (``engine.skipped_steps``) and the loss scale before and after."""
    extra = (f"deepspeed.extra.fp16.initial_scale_power={FORCED_SCALE_POWER}", "deepspeed.extra.fp16.hysteresis=1") \
        if forced_overflow else ()
    trainer = build_trainer(method, per_gpu_batch, q, precision, zero_stage, backbone, hidden, image_size, extra)
    engine = trainer.engine
    g = torch.Generator().manual_seed(0)
    shape = (per_gpu_batch, 3, image_size, image_size)
    batches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(2)]
    records = []
    for i in range(steps):
        skipped, scale = getattr(engine, "skipped_steps", 0), loss_scale(engine) if precision == "fp16" else None
        result = trainer.train_step(*batches[i % 2])
        after = getattr(engine, "skipped_steps", 0)
        records.append({"step": i, "loss": result["loss"], "nonfinite": bool(result["nonfinite"]),
                        "skipped": after > skipped, "scale_before": scale,
                        "scale_after": loss_scale(engine) if precision == "fp16" else None})
        record_partial({"records": records})
    min_scale = float(trainer.ds_config.get("fp16", {}).get("min_loss_scale", 1))
    return {"records": records, "skipped_steps": getattr(engine, "skipped_steps", 0), "min_loss_scale": min_scale,
            "method": method, "precision": precision, "zero_stage": zero_stage, "per_gpu_batch": per_gpu_batch,
            "q": q, "forced_overflow": forced_overflow}


def step_checks(run: dict) -> list[dict]:
    """What must hold of a run of :func:`run_steps`."""
    recs, name = run["records"], f"{run['precision']} ZeRO {run['zero_stage']}"
    checks = [{"name": f"{name}: every loss finite", "ok": all(not r["nonfinite"] for r in recs),
               "detail": f"{len(recs)} steps, losses {recs[0]['loss']:.4g} ... {recs[-1]['loss']:.4g}" if recs else ""}]
    skipped = [r["step"] for r in recs if r["skipped"]]
    if run["precision"] != "fp16":
        checks.append({"name": f"{name}: no step skipped", "ok": not skipped and run["skipped_steps"] == 0,
                       "detail": f"skipped: {skipped}"})
        return checks
    checks.append({"name": f"{name}: overflow skips counted", "ok": len(skipped) == run["skipped_steps"] and
                   (len(skipped) > 0 or not run["forced_overflow"]),
                   "detail": f"{len(skipped)} steps skipped (engine.skipped_steps {run['skipped_steps']})"
                             + (f", initial scale 2^{FORCED_SCALE_POWER}" if run["forced_overflow"] else "")})
    bad = []
    for r in recs:
        before, after = r["scale_before"], r["scale_after"]
        if before is None or after is None:
            bad.append(f"step {r['step']}: no loss scale")
        elif r["skipped"] and run["forced_overflow"] and after != max(before / 2, run["min_loss_scale"]):
            bad.append(f"step {r['step']}: overflow, scale {before:g} -> {after:g}")
        elif not r["skipped"] and after != before:  # the scale window (1000 steps) is far away
            bad.append(f"step {r['step']}: no overflow, scale {before:g} -> {after:g}")
    checks.append({"name": f"{name}: loss scale halves on each overflow, holds otherwise", "ok": not bad,
                   "detail": "; ".join(bad[:3]) or f"scale {recs[0]['scale_before']:g} -> {recs[-1]['scale_after']:g}"})
    applied = [r for r in recs if not r["skipped"]]
    checks.append({"name": f"{name}: steps applied once the scale fits", "ok": len(applied) >= 3,
                   "detail": f"{len(applied)} of {len(recs)} steps applied"})
    return checks


def steps_configs(quick: bool) -> list[dict]:
    n, q = (32 if quick else 64), 32768
    fp16 = [dict(method=SFRIK, per_gpu_batch=n, q=q, precision="fp16", zero_stage=stage, steps=30 if quick else 40,
                 forced_overflow=True) for stage in ((2,) if quick else (0, 2))]
    return fp16 + [dict(method=SFRIK, per_gpu_batch=n, q=q, precision="bf16", zero_stage=2, steps=8 if quick else 12)]


def steps_part(quick: bool, work: str, timeout: float, configs: Optional[list] = None) -> dict:
    """Part 4: fp16 (forced overflows) and bf16 steps at q = 32768, each run in its own process."""
    reason = deepspeed_missing()
    if reason is not None:
        return {"status": "skipped", "note": reason}
    deadline = Deadline(timeout)
    runs, checks = [], []
    for config in steps_configs(quick) if configs is None else configs:
        label = f"{config['precision']} ZeRO {config['zero_stage']}"
        if not deadline.allows(20):
            checks.append({"name": f"{label}: not run", "ok": True, "detail": "time box"})
            continue
        run = isolated("sfrik_scale.selftest.training:run_steps", config, deadline.left() - 3, work,
                       key=f"steps-{config['precision']}-z{config['zero_stage']}")
        if "error" in run:
            checks.append({"name": f"{label}: ran", "ok": False, "detail": run["error"].splitlines()[0][:300]})
            run = {**config, **(run.get("partial") or {}), "error": run["error"]}
        else:
            checks += step_checks(run)
        runs.append({k: v for k, v in run.items() if k not in ("log_tail", "traceback")})
        record_partial({"runs": runs, "checks": checks})
    rows = [[f"{r['precision']} ZeRO {r['zero_stage']}", r2["step"], _fmt(r2["loss"]), r2["nonfinite"], r2["skipped"],
             r2["scale_before"], r2["scale_after"]] for r in runs for r2 in r.get("records", [])]
    return {"runs": runs, "checks": checks,
            "tables": [{"title": "training steps (ResNet-50, 8192-8192-32768, world size 1): loss, skips, loss scale",
                        "headers": ["run", "step", "loss", "non-finite", "skipped", "scale before", "scale after"],
                        "rows": rows}]}


def _fmt(x) -> str:
    return f"{x:.5g}" if isinstance(x, (int, float)) else str(x)


# ------------------------------------------------------------------------------ step timing
def time_steps(method: str, per_gpu_batch: int, q: int, precision: str = "bf16", zero_stage: int = 2,
               warmup: int = 3, timed: int = 10, backbone: str = "resnet50", hidden: str = "8192-8192",
               image_size: int = 224) -> dict:
    """Median-free wall time of ``timed`` trainer steps after ``warmup`` (CUDA synchronised)."""
    trainer = build_trainer(method, per_gpu_batch, q, precision, zero_stage, backbone, hidden, image_size)
    g = torch.Generator().manual_seed(0)
    shape = (per_gpu_batch, 3, image_size, image_size)
    dev = trainer.topo.device
    v1, v2 = (torch.randn(shape, generator=g).to(dev, trainer.input_dtype) for _ in range(2))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        trainer.train_step(v1, v2)
    sync()
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        trainer.train_step(v1, v2)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return {"method": method, "per_gpu_batch": per_gpu_batch, "q": q, "precision": precision,
            "zero_stage": zero_stage, "ms_per_step": 1e3 * statistics.median(times),
            "images_per_s": per_gpu_batch / statistics.median(times), "steps": timed, "peak_bytes": peak}


def compare_methods(quick: bool, work: str, deadline: Deadline, per_gpu_batch: int = 256, q: int = 16384,
                    **sizes) -> dict:
    """SFRIK against VICReg, a full trainer step each at q = 16384; the paper's batch 2048 on
    8 GPUs is 256 per GPU. Each method in its own process."""
    reason = deepspeed_missing()
    if reason is not None:
        return {"note": f"step comparison skipped: {reason}", "rows": []}
    rows = []
    for method in (SFRIK, VICREG):
        if not deadline.allows(25):
            rows.append({"method": method, "error": "not run: time box"})
            continue
        kwargs = dict(method=method, per_gpu_batch=per_gpu_batch, q=q, warmup=2 if quick else 3,
                      timed=5 if quick else 10, **sizes)
        r = isolated("sfrik_scale.selftest.training:time_steps", kwargs, deadline.left() - 3, work,
                     key=f"time-{method}")
        rows.append({k: v for k, v in r.items() if k not in ("log_tail", "traceback")} if "error" not in r else
                    {"method": method, "error": r["error"].splitlines()[0][:300]})
    return {"rows": rows}
