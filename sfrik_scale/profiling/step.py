"""The trainer's memory profiler: peak memory per phase of a step and per module.

Built by `build_profiler` when ``profiling.enabled`` is true (the default
``NullProfiler`` costs one attribute lookup per call). The trainer marks the phases of a
step (``with profiler.phase("loss"):``), calls ``attach(model)`` once and
``end_step(step)`` after each optimiser step; the forward phases (``backbone_forward``,
``projector_forward``) and the per-module peaks come from module hooks.

Where the numbers come from:
  * CUDA: the caching allocator (``torch.cuda.memory_allocated`` and
    ``max_memory_allocated``, the quantity the SFRIK paper reports). Nested windows share
    the allocator's single peak counter: before a window opens or closes, the counter's
    value is folded into every open window and the counter is reset.
  * CPU: exact tensor-byte accounting (:class:`~.accounting.TensorByteTracker`, a dispatch
    mode that sees every storage created and freed), on top of a baseline: the bytes of
    every tensor alive when ``attach`` runs (parameters, optimizer and engine state).
    Process RSS is not used: it mixes in allocator caches, libraries and the interpreter.

Results (rank ``r``), in ``run_dir/memory/``:
  * ``rank{r}.json``: device, baseline, every step's peaks per phase, the phase peaks over
    all steps and over steps after the first (``steady``: optimizer state exists), the steady
    peak without the data phase (``steady_train_peak_bytes``), and the forward/backward peak
    of every module up to ``profiling.module_depth``;
  * ``rank{r}_phases.csv`` (step, phase, peak_bytes) and ``rank{r}_modules.csv``;
  * ``rank{r}_snapshot.pickle`` with ``profiling.memory_snapshot`` on CUDA: the allocator
    history for https://pytorch.org/memory_viz;
  * TensorBoard (rank 0): ``memory/<phase>_peak_mib`` and ``memory/step_peak_mib`` per step.

Peaks are absolute bytes (everything live on the device, as ``max_memory_allocated``), not
increments.
"""
from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .accounting import Scope, TensorByteTracker, live_tensors, storage_bytes
from .phases import PHASES, NullProfiler

MEMORY_DIR = "memory"
#: phases measured by module hooks rather than by the trainer's ``phase`` blocks
HOOKED_PHASES = {"backbone": "backbone_forward", "projector": "projector_forward"}


class CudaScopes:
    """Nested peak windows over the CUDA caching allocator's counters (same API as the
    tracker's ``open_scope``/``close_scope``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._open: list[Scope] = []
        torch.cuda.reset_peak_memory_stats(device)

    @property
    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def _fold(self) -> None:
        peak = torch.cuda.max_memory_allocated(self.device)
        for scope in self._open:
            scope.peak = max(scope.peak, peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    def open_scope(self, name: str = "") -> Scope:
        self._fold()
        scope = Scope(name, self.current, self.current)
        self._open.append(scope)
        return scope

    def close_scope(self, scope: Scope) -> Scope:
        self._fold()
        scope.end = self.current
        if scope in self._open:
            self._open.remove(scope)
        return scope


class StepProfiler:
    """Peak memory per phase and per module, written to the run directory and TensorBoard.

    Args:
        cfg: the run's Config (reads ``cfg.profiling``).
        run_dir: where ``memory/`` goes.
        device: the training device (CUDA allocator counters, or CPU tensor accounting).
        is_main: rank 0 (writes TensorBoard through ``monitor``).
        monitor: an object with ``scalars(step, values, prefix)`` (the trainer's Monitor).

    Distributed: every rank measures its own device and writes its own ``rank{r}`` files;
    no collective.
    """

    enabled = True

    def __init__(self, cfg: Any, run_dir: Any, device: torch.device, is_main: bool, monitor: Any = None) -> None:
        p = cfg.profiling
        self.module_depth = int(getattr(p, "module_depth", 2))
        self.snapshot = bool(getattr(p, "memory_snapshot", False))
        self.snapshot_max_entries = int(getattr(p, "snapshot_max_entries", 100_000))
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.is_main = is_main
        self.monitor = monitor
        self.rank = _rank()
        self.meta = {"device": str(self.device), "rank": self.rank, "backbone": cfg.model.backbone,
                     "projector": cfg.model.projector, "loss": cfg.loss.name,
                     "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
                     "global_batch_size": cfg.train.global_batch_size}
        self.tracker: Optional[TensorByteTracker] = None
        if self.device.type == "cuda":
            self.scopes: Any = CudaScopes(self.device)
            self.meta["method"] = "cuda caching allocator (memory_allocated / max_memory_allocated)"
        else:
            self.tracker = TensorByteTracker(device_type=self.device.type)
            self.scopes = self.tracker
            self.meta["method"] = "dispatch-level tensor-byte accounting over a baseline of live tensors"
        self.baseline_bytes = 0
        self.steps: list[dict] = []
        self.modules: dict[str, dict[str, int]] = {}
        self._phase_peaks: dict[str, int] = {}
        self._step_scope: Optional[Scope] = None
        self._handles: list[Any] = []
        self._bw_scopes: dict[str, list[Scope]] = {}
        self._attached = False
        self._closed = False

    # ------------------------------------------------------------------ the trainer's calls
    def attach(self, model: nn.Module) -> None:
        """Start measuring: baseline (CPU), hooks on the backbone, the projector and every
        module up to ``module_depth``, allocator history (CUDA, if asked)."""
        if self._attached:
            return
        if self.tracker is not None:
            alive = live_tensors(self.device.type)
            self.tracker.track(alive, category="baseline")
            self.baseline_bytes = storage_bytes(alive)
            self.tracker.__enter__()  # the dispatch mode stays on until close()
        else:
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            if self.snapshot:
                torch.cuda.memory._record_memory_history(max_entries=self.snapshot_max_entries)
        for name, module in model.named_modules():
            depth = 0 if not name else name.count(".") + 1
            if name in HOOKED_PHASES or 0 < depth <= self.module_depth:
                self._hook(name, module)
        self._attached = True
        self._step_scope = self.scopes.open_scope("step")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        scope = self.scopes.open_scope(name)
        try:
            yield
        finally:
            self._record_phase(name, self.scopes.close_scope(scope))
            if name == "backward":  # modules whose inputs need no gradient never report an end
                for scopes in self._bw_scopes.values():
                    for s in scopes:
                        self._record_module(s.name, "backward_peak", self.scopes.close_scope(s))
                self._bw_scopes.clear()

    def end_step(self, step: int) -> None:
        """Close the step's window: record, log to TensorBoard, start the next window."""
        if self._step_scope is None:
            return
        scope = self.scopes.close_scope(self._step_scope)
        record = {"step": int(step), "peak_bytes": scope.peak, "end_bytes": scope.end,
                  "phases": dict(self._phase_peaks)}
        self.steps.append(record)
        if self.monitor is not None and self.is_main:
            values = {f"{k}_peak_mib": v / 2**20 for k, v in self._phase_peaks.items()}
            values["step_peak_mib"] = scope.peak / 2**20
            self.monitor.scalars(step, values, prefix="memory")
        self._phase_peaks = {}
        self._step_scope = self.scopes.open_scope("step")

    def close(self) -> None:
        """Stop measuring and write ``memory/rank{r}.*``."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.tracker is not None and self._attached:
            self.tracker.__exit__(None, None, None)
        out = self.run_dir / MEMORY_DIR
        out.mkdir(parents=True, exist_ok=True)
        if self.device.type == "cuda" and self.snapshot and self._attached:
            torch.cuda.memory._dump_snapshot(str(out / f"rank{self.rank}_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.write(out)

    # ------------------------------------------------------------------ results
    def summary(self) -> dict:
        """Everything measured so far, as written to ``rank{r}.json``."""
        steady = self.steps[1:] or self.steps
        phases = sorted({k for s in self.steps for k in s["phases"]}, key=_phase_order)
        train_phases = [k for k in phases if k != "data"]
        return {
            **self.meta,
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": max((s["peak_bytes"] for s in self.steps), default=0),
            "steady_peak_bytes": max((s["peak_bytes"] for s in steady), default=0),
            # the step without the data phase (on CPU that phase holds the input pipeline's own tensors)
            "steady_train_peak_bytes": max((s["phases"].get(k, 0) for s in steady for k in train_phases), default=0),
            "phase_peaks": {k: max(s["phases"].get(k, 0) for s in self.steps) for k in phases},
            "steady_phase_peaks": {k: max(s["phases"].get(k, 0) for s in steady) for k in phases},
            "modules": self.modules,
            "steps": self.steps,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def write(self, out: Path) -> Path:
        summary = self.summary()
        path = out / f"rank{self.rank}.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        with open(out / f"rank{self.rank}_phases.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "phase", "peak_bytes"])
            for s in self.steps:
                w.writerow([s["step"], "step", s["peak_bytes"]])
                for k, v in s["phases"].items():
                    w.writerow([s["step"], k, v])
        with open(out / f"rank{self.rank}_modules.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["module", "forward_peak_bytes", "backward_peak_bytes"])
            for name, v in self.modules.items():
                w.writerow([name, v.get("forward_peak", ""), v.get("backward_peak", "")])
        return path

    # ------------------------------------------------------------------ hooks
    def _record_phase(self, name: str, scope: Scope) -> None:
        self._phase_peaks[name] = max(self._phase_peaks.get(name, 0), scope.peak)

    def _record_module(self, name: str, key: str, scope: Scope) -> None:
        entry = self.modules.setdefault(name, {})
        entry[key] = max(entry.get(key, 0), scope.peak)

    def _hook(self, name: str, module: nn.Module) -> None:
        from torch.autograd.graph import register_multi_grad_hook

        phase = HOOKED_PHASES.get(name)
        open_fw: list[Scope] = []

        def pre_forward(mod, args):
            if self.tracker is not None and phase == "backbone_forward":
                self.tracker.track([a for a in args if isinstance(a, torch.Tensor)], category="inputs")
            open_fw.append(self.scopes.open_scope(name))

        def post_forward(mod, args, output):
            scope = self.scopes.close_scope(open_fw.pop())
            if phase is not None:
                self._record_phase(phase, scope)
            self._record_module(name, "forward_peak", scope)
            if not torch.is_grad_enabled():
                return
            outs = [t for t in _flat_tensors(output) if t.requires_grad]
            ins = [t for t in _flat_tensors(args) if t.requires_grad]
            if not outs:
                return
            bw: list[Scope] = []

            def pre_backward(grads):
                scope = self.scopes.open_scope(name)
                bw.append(scope)
                self._bw_scopes.setdefault(name, []).append(scope)

            def post_backward(grads):
                if bw:
                    scope = bw.pop()
                    pending = self._bw_scopes.get(name, [])
                    if scope in pending:
                        pending.remove(scope)
                    self._record_module(name, "backward_peak", self.scopes.close_scope(scope))

            register_multi_grad_hook(outs, pre_backward, mode="any")
            if ins:
                register_multi_grad_hook(ins, post_backward, mode="all")

        self._handles.append(module.register_forward_pre_hook(pre_forward))
        self._handles.append(module.register_forward_hook(post_forward))


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _phase_order(name: str) -> int:
    return PHASES.index(name) if name in PHASES else len(PHASES)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def build_profiler(cfg: Any, run_dir: Any, device: Any, is_main: bool, monitor: Any = None):
    """The profiler for ``cfg.profiling``: a `StepProfiler`, or a `NullProfiler` when disabled."""
    if not getattr(cfg.profiling, "enabled", False):
        return NullProfiler()
    return StepProfiler(cfg, run_dir, device, is_main, monitor)
