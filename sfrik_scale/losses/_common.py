"""Helpers shared by the losses: input checks for the two views, normalisation, and the
coefficient checks. Kept tiny so that each loss module reads on its own."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import comm, fused
from ..gram import embedding_problem, validate_embeddings
from ..kernels import Kernel

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(z: torch.Tensor) -> torch.dtype:
    """float64 stays float64; bf16/fp16 are promoted to float32 (norms, softmax, covariance
    and polynomials lose too much in low precision); float32 stays float32."""
    return torch.float32 if z.dtype in _LOW_PRECISION else z.dtype


def unit_rows(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of z (n, q) in ``compute_dtype``; autograd casts the gradient back."""
    return F.normalize(z.to(compute_dtype(z)), dim=1)


def _normalised_pair(z1: torch.Tensor, z2: torch.Tensor):
    dtype = compute_dtype(z1)
    a, b = z1.to(dtype), z2.to(dtype)
    norm1, norm2 = a.norm(2, 1, keepdim=True), b.norm(2, 1, keepdim=True)
    z1n, z2n = a / norm1.clamp_min(1e-12), b / norm2.clamp_min(1e-12)  # = F.normalize, keeping the norms
    return z1n, z2n, F.mse_loss(z1n, z2n), norm1.detach(), norm2.detach()


_NORMALISED_PAIR = fused.Fusible(_normalised_pair, "the two views' normalisation and invariance")


def normalised_views(z1: torch.Tensor, z2: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(z1n, z2n, mean((z1n - z2n)^2), (|z1_i|, |z2_i|)): both views L2-normalised row-wise in
    ``compute_dtype`` (as ``unit_rows``), their invariance (``F.mse_loss``), and the row norms
    (n, 1), detached: ``validate_views``' finiteness hints. Compiled by ``fused`` into about
    two passes over each view forward and two backward for views of at least
    ``fused.COMPILE_MIN_ELEMENTS`` entries; eager otherwise. Local: no collective.
    Call only when ``views_problem`` finds nothing (it assumes two floating (n, q) tensors)."""
    z1n, z2n, invariance, norm1, norm2 = _NORMALISED_PAIR(z1, z2, elements=z1.numel())
    return z1n, z2n, invariance, (norm1, norm2)


def views_problem(z1: torch.Tensor, z2: torch.Tensor, kernel: Optional[Kernel] = None,
                  chunk_size: Optional[int] = None) -> Optional[str]:
    """What ``validate_views`` would reject without reading values, on this rank alone (None:
    nothing). Local, no collective: run it before computing anything from the views."""
    problem = embedding_problem(z1, kernel, "z1", chunk_size) or embedding_problem(z2, kernel, "z2", chunk_size)
    if problem is None and z1.shape != z2.shape:
        problem = "the views' shapes differ"
    return problem


def validate_views(z1: torch.Tensor, z2: torch.Tensor, group: comm.Group = None,
                   kernel: Optional[Kernel] = None, q: Optional[int] = None,
                   chunk_size: Optional[int] = None,
                   finite_hints: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """Check both views; every rank raises the same ValueError, none is left in a collective.

    Each view goes through ``gram.validate_embeddings`` (shape (n, q), floating, finite,
    q matching the kernel, the same (n, q) on every rank; one small collective each). After
    that, every shape is identical on all ranks, so the checks below, which only look at
    shapes, raise on every rank alike without another collective. ``finite_hints``: a
    reduction of each view computed anyway (``normalised_views``' row norms), which spares
    the finiteness check its own pass over the values (``validate_embeddings``).
    """
    hint1, hint2 = finite_hints if finite_hints is not None else (None, None)
    validate_embeddings(z1, kernel, group, name="z1", chunk_size=chunk_size, finite_hint=hint1)
    validate_embeddings(z2, kernel, group, name="z2", chunk_size=chunk_size, finite_hint=hint2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (n, q): got z1 {tuple(z1.shape)} "
                         f"and z2 {tuple(z2.shape)}")
    if q is not None and z1.shape[1] != q:
        raise ValueError(f"the loss was built for q={q} but z1 and z2 have {z1.shape[1]} columns "
                         f"(shape {tuple(z1.shape)})")


def global_rows(z: torch.Tensor, group: comm.Group = None) -> int:
    """N = n x world size, the number of rows of the global batch."""
    return z.shape[0] * comm.rank_and_world(group)[1]


def global_rows_for_statistics(z: torch.Tensor, group: comm.Group, why: str) -> int:
    """N = n x world size, or a ValueError when it is below 2 (``why``: what needs two rows).
    Call after `validate_views`: shapes then agree on all ranks, so every rank raises alike."""
    total = global_rows(z, group)
    if total < 2:
        raise ValueError(f"{why} needs a global batch of at least 2 rows, got N={total} "
                         f"(z1 of shape {tuple(z.shape)})")
    return total


def check_coeff(name: str, value: float, positive: bool = False) -> float:
    """A finite coefficient >= 0 (> 0 with ``positive``), else a ValueError naming it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value}")
    return value


def check_chunk_size(chunk_size: Optional[int]) -> Optional[int]:
    """None, or a positive integer (rows or columns per block), else a ValueError naming it."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def check_q(q: Optional[int]) -> Optional[int]:
    """None, or an integer q >= 2."""
    if q is None:
        return None
    if isinstance(q, bool) or not isinstance(q, int) or q < 2:
        raise ValueError(f"q (the embedding dimension) must be an integer >= 2 or None, got q={q!r}")
    return q


def reduced_column_blocks(a: torch.Tensor, b: torch.Tensor, block: int, group: comm.Group,
                          finish: Callable[[torch.Tensor, int, int], None]) -> None:
    """For each block of ``block`` columns [start, stop) of ``b``: the (q, stop - start) product
    ``a^T b[:, start:stop]`` summed over the ranks of ``group``, handed to ``finish(c, start, stop)``.
    Block k's all-reduce runs while block k + 1's product is computed: two blocks are live at
    once, never the whole q x q matrix (VICReg's covariance, Barlow Twins' cross-correlation)."""
    pending = None
    for start in range(0, b.shape[1], block):
        stop = min(start + block, b.shape[1])
        c = a.T @ b[:, start:stop]
        work = comm.all_reduce_async_(c, group)
        if pending is not None:
            _finish_block(*pending, finish)
        pending = (work, c, start, stop)
    if pending is not None:
        _finish_block(*pending, finish)


def _finish_block(work, c: torch.Tensor, start: int, stop: int, finish: Callable) -> None:
    if work is not None:  # the block's all-reduce
        work.wait()
    finish(c, start, stop)

