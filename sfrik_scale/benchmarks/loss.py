"""``sfrik-scale bench loss``: forward+backward time and peak extra memory of the chunked kernel mean (L = 3)
next to (a) the floor, the two matrix products it cannot avoid (Z Z^T and Phi' Z), (b) the
naive route (differentiable all-gather + dense N x N Gram), (c) VICReg's q x q covariance
loss; then per-rank peak memory of the ring on 1, 2 and 4 gloo ranks at a very wide q.

The kernel mean and SFRIK's loss run twice: as configured (``SFRIK_COMPILE``, default auto:
their element-wise passes compiled into fused loops for large blocks, ``sfrik_scale.fused``)
and eagerly, so one table shows what the fusion buys. Methods are timed round-robin, one
call of each per round, so that a machine whose load drifts slows them alike; the table
gives the median and the range over the rounds and the load average before and after.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import fused
from ..gram import dense_kernel_mean, kernel_mean
from ..kernels import TruncatedLegendre
from ..profiling.tracker import track_peak

LEGENDRE_L3 = (1.0, 40.0, 40.0)
FLOOR = "floor (ZZ^T, Phi'Z)"
#: issue 15's CPU targets, on the "x own floor" column
TARGETS = {"kernel_mean L=3": 1.15, "SFRIKLoss (2 views)": 1.30}
EAGER = ", eager"


@dataclass
class Measurement:
    method: str
    n: int
    q: int
    seconds: float
    peak_bytes: int
    #: every timed round, seconds (``seconds`` is their median)
    rounds: list = field(default_factory=list)
    #: how many views the method processes: its own floor is views x the one-view floor
    views: int = 1
    #: whether compiled (fused) passes ran, None when the method has none
    compiled: Optional[bool] = None


@dataclass
class Case:
    run: Callable[[], None]
    views: int = 1
    mode: Optional[str] = None  # SFRIK_COMPILE for this case (None: as configured)
    fusible: bool = False  # the method has element-wise passes that may be compiled


def _peak(fn: Callable[[], None], live: Sequence[torch.Tensor]) -> int:
    with track_peak(*live) as mem:
        fn()
    return mem.peak_bytes


def _in_mode(fn: Callable[[], None], mode: Optional[str]) -> Callable[[], None]:
    if mode is None:
        return fn

    def run() -> None:
        with fused.mode_set(mode):
            fn()
    return run


def loss_cases(n: int, q: int, seed: int = 0) -> tuple[dict[str, Case], list[torch.Tensor]]:
    """Each compared method's forward+backward on one (n, q) batch, and the input tensors they
    share (alive before the measurement, so not counted as extra memory)."""
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

    cases = {FLOOR: Case(floor),
             "kernel_mean L=3": Case(one_view(kernel_mean), fusible=True),
             "kernel_mean L=3" + EAGER: Case(one_view(kernel_mean), mode="never", fusible=True),
             "dense gather + NxN": Case(one_view(dense_kernel_mean)),
             "SFRIKLoss (2 views)": Case(two_view(sfrik), views=2, fusible=True),
             "SFRIKLoss (2 views)" + EAGER: Case(two_view(sfrik), views=2, mode="never", fusible=True),
             "VICRegLoss (2 views)": Case(two_view(vicreg), views=2)}
    if fused.mode() == "never":  # the configured rows are already eager
        cases = {k: c for k, c in cases.items() if not k.endswith(EAGER)}
    return cases, [raw1, raw2, z]


def bench_loss_single(sizes: Sequence[tuple[int, int]], repeats: int = 3,
                      skip: Sequence[str] = ()) -> list[Measurement]:
    """Each method's median over ``repeats`` rounds; a round calls every method once, in turn."""
    out = []
    for n, q in sizes:
        cases, live = loss_cases(n, q)
        cases = {k: c for k, c in cases.items() if not any(s in k for s in skip)}
        runs = {k: _in_mode(c.run, c.mode) for k, c in cases.items()}
        compiled = {}
        for k, fn in runs.items():  # warm-up: first-call allocations, kernel selection, compilation
            before = fused.compiled_calls()
            fn()
            compiled[k] = (fused.compiled_calls() > before) if cases[k].fusible else None
        rounds: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(max(1, repeats)):
            for k, fn in runs.items():
                start = time.perf_counter()
                fn()
                rounds[k].append(time.perf_counter() - start)
        for k, fn in runs.items():
            out.append(Measurement(k, n, q, statistics.median(rounds[k]), _peak(fn, live), rounds[k],
                                   cases[k].views, compiled[k]))
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


def floor_ratio(m: Measurement, floor: Optional[Measurement]) -> Optional[float]:
    """Time over the floor's: the median over rounds of each round's ratio (the two were timed
    in the same round, so load that drifts between rounds cancels), else of the medians."""
    if floor is None:
        return None
    if m.rounds and len(m.rounds) == len(floor.rounds):
        return statistics.median(a / b for a, b in zip(m.rounds, floor.rounds))
    return m.seconds / floor.seconds


def print_loss_tables(single: list[Measurement], dist_rows: list[dict], console=None,
                      load: Optional[tuple[float, float]] = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:  # nine columns: wider than 80 even when printing to a file or a pipe
        console = Console()
        console = Console(width=max(console.width, 140))
    title = (f"kernel mean / SSL losses, forward+backward, fp32, {torch.get_num_threads()} CPU threads"
             if not torch.cuda.is_available() else "forward+backward")
    caption = ["time: median of the rounds, range min-max; x floor: median of each round's time / floor; "
               "x own floor: that / views (the floor of a two-view loss is twice the one-view floor)",
               "targets (issue 15, CPU), x own floor: " + ", ".join(f"{k} <= {v:.2f}" for k, v in TARGETS.items()),
               "peak extra: dispatch-level accounting, which sees eager code only (a compiled row shows "
               "its eager path's figure)"]
    if load is not None:
        caption.append(f"load average (1 min): {load[0]:.2f} before, {load[1]:.2f} after")
    table = Table(title=title, caption="\n".join(caption))
    for col in ("N", "q", "method", "time (ms)", "x floor", "peak extra (MiB)", "range (ms)", "x own floor",
                "compiled"):
        table.add_column(col, justify="right" if col != "method" else "left")
    by_size: dict[tuple[int, int], dict[str, Measurement]] = {}
    for m in single:
        by_size.setdefault((m.n, m.q), {})[m.method] = m
    for (n, q), methods in by_size.items():
        floor = methods.get(FLOOR)
        for k, m in methods.items():
            x = floor_ratio(m, floor)
            ratio = f"{x:.2f}" if x is not None else "-"
            own = f"{x / m.views:.2f}" if x is not None else "-"
            spread = f"{min(m.rounds) * 1e3:,.1f}-{max(m.rounds) * 1e3:,.1f}" if m.rounds else "-"
            compiled = "-" if m.compiled is None else ("yes" if m.compiled else "no")
            table.add_row(str(n), str(q), k, f"{m.seconds * 1e3:,.1f}", ratio, _mib(m.peak_bytes), spread, own,
                          compiled)
        sfrik, vic = methods.get("SFRIKLoss (2 views)"), methods.get("VICRegLoss (2 views)")
        if sfrik and vic:
            table.add_row("", "", f"[bold]VICReg / SFRIK time: {vic.seconds / sfrik.seconds:.1f}x, "
                          f"memory: {vic.peak_bytes / max(sfrik.peak_bytes, 1):.1f}x", "", "", "", "", "", "")
        gains = [f"{k.split()[0]} {statistics.median(e / c for e, c in zip(methods[k + EAGER].rounds, methods[k].rounds)):.2f}x"
                 for k in TARGETS if k in methods and k + EAGER in methods]
        if gains:
            table.add_row("", "", "[bold]eager / configured time: " + ", ".join(gains), "", "", "", "", "", "")
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
    before = os.getloadavg()[0]
    single = bench_loss_single(sizes, repeats, skip)
    load = (before, os.getloadavg()[0])
    dist_rows = bench_loss_distributed(dist_n, dist_q, worlds) if worlds else []
    print_loss_tables(single, dist_rows, console, load)


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
    loss.add_argument("--repeats", type=int, default=3,
                      help="timed rounds, each calling every method once in turn (median and range reported)")
    loss.add_argument("--dist-n", type=int, default=64, help="rows per rank for the ring memory table")
    loss.add_argument("--dist-q", type=int, default=262144, help="embedding width for the ring memory table")
    loss.add_argument("--worlds", default="1,2,4", help="rank counts for the ring table ('' to skip)")
    loss.add_argument("--skip", default="",
                      help="comma-separated method substrings to skip (e.g. VICReg,dense,eager)")
    return loss


def main(args) -> int:
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    skip = [s for s in args.skip.split(",") if s]
    run_loss_bench(parse_sizes(args.sizes), args.repeats, args.dist_n, args.dist_q, worlds, skip)
    return 0
