"""The one place that talks to ``deepspeed.comm`` / ``torch.distributed``.

Every helper falls back to world size 1 when no process group is initialised, so
losses and the Gram code run unchanged in a single process.

Backend choice: when DeepSpeed's communication backend is initialised
(``deepspeed.init_distributed`` or ``deepspeed.initialize``), collectives go through
``deepspeed.comm`` so that DeepSpeed's comms logger sees them; otherwise through
``torch.distributed``. Both take the same torch ``ProcessGroup`` objects.

Gradient convention of the differentiable collectives (`all_reduce_sum`,
`all_gather_rows`): the training objective is the mean of the per-rank losses, which
DDP/DeepSpeed realise by averaging gradients over ranks. For that objective the exact
gradient of a rank's own input is the sum over ranks of the upstream gradients
(``backward = all_reduce(grad)``); divided by world size (the engine's averaging) it is
the single-process gradient on the concatenated batch.
"""
from __future__ import annotations

import re
import sys
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

# DeepSpeed's comm (ours, whose profiler and logger see every collective, and ZeRO's own
# partition gathers and ZeRO 3's reduce-scatters) still calls torch's all_gather_into_tensor
# and reduce_scatter_tensor, which torch >= 2.14 deprecates
# with a FutureWarning on every rank, again after every change of the warning filters. It is not
# the user's to act on: ignored for the process, from the first import of this module.
_GATHER_DEPRECATION = r"`?torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`? is deprecated"
warnings.filterwarnings("ignore", message=_GATHER_DEPRECATION, category=FutureWarning)

Group = Optional[Any]


def _deepspeed_comm():
    """``deepspeed.comm`` when DeepSpeed was imported and its backend initialised, else None.

    Checked through ``sys.modules`` so that importing this module never imports DeepSpeed.
    """
    if "deepspeed" not in sys.modules:
        return None
    try:
        import deepspeed.comm as dscomm
    except Exception:  # pragma: no cover - broken DeepSpeed install
        return None
    try:
        return dscomm if dscomm.is_initialized() else None
    except Exception:  # pragma: no cover
        return None


def _backend():
    ds = _deepspeed_comm()
    return ds if ds is not None else dist


def is_distributed(group: Group = None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: Group = None) -> tuple[int, int]:
    """(rank within ``group``, size of ``group``); (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: Group, group_rank: int) -> int:
    """Global rank of ``group_rank`` within ``group`` (identity for the default group)."""
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


# ----------------------------------------------------------------------------------------
# Plain (non-differentiable) collectives: for detached metrics and bookkeeping only.
# ----------------------------------------------------------------------------------------
def all_reduce_(tensor: torch.Tensor, group: Group = None) -> torch.Tensor:
    """In-place SUM all-reduce (no autograd). Identity without a process group."""
    if is_distributed(group):
        _backend().all_reduce(tensor, group=group)
    return tensor


def all_reduce_async_(tensor: torch.Tensor, group: Group = None) -> Optional[Any]:
    """Start an in-place SUM all-reduce; returns the work handle (``.wait()`` before reading
    ``tensor``), or None without a process group (``tensor`` is already the result)."""
    if not is_distributed(group):
        return None
    return _backend().all_reduce(tensor, group=group, async_op=True)


def barrier(group: Group = None) -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed(group):
        _backend().barrier(group=group)


def all_gather_tensor(tensor: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Concatenate equally-shaped tensors of all ranks along dim 0 (no autograd)."""
    if not is_distributed(group):
        return tensor
    _, world = rank_and_world(group)
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    backend = _backend()
    if backend is dist and hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, tensor, group=group)  # torch >= 2.14's name for it
        return out
    backend.all_gather_into_tensor(out, tensor, group=group)  # DeepSpeed's comm: see _GATHER_DEPRECATION
    return out


def all_gather_objects(obj: Any, group: Group = None) -> list:
    """Every rank's picklable ``obj``, in rank order (error paths and set-up only)."""
    if not is_distributed(group):
        return [obj]
    _, world = rank_and_world(group)
    out: list = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def is_communication_error(err: BaseException) -> bool:
    """A collective or connection failure (gloo/NCCL), as opposed to an error of our own."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection", "peer", "timed out", "socket"))


def short_error(err: BaseException, limit: int = 160) -> str:
    """The gist of an error in one short line: a gloo/NCCL message loses its source location
    ("[.../pair.cc:545] ") and its advice after the first sentence."""
    text = " ".join(str(err).split())
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp|py):\d+\]\s*", "", text)
    if is_communication_error(err):
        text = text.split(". ", 1)[0].rstrip(".")
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _flag_device(group: Group) -> torch.device:
    backend = dist.get_backend(group) if dist.is_initialized() else "gloo"
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_across_ranks(problem: Optional[str], values: Sequence[int] = (), what: str = "values",
                       group: Group = None) -> None:
    """Raise the same ValueError on every rank if any rank reports a problem or ``values`` differ.

    Every rank must call this (it is a collective), with ``problem=None`` when its own input
    is fine; ``values`` (ints, e.g. a shard's shape) must then agree on all ranks. Cost when
    all is well: one all-gather of a few integers. Messages are gathered only on the error
    path, and the error names the failing ranks, so no rank is left waiting in a collective.
    """
    values = [int(v) for v in values]
    if not is_distributed(group):
        if problem is not None:
            raise ValueError(problem)
        return
    _, world = rank_and_world(group)
    local = torch.tensor([[0 if problem is None else 1] + values], dtype=torch.int64,
                         device=_flag_device(group))
    gathered = all_gather_tensor(local, group).cpu()  # host sync: a few ints, once per call
    if bool(gathered[:, 0].any()):
        messages = all_gather_objects(problem, group)
        bad = [(r, m) for r, m in enumerate(messages) if m is not None]
        text = "; ".join(f"rank {r}: {m}" for r, m in bad)
        raise ValueError(f"invalid input on {len(bad)} of {world} ranks: {text}")
    if values and not bool((gathered[:, 1:] == gathered[0, 1:]).all()):
        per_rank = ", ".join(f"rank {r}: {tuple(gathered[r, 1:].tolist())}" for r in range(world))
        raise ValueError(f"{what} differ across ranks ({per_rank})")


# ----------------------------------------------------------------------------------------
# Point-to-point ring exchange (used by the chunked Gram).
# ----------------------------------------------------------------------------------------
class RingExchange:
    """One step of a ring: send a block to rank+1 and receive one from rank-1 (async).

    ``start(send, recv)`` posts both operations and returns immediately, so the caller
    can compute on the block it already holds; ``wait()`` completes them.
    """

    def __init__(self, group: Group = None) -> None:
        rank, world = rank_and_world(group)
        self.group = group
        self.rank, self.world = rank, world
        self.next = global_rank(group, (rank + 1) % world)
        self.prev = global_rank(group, (rank - 1) % world)
        self._works: list = []

    def start(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        backend = _backend()
        # Even ranks send first, odd ranks receive first: no ordering deadlock on
        # backends whose isend may block (gloo with large messages).
        if self.rank % 2 == 0:
            self._works = [backend.isend(send, self.next, group=self.group),
                           backend.irecv(recv, self.prev, group=self.group)]
        else:
            self._works = [backend.irecv(recv, self.prev, group=self.group),
                           backend.isend(send, self.next, group=self.group)]

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []


# ----------------------------------------------------------------------------------------
# Differentiable collectives (rule 3: collectives in differentiable code are autograd-aware).
# ----------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.detach().clone().contiguous()
        return all_reduce_(out, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.detach().clone().contiguous()
        return all_reduce_(grad, ctx.group), None


def all_reduce_sum(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Differentiable SUM over ranks; backward all-reduces the gradient (module docstring)."""
    if not is_distributed(group):
        return x
    return _AllReduceSum.apply(x, group)


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank, _ = rank_and_world(group)
        ctx.n = x.shape[0]
        return all_gather_tensor(x.detach(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = all_reduce_(grad.detach().clone().contiguous(), ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def all_gather_rows(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Differentiable concatenation of every rank's ``x`` (same shape) along dim 0.

    Holds the gathered tensor: use only where the method itself needs the whole batch
    (SimCLR's global negatives). Backward: all-reduce of the gathered gradient, then the
    rows of this rank (module docstring).
    """
    if not is_distributed(group):
        return x
    return _AllGatherRows.apply(x, group)
