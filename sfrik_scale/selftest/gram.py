"""Part 5 of the self-test: the Gram on CUDA.

``kernel_mean`` (L = 3, the paper's coefficients) forward+backward against its GEMM floor,
the two matrix products it cannot avoid (Z Z^T and Phi' Z, in the input's dtype), for fp32
inputs with TF32 off and on and for bf16 inputs; then SFRIK against VICReg for a full
trainer step at q = 16384 (:func:`.training.compare_methods`).
"""
from __future__ import annotations

import statistics
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .common import SFRIK, VICREG, Deadline
from .worker import record_partial

#: (label, input dtype, TF32 for fp32 matrix products)
DTYPES = (("fp32", torch.float32, False), ("fp32+TF32", torch.float32, True), ("bf16", torch.bfloat16, False))
FULL_NS, FULL_QS = (1024, 2048, 4096, 8192), (8192, 16384, 32768, 65536)
QUICK_SIZES = ((1024, 8192), (4096, 32768), (8192, 65536))
#: the paper: SFRIK 19% faster than VICReg at q = 16384, batch 2048 on 8 GPUs
PAPER_SPEEDUP = 0.19


def grid(quick: bool) -> list[tuple[int, int]]:
    return list(QUICK_SIZES) if quick else [(n, q) for n in FULL_NS for q in FULL_QS]


def _time(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_gram(n: int, q: int, dtype: torch.dtype, tf32: bool, device: torch.device, repeats: int = 3) -> dict:
    from ..benchmarks.loss import LEGENDRE_L3
    from ..gram import kernel_mean
    from ..kernels import TruncatedLegendre

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        g = torch.Generator(device=device).manual_seed(0)
        z = F.normalize(torch.randn(n, q, device=device, generator=g), dim=1).to(dtype).requires_grad_(True)
        kernel = TruncatedLegendre(LEGENDRE_L3, q)

        def floor() -> None:
            with torch.no_grad():
                _ = (z @ z.T) @ z

        def forward_backward() -> None:
            z.grad = None
            kernel_mean(z, kernel).backward()

        t_floor = _time(floor, repeats, device)
        t_mean = _time(forward_backward, repeats, device)
        peak = None
        if device.type == "cuda":
            z.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            forward_backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) - base
        flops = 4.0 * n * n * q
        return {"n": n, "q": q, "floor_ms": 1e3 * t_floor, "kernel_mean_ms": 1e3 * t_mean, "x_floor": t_mean / t_floor,
                "floor_tflops": flops / t_floor / 1e12, "peak_extra_mib": None if peak is None else peak / 2**20}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def gram_table(quick: bool, deadline: Deadline, sizes: Optional[Sequence[tuple[int, int]]] = None,
               device: Optional[torch.device] = None, repeats: int = 3) -> list[dict]:
    device = device or torch.device("cuda", 0)
    rows: list[dict] = []
    for label, dtype, tf32 in DTYPES:
        for n, q in grid(quick) if sizes is None else sizes:
            if not deadline.allows(2):
                rows.append({"dtype": label, "n": n, "q": q, "error": "not run: time box"})
                continue
            try:
                rows.append({"dtype": label, **measure_gram(n, q, dtype, tf32, device, repeats)})
            except Exception as err:  # noqa: BLE001 - recorded; the next size runs
                rows.append({"dtype": label, "n": n, "q": q, "error": f"{type(err).__name__}: {err}"[:300]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            record_partial({"gram": rows})
    return rows


def gram_part(quick: bool, work: str, timeout: float, sizes: Optional[Sequence] = None, device: Optional[str] = None,
              step_sizes: Optional[dict] = None) -> dict:
    """Part 5. ``sizes``, ``device`` and ``step_sizes`` (the step comparison's batch, q and model)
    are for the CPU tests."""
    from .training import compare_methods

    deadline = Deadline(timeout)
    # the step comparison gets its share first: the kernel grid fills the rest of the time box
    grid_deadline = Deadline(max(deadline.left() - (30 if quick else 45), 5), margin=0)
    rows = gram_table(quick, grid_deadline, sizes, torch.device(device) if device else None)
    steps = compare_methods(quick, work, deadline, **(step_sizes or {}))
    checks = [{"name": f"kernel_mean {r['dtype']} N={r['n']} q={r['q']}", "ok": False, "detail": r["error"]}
              for r in rows if "error" in r and not r["error"].startswith("not run")]
    checks += [{"name": f"{r['method']} step timing", "ok": False, "detail": r["error"]}
               for r in steps["rows"] if "error" in r and not r["error"].startswith("not run")]
    timed = {r["method"]: r for r in steps["rows"] if "ms_per_step" in r}
    note = steps.get("note")
    if SFRIK in timed and VICREG in timed:
        faster = 1 - timed[SFRIK]["ms_per_step"] / timed[VICREG]["ms_per_step"]
        note = (f"SFRIK step {100 * faster:+.1f}% faster than VICReg at q={timed[SFRIK]['q']}, "
                f"{timed[SFRIK]['per_gpu_batch']} per GPU (paper: {100 * PAPER_SPEEDUP:.0f}% on 8 GPUs)")
    gram_rows = [[r["dtype"], r["n"], r["q"], _r(r.get("floor_ms")), _r(r.get("kernel_mean_ms")), _r(r.get("x_floor"), 2),
                  _r(r.get("floor_tflops")), _r(r.get("peak_extra_mib")), r.get("error", "")] for r in rows]
    step_rows = [[r["method"], r.get("per_gpu_batch"), r.get("q"), r.get("precision"), r.get("zero_stage"),
                  _r(r.get("ms_per_step")), _r(r.get("images_per_s")),
                  _r(r["peak_bytes"] / 1e9, 2) if r.get("peak_bytes") else None, r.get("error", "")]
                 for r in steps["rows"]]
    return {"gram": rows, "steps": steps["rows"], "checks": checks, "note": note,
            "tables": [{"title": "kernel_mean (L = 3) forward+backward against the GEMM floor (Z Z^T, Phi' Z)",
                        "headers": ["dtype", "N", "q", "floor ms", "kernel_mean ms", "x floor", "floor TFLOP/s",
                                    "peak extra MiB", "error"], "rows": gram_rows},
                       {"title": "full trainer step (ResNet-50, 8192-8192-q, world size 1), median of timed steps",
                        "headers": ["method", "batch", "q", "precision", "ZeRO", "ms/step", "images/s", "peak GB",
                                    "error"], "rows": step_rows}]}


def _r(x, digits: int = 1):
    return None if x is None else round(float(x), digits)
