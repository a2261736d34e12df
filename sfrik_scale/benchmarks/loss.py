"""``sfrik-scale bench loss``: forward+backward time and peak extra memory of the chunked kernel mean (L = 3)
next to (a) the floor, the two matrix products it cannot avoid (Z Z^T and Phi' Z), (b) the
naive route (differentiable all-gather + dense N x N Gram), (c) VICReg's q x q covariance
loss; then per-rank peak memory of the ring on 1, 2 and 4 gloo ranks at a very wide q.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..gram import dense_kernel_mean, kernel_mean
from ..kernels import TruncatedLegendre
from ..profiling.tracker import track_peak

LEGENDRE_L3 = (1.0, 40.0, 40.0)


@dataclass
class Measurement:
    method: str
    n: int
    q: int
    seconds: float
    peak_bytes: int


def _time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak(fn: Callable[[], None], live: Sequence[torch.Tensor]) -> int:
    with track_peak(*live) as mem:
        fn()
    return mem.peak_bytes


def loss_cases(n: int, q: int, seed: int = 0) -> tuple[dict[str, Callable[[], None]], list[torch.Tensor]]:
    """Closures running forward+backward of each compared method on one (n, q) batch, and the
    input tensors they share (alive before the measurement, so not counted as extra memory)."""
    from ..losses import SFRIKLoss, VICRegLoss

    g = torch.Generator().manual_seed(seed)
    raw1 = torch.randn(n, q, generator=g).requires_grad_(True)
    raw2 = (raw1.detach() + 0.1 * torch.randn(n, q, generator=g)).requires_grad_(True)
    z = F.normalize(raw1.detach(), dim=1).requires_grad_(True)
    kernel = TruncatedLegendre(LEGENDRE_L3, q)
    sfrik = SFRIKLoss(q, coeffs=LEGENDRE_L3, sim_coeff=4000.0)
    vicreg = VICRegLoss()

    def floor() -> None:
        with torch.no_grad():
            t = z @ z.T
            _ = t @ z

    def one_view(mean_fn) -> Callable[[], None]:
        def run() -> None:
            z.grad = None
            mean_fn(z, kernel).backward()
        return run

    def two_view(loss) -> Callable[[], None]:
        def run() -> None:
            raw1.grad = raw2.grad = None
            loss(raw1, raw2)["loss"].backward()
        return run

    cases = {"floor (ZZ^T, Phi'Z)": floor, "kernel_mean L=3": one_view(kernel_mean),
             "dense gather + NxN": one_view(dense_kernel_mean),
             "SFRIKLoss (2 views)": two_view(sfrik), "VICRegLoss (2 views)": two_view(vicreg)}
    return cases, [raw1, raw2, z]


def bench_loss_single(sizes: Sequence[tuple[int, int]], repeats: int = 3,
                      skip: Sequence[str] = ()) -> list[Measurement]:
    out = []
    for n, q in sizes:
        cases, live = loss_cases(n, q)
        for method, fn in cases.items():
            if any(s in method for s in skip):
                continue
            seconds = _time(fn, repeats)
            out.append(Measurement(method, n, q, seconds, _peak(fn, live)))
    return out


def _ring_memory_worker(rank: int, world: int, n: int, q: int) -> dict:
    """One rank: peak extra memory and time of kernel_mean fwd+bwd on an (n, q) fp32 shard."""
    g = torch.Generator().manual_seed(rank)
    z = F.normalize(torch.randn(n, q, generator=g), dim=1).requires_grad_(True)
    kernel = TruncatedLegendre(LEGENDRE_L3, q)
    kernel_mean(z, kernel).backward()  # warm-up
    z.grad = None
    start = time.perf_counter()
    with track_peak(z) as mem:
        kernel_mean(z, kernel).backward()
    return {"peak": mem.peak_bytes, "shard": z.numel() * z.element_size(),
            "seconds": time.perf_counter() - start}


def bench_loss_distributed(n: int, q: int, worlds: Sequence[int]) -> list[dict]:
    from ..spawn import run_ranks

    rows = []
    for world in worlds:
        results = run_ranks(_ring_memory_worker, world, n, q, timeout=600)
        worst = max(results, key=lambda r: r["peak"])
        rows.append({"world": world, "n": n, "N": n * world, "q": q, "peak": worst["peak"],
                     "shard": worst["shard"], "seconds": max(r["seconds"] for r in results)})
    return rows


def _mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def print_loss_tables(single: list[Measurement], dist_rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"kernel mean / SSL losses, forward+backward, fp32, {torch.get_num_threads()} CPU threads"
                  if not torch.cuda.is_available() else "forward+backward")
    for col in ("N", "q", "method", "time (ms)", "x floor", "peak extra (MiB)"):
        table.add_column(col, justify="right" if col != "method" else "left")
    by_size: dict[tuple[int, int], dict[str, Measurement]] = {}
    for m in single:
        by_size.setdefault((m.n, m.q), {})[m.method] = m
    for (n, q), methods in by_size.items():
        floor = next((m for k, m in methods.items() if k.startswith("floor")), None)
        for k, m in methods.items():
            ratio = f"{m.seconds / floor.seconds:.2f}" if floor else "-"
            table.add_row(str(n), str(q), k, f"{m.seconds * 1e3:,.1f}", ratio, _mib(m.peak_bytes))
        sfrik, vic = methods.get("SFRIKLoss (2 views)"), methods.get("VICRegLoss (2 views)")
        if sfrik and vic:
            table.add_row("", "", f"[bold]VICReg / SFRIK time: {vic.seconds / sfrik.seconds:.1f}x, "
                          f"memory: {vic.peak_bytes / max(sfrik.peak_bytes, 1):.1f}x", "", "", "")
        table.add_section()
    console.print(table)
    if dist_rows:
        t2 = Table(title="ring exchange: per-rank peak extra memory of kernel_mean fwd+bwd (gloo)")
        for col in ("ranks", "n/rank", "N", "q", "shard (MiB)", "peak extra (MiB)", "x shard", "time (s)"):
            t2.add_column(col, justify="right")
        for r in dist_rows:
            t2.add_row(str(r["world"]), str(r["n"]), str(r["N"]), str(r["q"]), _mib(r["shard"]),
                       _mib(r["peak"]), f"{r['peak'] / r['shard']:.2f}", f"{r['seconds']:.2f}")
        console.print(t2)


def run_loss_bench(sizes: Sequence[tuple[int, int]], repeats: int, dist_n: int, dist_q: int,
                   worlds: Sequence[int], skip: Sequence[str] = (), console=None) -> None:
    single = bench_loss_single(sizes, repeats, skip)
    dist_rows = bench_loss_distributed(dist_n, dist_q, worlds) if worlds else []
    print_loss_tables(single, dist_rows, console)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"1024x8192,256x2048" -> [(1024, 8192), (256, 2048)]."""
    sizes = []
    for item in text.split(","):
        try:
            n, q = item.lower().split("x")
            sizes.append((int(n), int(q)))
        except ValueError:
            raise ValueError(f"--sizes expects NxQ items separated by commas, got {item!r}") from None
    return sizes


def add_parser(sub):
    loss = sub.add_parser("loss", help="kernel mean vs floor, dense Gram and VICReg; ring memory")
    loss.add_argument("--sizes", default="256x2048,1024x8192", help="NxQ pairs, comma-separated")
    loss.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median reported)")
    loss.add_argument("--dist-n", type=int, default=64, help="rows per rank for the ring memory table")
    loss.add_argument("--dist-q", type=int, default=262144, help="embedding width for the ring memory table")
    loss.add_argument("--worlds", default="1,2,4", help="rank counts for the ring table ('' to skip)")
    loss.add_argument("--skip", default="", help="comma-separated method substrings to skip (e.g. VICReg)")
    return loss


def main(args) -> int:
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    skip = [s for s in args.skip.split(",") if s]
    run_loss_bench(parse_sizes(args.sizes), args.repeats, args.dist_n, args.dist_q, worlds, skip)
    return 0
