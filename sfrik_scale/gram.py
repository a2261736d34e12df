"""The chunked, exchange-based kernel mean over the global batch, with exact gradients.

    R(Z) = (1/N^2) sum_{i,j} phi(z_i . z_j),   Z = the global batch of N = n x world rows.

Each rank holds its shard z (n, q) and computes only its own n x N block of Gram rows,
one peer shard at a time, received around a ring (rank r sends to r+1 and receives from
r-1, overlapping the transfer with compute on the block it already has), and within a
shard c rows at a time. The gathered N x q matrix and the N x N Gram never exist.

Gradient for free: by symmetry dR/dz_i = (2/N^2) sum_j phi'(z_i.z_j) z_j, which needs
exactly the blocks this rank sees in the forward pass, so it is accumulated there
(G = sum_j phi'(t_ij) z_j, an n x q buffer) and backward needs no second exchange.

The degree-1 part c * t of phi is evaluated as c |sum_i z_i|^2 / N^2 from one all-reduced
q-vector (kernels.Kernel.linear_coeff): no Gram at all for it.

Per-rank extra memory: the fp32 copy of the shard (only for bf16/fp16 inputs), two ring
buffers, G, all n x q, plus O(n c) block temporaries: O((n + c) q + n c), linear in q and
independent of world size. Work per rank: O(n N q), 1/world of a full gather.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import comm
from .errors import NonFiniteInputError
from .kernels import Kernel

#: memory budget for the (n, c) block temporaries of one chunk when chunk_size is None
DEFAULT_BLOCK_BYTES = 256 * 2**20
#: how many (n, c) temporaries the kernel evaluation holds at once (t, P_l, P_l', ...)
_BLOCK_TEMPORARIES = 8


def default_chunk_size(n: int, block_rows: int, itemsize: int = 4) -> int:
    """Peer rows per chunk: the whole peer shard unless the (n, c) temporaries exceed
    DEFAULT_BLOCK_BYTES; never below 64 rows, where matrix products get inefficient."""
    fit = DEFAULT_BLOCK_BYTES // max(1, _BLOCK_TEMPORARIES * n * itemsize)
    return int(max(1, min(block_rows, max(64, fit))))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Gram blocks accumulate and polynomials evaluate in fp32 for bf16/fp16 inputs: P_2 of
    # t ~ 1/sqrt(q) cancels catastrophically in low precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_embeddings(z: torch.Tensor, kernel: Optional[Kernel], group: comm.Group = None,
                        name: str = "z", chunk_size: Optional[int] = None) -> None:
    """Check a shard on every rank; raise the same clear error on every rank, without a hang.

    Checks: a floating tensor of shape (n, q), n >= 1, q >= 2, q equal to the kernel's,
    a valid chunk_size, finite values, and the same (n, q) on all ranks. One small collective.
    """
    problem = None
    shape = (-1, -1)
    if not isinstance(z, torch.Tensor):
        problem = f"{name} must be a torch.Tensor, got {type(z).__name__}"
    elif z.ndim != 2:
        problem = f"{name} must be 2-D (n, q), got shape {tuple(z.shape)}"
    else:
        shape = tuple(z.shape)
        if not z.is_floating_point():
            problem = f"{name} must be a floating-point tensor, got dtype {z.dtype}"
        elif z.shape[0] < 1:
            problem = f"{name} has no rows (shape {shape})"
        elif z.shape[1] < 2:
            problem = f"{name} has q={z.shape[1]} columns; the sphere S^(q-1) needs q >= 2"
        elif kernel is not None and kernel.check_dim(z.shape[1], name) is not None:
            problem = kernel.check_dim(z.shape[1], name)
        elif chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                         or chunk_size < 1):
            problem = f"chunk_size must be a positive integer or None, got {chunk_size!r}"
        # A NaN/Inf anywhere makes the float64 sum non-finite (finite fp32/bf16 inputs cannot
        # overflow it): no (n, q) temporaries on the common path, where torch.isfinite would allocate
        # about three shard-sized ones. The exact count only on the error path.
        elif not bool(torch.isfinite(z.detach().sum(dtype=torch.float64))):  # host sync: one flag
            bad = ~torch.isfinite(z.detach())
            if bool(bad.any()):  # else: finite float64 values whose sum overflowed; nothing wrong
                rows = torch.nonzero(bad.any(dim=1)).flatten()
                problem = (f"{name} holds {int(bad.sum())} non-finite values (NaN/Inf) in "
                           f"{rows.numel()} rows, first at row {int(rows[0])}")
    try:
        comm.agree_across_ranks(problem, shape, what=f"shard shapes (n, q) of {name}", group=group)
    except ValueError as err:
        if "non-finite" in str(err):  # lets the trainer's divergence policy tell it apart
            raise NonFiniteInputError(str(err)) from None
        raise


class _KernelMean(torch.autograd.Function):
    """Forward: the global kernel mean and its per-term parts; backward: the saved G."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, kernel: Kernel, chunk_size: Optional[int], group: comm.Group):  # type: ignore[override]
        _, world = comm.rank_and_world(group)
        n, _ = z.shape
        total_rows = n * world
        need_grad = ctx.needs_input_grad[0]
        zc = z.detach().to(_compute_dtype(z.dtype)).contiguous()  # a copy only for bf16/fp16
        chunk = chunk_size or default_chunk_size(n, n, zc.element_size())

        # Degree-1 part: sum_{i,j} z_i.z_j = |sum_i z_i|^2, one all-reduced q-vector.
        col_sum = zc.sum(dim=0)
        comm.all_reduce_(col_sum, group)
        c = float(kernel.linear_coeff)
        linear = c * torch.dot(col_sum.double(), col_sum.double())

        sums = torch.zeros(len(kernel.term_names) if kernel.has_residual else 0,
                           dtype=torch.float64, device=z.device)
        grad_acc = torch.zeros_like(zc) if (need_grad and kernel.has_residual) else None
        if kernel.has_residual:
            ring = comm.RingExchange(group) if world > 1 else None
            buffers = [torch.empty_like(zc), torch.empty_like(zc)] if world > 1 else []
            block = zc
            for step in range(world):
                nxt = None
                if step < world - 1:
                    nxt = buffers[step % 2]
                    ring.start(block, nxt)  # overlap: the next peer shard travels meanwhile
                for start in range(0, block.shape[0], chunk):
                    rows = block[start:start + chunk]
                    t = zc @ rows.T  # (n, c) Gram block, fp32 accumulation
                    block_sums, dphi = kernel.residual_block(t, need_grad)
                    sums += block_sums
                    if need_grad:
                        grad_acc.addmm_(dphi, rows)  # G_i += sum_j phi'(t_ij) z_j
                    del t, dphi
                if nxt is not None:
                    ring.wait()
                    block = nxt
            del buffers
            comm.all_reduce_(sums, group)  # this rank's rows -> all N x N pairs
            if grad_acc is not None and c:
                grad_acc.add_(col_sum, alpha=c)  # sum_j c z_j = c * col_sum: fold in now, in place

        norm = float(total_rows) ** 2
        terms = torch.cat([linear.reshape(1), sums]) / norm
        value = terms.sum()
        if need_grad:
            ctx.group, ctx.world, ctx.norm, ctx.c = group, world, norm, c
            ctx.out_dtype, ctx.n = z.dtype, n
            ctx.save_for_backward(grad_acc if grad_acc is not None else torch.empty(0), col_sum)
            ctx.has_residual = grad_acc is not None
        out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        ctx.mark_non_differentiable(terms)
        return value.to(out_dtype), terms

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor, grad_terms: torch.Tensor):  # type: ignore[override]
        grad_acc, col_sum = ctx.saved_tensors
        # Objective = mean of per-rank losses (engine averaging): the exact upstream factor for
        # this rank's rows is the sum over ranks of each rank's upstream gradient. One scalar
        # all-reduce; equals world * grad_value when every rank uses the value alike.
        g = grad_value.detach().to(torch.float64).reshape(1).clone()
        comm.all_reduce_(g, ctx.group)
        scale = 2.0 * float(g) / ctx.norm
        if ctx.has_residual:
            grad = grad_acc * scale  # one new (n, q) tensor; G itself stays intact for retain_graph
        else:
            grad = (col_sum * (ctx.c * scale)).expand(ctx.n, -1).contiguous()
        return grad.to(ctx.out_dtype), None, None, None


def term_names(kernel: Kernel) -> tuple[str, ...]:
    """Names of the per-term parts returned by ``kernel_mean(..., return_terms=True)``."""
    return (kernel.linear_term_name,) + (kernel.term_names if kernel.has_residual else ())


def kernel_mean(z: torch.Tensor, kernel: Kernel, chunk_size: Optional[int] = None,
                group: comm.Group = None, return_terms: bool = False, check_inputs: bool = True
                ) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(1/N^2) sum_{i,j} phi(z_i . z_j) over the global batch, diagonal included.

    Args:
        z: this rank's shard, shape (n, q), any float dtype. Not normalised here: pass
            L2-normalised rows for an MMD on the sphere.
        kernel: a ``kernels.Kernel`` built for the same q.
        chunk_size: peer rows per Gram block; None picks one from the sizes
            (``default_chunk_size``). With it set, no N x N matrix is ever formed, even in
            a single process.
        group: process group (None: the default group, or a single process).
        return_terms: also return a dict of the detached per-term parts (for SFRIK each
            order's b_l * mean P_l), which sum to the value.
        check_inputs: run ``validate_embeddings`` (one small collective and host sync).
            Only a caller that has just validated the same tensor should pass False.

    Returns:
        The value (0-dim; fp32 for fp32/bf16/fp16 inputs, fp64 for fp64), identical on every
        rank; with ``return_terms``, (value, {name: 0-dim fp64 tensor}).

    Distributed:
        Global: the value and its terms (every rank sees the whole batch through the ring).
        Local: the Gram rows of this rank's shard and their gradient. Collectives: one
        metadata all-gather (input checks), one all-reduce of the q-vector sum (degree-1
        part), world-1 ring steps of one (n, q) shard each, one all-reduce of the per-term
        sums, and in backward one scalar all-reduce of the upstream gradient. Gradient convention: this rank's gradient,
        divided by world size, equals its rows of the single-process gradient on the
        concatenated batch, so DeepSpeed/DDP gradient averaging yields the exact
        single-process parameter gradients. Without a process group: plain single process.

    Example:
        >>> from sfrik_scale.kernels import TruncatedLegendre
        >>> z = torch.nn.functional.normalize(torch.randn(256, 512), dim=1)
        >>> kernel_mean(z, TruncatedLegendre((1.0, 40.0, 40.0), q=512))
    """
    if check_inputs:
        validate_embeddings(z, kernel, group, chunk_size=chunk_size)
    value, terms = _KernelMean.apply(z, kernel, chunk_size, group)
    if not return_terms:
        return value
    return value, dict(zip(term_names(kernel), terms.unbind(0)))


def mmd2(z: torch.Tensor, kernel: Kernel, chunk_size: Optional[int] = None,
         group: comm.Group = None) -> torch.Tensor:
    """The squared MMD between the batch and the uniform law: kernel_mean - b_0 (>= 0 for a
    positive-definite kernel on normalised rows). Same arguments and distributed behaviour
    as ``kernel_mean``."""
    return kernel_mean(z, kernel, chunk_size=chunk_size, group=group) - kernel.b0


def dense_kernel_mean(z: torch.Tensor, kernel: Kernel, group: comm.Group = None) -> torch.Tensor:
    """The naive baseline: differentiable all-gather of the whole batch and a dense N x N Gram
    on every rank. O(N q) gathered memory plus O(N^2) per rank; for benchmarks and tests.

    Distributed: the same value and gradient convention as ``kernel_mean`` (the gather's
    backward all-reduces the gradient), at world times the work and memory.
    """
    validate_embeddings(z, kernel, group)
    zc = z.to(_compute_dtype(z.dtype))
    full = comm.all_gather_rows(zc, group)
    return kernel.phi(full @ full.T).mean()
