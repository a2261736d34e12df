"""Plumbing shared by the evaluation commands: topology, shards, detached collectives, results, progress.

Distributed: the evaluation commands are data parallel over plain process groups (no
DeepSpeed engine: the models are small, or frozen). Every collective here goes through
``sfrik_scale.comm`` and is a plain one, used outside autograd: gradient and buffer
averaging after ``backward`` (what DDP does), metric sums, and gathering detached
features. Without a process group every helper is the single-process identity.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .. import comm
from ..storage import atomic_write_text
from ..topology import Topology, resolve_launch_env

RESULT_FILE = "result.json"
RESULT_SCHEMA = "sfrik-scale-eval/1"


# ----------------------------------------------------------------------------------------
# Topology
# ----------------------------------------------------------------------------------------
def eval_topology(local_rank: Optional[int] = None) -> Topology:
    """This process's place in the job, with a process group when there are several ranks.

    Works under ``deepspeed --module``, ``torchrun``, ``srun`` and a plain start (see
    `sfrik_scale.topology`). A process group that already exists (e.g. started by
    `sfrik_scale.spawn.run_ranks`) is reused; otherwise DeepSpeed's communication backend
    is started (NCCL on CUDA, gloo on CPU). A single process starts none.
    """
    launcher = resolve_launch_env(os.environ, local_rank)
    topo = Topology.from_env(os.environ, launcher)
    if topo.world_size > 1 and comm.rank_and_world()[1] != topo.world_size:
        from ..topology import init_distributed

        return init_distributed(local_rank)
    if topo.device.type == "cuda":
        torch.cuda.set_device(topo.device)
    return topo


# ----------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------
def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous block of ``range(n)``; blocks differ by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def padded_shard(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """(indices, valid): this rank's block padded to ``ceil(n / world)`` entries by repeating an index.

    Every rank then runs the same number of forward passes, which collectives inside a
    forward need (ZeRO-3 parameter gathering, SyncBatchNorm); the first ``valid`` entries
    are the real ones.
    """
    start, stop = shard_range(n, rank, world)
    length = -(-n // world) if n else 0
    indices = list(range(start, stop))
    filler = indices[-1] if indices else 0
    return indices + [filler] * (length - len(indices)), stop - start


# ----------------------------------------------------------------------------------------
# Detached collectives
# ----------------------------------------------------------------------------------------
def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace every gradient by its mean over ranks (one flat all-reduce; identity on one rank).

    Called after ``backward``: with equal local batch sizes the result is the gradient of
    the mean loss over the global batch, as DDP computes it.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    _, world = comm.rank_and_world()
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce_(flat).div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_floating_state(tensors: Sequence[torch.Tensor]) -> None:
    """Average floating-point tensors (BatchNorm running statistics, weights) over ranks, in place."""
    tensors = [t for t in tensors if t.is_floating_point()]
    _, world = comm.rank_and_world()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    comm.all_reduce_(flat).div_(world)
    offset = 0
    for t in tensors:
        t.data.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (row counts may differ), concatenated in rank order; detached.

    With contiguous shards (`shard_range`) the result is in dataset order.
    """
    _, world = comm.rank_and_world()
    if world == 1:
        return x
    counts = comm.all_gather_tensor(torch.tensor([x.shape[0]], device=x.device))
    counts = counts.tolist()  # host sync: a few ints, once per gather
    longest = max(counts)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    gathered = comm.all_gather_tensor(padded).view(world, longest, *x.shape[1:])
    return torch.cat([gathered[r, :counts[r]] for r in range(world)])


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64), returned on the host."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    return comm.all_reduce_(t).tolist()  # host sync: once per call


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------
def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Number of rows whose label is among the ``k`` highest scores, for each k (0-dim tensors, no sync).

    Shapes: scores (n, C), labels (n,). k larger than C counts every row.
    """
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices  # (n, kmax)
    hit = top.eq(labels.view(-1, 1))
    return [hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]


# ----------------------------------------------------------------------------------------
# Output: results, checkpoints, headers, progress
# ----------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    """Atomically write ``data`` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def base_result(kind: str, topo: Topology, source: dict, data: dict, hyperparameters: dict) -> dict:
    """The fields every result file shares (schema documented in docs/evaluation.md)."""
    return {"schema": RESULT_SCHEMA, "kind": kind, "benchmark": data.get("benchmark"),
            "transfer": data.get("transfer", False), "source": source, "data": data,
            "hyperparameters": hyperparameters, "world_size": topo.world_size, "device": str(topo.device)}


def finish_result(result: dict, out_dir: Path, topo: Topology, start: float) -> dict:
    """Stamp the wall time and write ``out_dir/result.json`` (rank 0; every rank returns once it exists)."""
    result["time_s"] = round(time.perf_counter() - start, 3)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if topo.is_main:
        write_json(out_dir / RESULT_FILE, result)
    comm.barrier()
    return result


def save_state(path: Path, state: dict, topo: Topology) -> None:
    """Rank 0 writes ``state`` with torch.save to a temporary name and renames it (crash-safe)."""
    if topo.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
    comm.barrier()


def print_header(console: Any, title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A two-column rich table of what runs where (rank 0's console only)."""
    if console is None:
        return
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None)
    table.add_column(style="bold cyan")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


class ProgressBar:
    """A rich progress bar on rank 0 when enabled; a no-op elsewhere.

    Example:
        >>> with ProgressBar(monitor.console, "train features", total=40) as bar:
        ...     bar.advance(1)
    """

    def __init__(self, console: Any, description: str, total: int, enabled: bool = True) -> None:
        self._progress = None
        if console is None or not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=console, transient=False)
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> "ProgressBar":
        if self._progress is not None:
            self._progress.start()
        return self

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


def fmt(value: Optional[float], spec: str = ".2f") -> str:
    """``value`` formatted, or "-" for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def default_out_dir(source_path: str, kind: str, benchmark: str, extra: Optional[str] = None) -> Path:
    """``RUN_OR_EXPORT/eval/<kind>-<benchmark>[-<extra>]``: results live next to the weights they judge."""
    p = Path(source_path)
    base = p.parent if p.is_file() else p
    return base / "eval" / "-".join(x for x in (kind, benchmark, extra) if x)
