"""Sweeps of memory configurations: measured by the real trainer, or simulated.

A sweep is the product methods x global batch sizes x q x ZeRO stages x precisions.

* :func:`measure` runs each configuration in a *fresh process* (``python -m
  sfrik_scale.pretrain``, or ``torch.distributed.run`` for several ranks) for a few steps with
  ``profiling.enabled=true`` and reads the profiler's ``memory/rank0.json``: the steady-state
  peak of the training phases on rank 0. Fresh processes keep one configuration's allocator
  state and caches out of the next one's numbers.
* :func:`simulate_sweep` predicts the same configurations with :func:`~.simulate.simulate`
  (in this process, seconds each, no GPU needed), for the trainer or for the paper's
  implementation.

Both return *results*, the dicts :mod:`.tables` formats.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .engines import DeepSpeedBuckets
from .simulate import Scenario, simulate


_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Point:
    """One configuration of a sweep."""

    method: str
    q: int
    global_batch: int
    zero_stage: int
    precision: str
    implementation: str = "trainer"

    @property
    def name(self) -> str:
        what = "paper" if self.implementation == "paper" else f"z{self.zero_stage}_{self.precision}"
        return f"{self.method}_q{self.q}_n{self.global_batch}_{what}"


def sweep_points(methods: Sequence[str], batches: Sequence[int], qs: Sequence[int], stages: Sequence[int] = (0,),
                 precisions: Sequence[str] = ("bf16",), implementation: str = "trainer") -> list[Point]:
    """The product of the axes (the paper's implementation has no stage/precision axis)."""
    if implementation == "paper":
        stages, precisions = (0,), ("fp16",)
    return [Point(m, int(q), int(b), int(s), p, implementation)
            for q, b, s, p, m in itertools.product(qs, batches, stages, precisions, methods)]


def _result(point: Point, common: dict, source: str, **extra) -> dict:
    out = {**dataclasses.asdict(point), "world_size": common["world_size"], "backbone": common["backbone"],
           "projector": f"{common['hidden']}-{point.q}", "source": source}
    out.update(extra)
    return out


# ------------------------------------------------------------------------------ simulated
def simulate_sweep(points: Sequence[Point], backbone: str = "resnet50", hidden: str = "8192-8192",
                   world_size: int = 8, image_size: int = 224, device: str = "cuda",
                   batchnorm_fp32: bool = True, chunk_size: Optional[int] = None,
                   reduce_bucket_size: Optional[int] = None,
                   progress: Optional[Callable[[Point, dict], None]] = None) -> list[dict]:
    """Simulate each point; a point that cannot be simulated gets an ``error`` entry."""
    common = dict(backbone=backbone, hidden=hidden, world_size=world_size)
    buckets = DeepSpeedBuckets() if reduce_bucket_size is None else DeepSpeedBuckets(reduce_bucket_size=reduce_bucket_size)
    results = []
    for point in points:
        start = time.perf_counter()
        try:
            est = simulate(Scenario(method=point.method, global_batch=point.global_batch, world_size=world_size,
                                    backbone=backbone, projector=f"{hidden}-{point.q}", image_size=image_size,
                                    implementation=point.implementation, zero_stage=point.zero_stage,
                                    precision=point.precision if point.implementation == "trainer" else "bf16",
                                    device=device, batchnorm_fp32=batchnorm_fp32, chunk_size=chunk_size,
                                    buckets=buckets))
            r = _result(point, common, "simulated", peak_bytes=est.peak_bytes, peak_phase=est.peak_phase,
                        phase_peaks=est.phase_peaks, breakdown=est.grouped(), num_parameters=est.num_parameters)
        except (ValueError, RuntimeError, NotImplementedError) as err:
            r = _result(point, common, "simulated", peak_bytes=None, error=f"{type(err).__name__}: {err}")
        r["seconds"] = round(time.perf_counter() - start, 2)
        results.append(r)
        if progress is not None:
            progress(point, r)
    return results


# ------------------------------------------------------------------------------ measured
def measure_command(point: Point, run_dir: Path, backbone: str, hidden: str, world_size: int, image_size: int,
                    steps: int, config: Optional[str] = None, overrides: Sequence[str] = ()) -> list[str]:
    """The command line that trains ``point`` for ``steps`` steps with the profiler on."""
    if point.implementation != "trainer":
        raise ValueError("only the trainer can be measured; the paper's implementation is simulated (--simulate)")
    sets = [f"model.backbone={backbone}", f"model.projector={hidden}-{point.q}", f"loss.name={point.method}",
            f"train.global_batch_size={point.global_batch}", "train.micro_batch_size=null",
            f"deepspeed.zero_stage={point.zero_stage}", f"deepspeed.precision={point.precision}",
            "profiling.enabled=true", f"train.max_steps={steps}", f"train.run_dir={run_dir}",
            "train.resume=false", "train.checkpoint_every_steps=0", "train.log_every_steps=1000000",
            "monitor.progress=false"]
    if config is None:  # the built-in synthetic data, large enough for the steps
        sets += ["data.dataset=synthetic", f"data.image_size={image_size}",
                 f"data.synthetic_size={point.global_batch * (steps + 1)}", "train.epochs=1",
                 "optim.warmup_epochs=0"]
    sets += list(overrides)
    entry = ["-m", "sfrik_scale.pretrain"] + (["--config", config] if config else []) + sets
    if world_size > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"] + entry
    return [sys.executable] + entry


def measure(points: Sequence[Point], out_dir: Path, backbone: str = "resnet50", hidden: str = "8192-8192",
            world_size: int = 1, image_size: int = 224, steps: int = 3, config: Optional[str] = None,
            overrides: Sequence[str] = (), timeout: float = 1800.0, keep_checkpoints: bool = False,
            progress: Optional[Callable[[Point, dict], None]] = None) -> list[dict]:
    """Train each point for ``steps`` steps in a fresh process and read rank 0's profile.

    The peak reported is ``steady_train_peak_bytes``: steps after the first, phases after
    data loading. Logs go to ``out_dir/runs/<point>/stdout.log``; checkpoints the trainer
    writes at the end are deleted unless ``keep_checkpoints``.
    """
    common = dict(backbone=backbone, hidden=hidden, world_size=world_size)
    results = []
    for point in points:
        run_dir = Path(out_dir) / "runs" / point.name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        cmd = measure_command(point, run_dir, backbone, hidden, world_size, image_size, steps, config, overrides)
        start = time.perf_counter()
        # a fresh job: no launcher variables inherited from whatever started this process
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
        env["PYTHONUNBUFFERED"] = "1"
        with open(run_dir / "stdout.log", "w") as log:
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        profile = run_dir / "memory" / "rank0.json"
        if code == 0 and profile.is_file():
            data = json.loads(profile.read_text())
            r = _result(point, common, "measured", peak_bytes=data["steady_train_peak_bytes"],
                        phase_peaks=data["steady_phase_peaks"], device=data["device"],
                        peak_phase=max(data["steady_phase_peaks"], key=data["steady_phase_peaks"].get))
        else:
            tail = (run_dir / "stdout.log").read_text().strip().splitlines()[-1:] or [""]
            r = _result(point, common, "measured", peak_bytes=None,
                        error=f"exit {code}: {tail[0][:200]} (see {run_dir / 'stdout.log'})")
        r["seconds"] = round(time.perf_counter() - start, 1)
        r["command"] = " ".join(cmd)
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        results.append(r)
        if progress is not None:
            progress(point, r)
    return results
