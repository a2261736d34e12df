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


def embedding_problem(z: torch.Tensor, kernel: Optional[Kernel], name: str = "z",
                      chunk_size: Optional[int] = None) -> Optional[str]:
    """What is wrong with this rank's shard apart from its values (None: nothing): a floating
    tensor of shape (n, q), n >= 1, q >= 2, q equal to the kernel's, a valid chunk_size.
    Local, no collective, no pass over the values: callers run it before computing anything
    from z (a reduction to hand ``validate_embeddings`` as ``finite_hint``)."""
    if not isinstance(z, torch.Tensor):
        return f"{name} must be a torch.Tensor, got {type(z).__name__}"
    if z.ndim != 2:
        return f"{name} must be 2-D (n, q), got shape {tuple(z.shape)}"
    shape = tuple(z.shape)
    if not z.is_floating_point():
        return f"{name} must be a floating-point tensor, got dtype {z.dtype}"
    if z.shape[0] < 1:
        return f"{name} has no rows (shape {shape})"
    if z.shape[1] < 2:
        return f"{name} has q={z.shape[1]} columns; the sphere S^(q-1) needs q >= 2"
    if kernel is not None and kernel.check_dim(z.shape[1], name) is not None:
        return kernel.check_dim(z.shape[1], name)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        return f"chunk_size must be a positive integer or None, got {chunk_size!r}"
    return None


def _non_finite_problem(z: torch.Tensor, name: str, finite_hint: Optional[torch.Tensor]) -> Optional[str]:
    # A NaN/Inf anywhere makes any sum over all entries non-finite (finite fp32/bf16 inputs cannot
    # overflow a float64 sum). With a hint (a reduction the caller computed anyway: column sums,
    # row norms) the common path reads only that; without one, a float64 sum of z: one pass, no
    # (n, q) temporaries. The exact count only on the error path.
    hint = finite_hint if finite_hint is not None else z.detach().sum(dtype=torch.float64)
    if bool(torch.isfinite(hint).all()):  # host sync: one flag
        return None
    bad = ~torch.isfinite(z.detach())
    if not bool(bad.any()):  # finite values whose sum overflowed: nothing wrong
        return None
    rows = torch.nonzero(bad.any(dim=1)).flatten()
    return (f"{name} holds {int(bad.sum())} non-finite values (NaN/Inf) in "
            f"{rows.numel()} rows, first at row {int(rows[0])}")


def validate_embeddings(z: torch.Tensor, kernel: Optional[Kernel], group: comm.Group = None,
                        name: str = "z", chunk_size: Optional[int] = None,
                        finite_hint: Optional[torch.Tensor] = None) -> None:
    """Check a shard on every rank; raise the same clear error on every rank, without a hang.

    Checks: ``embedding_problem`` (a floating tensor of shape (n, q), n >= 1, q >= 2, q equal
    to the kernel's, a valid chunk_size), finite values, and the same (n, q) on all ranks.
    One small collective.

    ``finite_hint``: optional, a reduction of z over all its entries that the caller computed
    anyway (e.g. its column sums or row norms; any shape), non-finite whenever z holds a NaN or
    an Inf. When it is finite the values need no pass of their own; when it is not, z itself
    is checked (finite values whose sum overflowed pass).
    """
    problem = embedding_problem(z, kernel, name, chunk_size)
    shape = tuple(z.shape) if isinstance(z, torch.Tensor) and z.ndim == 2 else (-1, -1)
    if problem is None:
        problem = _non_finite_problem(z, name, finite_hint)
    try:
        comm.agree_across_ranks(problem, shape, what=f"shard shapes (n, q) of {name}", group=group)
    except ValueError as err:
        if "non-finite" in str(err):  # lets the trainer's divergence policy tell it apart
            raise NonFiniteInputError(str(err)) from None
        raise


class _KernelMean(torch.autograd.Function):
    """Forward: the global kernel mean and its per-term parts; backward: the saved G."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, zc: torch.Tensor, col_sum: torch.Tensor, kernel: Kernel,  # type: ignore[override]
                chunk_size: Optional[int], group: comm.Group):
        # zc, col_sum: from _prepare (the caller used col_sum as the finiteness hint)
        _, world = comm.rank_and_world(group)
        n, _ = z.shape
        total_rows = n * world
        need_grad = ctx.needs_input_grad[0]
        chunk = chunk_size or default_chunk_size(n, n, zc.element_size())

        # Degree-1 part: sum_{i,j} z_i.z_j = |sum_i z_i|^2, one all-reduced q-vector.
        comm.all_reduce_(col_sum, group)
        c = float(kernel.linear_coeff)
        linear = c * torch.dot(col_sum.double(), col_sum.double())

        sums = torch.zeros(len(kernel.term_names) if kernel.has_residual else 0,
                           dtype=torch.float64, device=z.device)
        # G's first block product writes it (no zero fill, no read of zeros); later ones add
        grad_acc = torch.empty_like(zc) if (need_grad and kernel.has_residual) else None
        grad_written = False
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
                    block_sums, dphi = kernel.fused_residual_block(t, need_grad)
                    sums += block_sums
                    if need_grad:  # G_i += sum_j phi'(t_ij) z_j
                        if grad_written:
                            grad_acc.addmm_(dphi, rows)
                        else:
                            torch.mm(dphi, rows, out=grad_acc)
                            grad_written = True
                    del t, dphi
                if nxt is not None:
                    ring.wait()
                    block = nxt
            del buffers
            comm.all_reduce_(sums, group)  # this rank's rows -> all N x N pairs
            # the degree-1 part's gradient, sum_j c z_j = c * col_sum, joins G in backward's one pass

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
        if ctx.has_residual and ctx.c:
            # (G + c col_sum) * scale in one pass writing one new (n, q) tensor; G itself stays
            # intact for retain_graph
            grad = torch.add(col_sum * (ctx.c * scale), grad_acc, alpha=scale)
        elif ctx.has_residual:
            grad = grad_acc * scale
        else:
            grad = (col_sum * (ctx.c * scale)).expand(ctx.n, -1).contiguous()
        return grad.to(ctx.out_dtype), None, None, None, None, None


def _prepare(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard in the compute dtype (a copy only for bf16/fp16) and its column sums
    (local; the forward all-reduces them), which double as the finiteness hint."""
    zc = z.detach().to(_compute_dtype(z.dtype)).contiguous()
    return zc, zc.sum(dim=0)


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
    prepared = None
    if not check_inputs or embedding_problem(z, kernel, chunk_size=chunk_size) is None:
        prepared = _prepare(z)
    if check_inputs:  # the column sums, computed anyway, stand for the values' pass
        validate_embeddings(z, kernel, group, chunk_size=chunk_size, finite_hint=prepared[1] if prepared else None)
    value, terms = _KernelMean.apply(z, *prepared, kernel, chunk_size, group)
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
