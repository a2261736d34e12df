"""Barlow Twins: redundancy reduction through the cross-correlation of the two views.

J. Zbontar, L. Jing, I. Misra, Y. LeCun, S. Deny, "Barlow Twins: Self-supervised learning via
redundancy reduction", ICML 2021. Follows the official code (facebookresearch/barlowtwins,
``BarlowTwins.forward`` in main.py): each view goes through BatchNorm1d(affine=False) in
training mode over the global batch (SyncBatchNorm there), C = z1n^T z2n / N, and
loss = sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2.

The q x q matrix C is never held: ``_CrossCorrelation`` builds it a block of columns at a
time (q x chunk, all-reduced per block while the next block's product runs), adds the
block's terms to the value and its share of the gradient (G = dL/dC restricted to the
block: dL/dz2n[:, block] = z1n G[:, block] / N, dL/dz1n += z2n[:, block] G[:, block]^T / N)
and drops it. Memory O(2 q x chunk + n x q) instead of O(q^2) (the official code holds C and
its gradient, 2 x 268 MB in fp32 at q = 8192); work and communication stay O(N q^2) and
O(q^2), the method's inherent cost.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import comm
from ._common import (check_chunk_size, check_coeff, check_q, compute_dtype, global_rows_for_statistics,
                      reduced_column_blocks, validate_views)
from .spec import CHUNK_SIZE_HELP, LossSpec, Option
from .vicreg import covariance_block_size

BN_EPS = 1e-5
"""BatchNorm1d's default eps, added to the biased variance (as in the official code)."""


class _CrossCorrelation(torch.autograd.Function):
    """(sum_i (1 - C_ii)^2, sum_{i != j} C_ij^2) of C = sum_ranks x^T y / N, by column blocks.

    Returns (loss, on, off) with loss = scale (on + lambd off); on and off are not
    differentiable. The gradient is accumulated in the forward pass (nothing q x q is kept
    for backward), times the world size (the losses' gradient convention, as
    ``comm.all_reduce_sum``'s backward gives for the normalisation statistics).
    """

    @staticmethod
    def forward(ctx, x, y, total: int, lambd: float, scale: float, block: int,  # type: ignore[override]
                group: comm.Group):
        x, y = x.detach(), y.detach()
        world = comm.rank_and_world(group)[1]
        need_grad = any(ctx.needs_input_grad[:2])
        gx = torch.zeros_like(x) if need_grad else None
        gy = torch.empty_like(y) if need_grad else None
        on = x.new_zeros((), dtype=torch.float64)
        off = x.new_zeros((), dtype=torch.float64)

        def finish(c: torch.Tensor, start: int, stop: int) -> None:
            nonlocal on, off
            c.div_(total)  # C[:, start:stop]
            diag = c[start:stop].diagonal()  # C_jj of this block's columns (a view)
            one_minus = 1 - diag
            on += one_minus.square().sum(dtype=torch.float64)
            diag.zero_()
            off += c.square().sum(dtype=torch.float64)
            if gx is not None:  # c becomes G[:, block] = dL/dC[:, block] / scale
                c.mul_(2 * lambd)
                diag.copy_(one_minus.mul_(-2))
                gy[:, start:stop] = x @ c  # (x G)[:, block]
                gx.addmm_(y[:, start:stop], c.T)  # y G^T, summed over blocks

        reduced_column_blocks(x, y, block, group, finish)  # two blocks live, never q x q
        if gx is not None:
            factor = scale * world / total
            ctx.save_for_backward(gx.mul_(factor), gy.mul_(factor))
        loss = (scale * (on + lambd * off)).to(x.dtype)
        on, off = on.to(x.dtype), off.to(x.dtype)
        ctx.mark_non_differentiable(on, off)
        return loss, on, off

    @staticmethod
    def backward(ctx, grad_loss, _grad_on, _grad_off):  # type: ignore[override]
        gx, gy = ctx.saved_tensors
        return gx * grad_loss, gy * grad_loss, None, None, None, None, None


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins' loss on two views (Zbontar et al., ICML 2021), on raw embeddings.

        z_n        = (z - mean(z)) / sqrt(var(z) + 1e-5) per column, mean and biased variance
                     over the global batch (BatchNorm1d(affine=False) in training mode)
        C          = z1n^T z2n / N                                  (q x q, global batch)
        on_diagonal  = sum_i (1 - C_ii)^2,   off_diagonal = sum_{i != j} C_ij^2
        loss = scale_loss * (on_diagonal + lambd * off_diagonal)

    Cost: O(N q^2) work and an all-reduce of q^2 numbers, the method's inherent cost.
    Memory: C is built a block of ``chunk_size`` columns at a time, so a rank holds
    2 q x chunk_size + a few n x q numbers, never the q x q matrix.

    Args:
        lambd: weight of the off-diagonal (redundancy) term (>= 0); the official 0.0051.
        scale_loss: factor on the whole loss (> 0). An early release of the official code
            had ``--scale-loss`` 1/32 (with lambd 3.9e-3); the current one has none: 1.
        q: if given, the embedding width the inputs must have (checked); None: any q >= 2.
        chunk_size: columns of C per block (None: 2^25 / q, 128 MiB in fp32).
        group: process group (None: the default group, or a single process).

    Shapes: z1, z2 (batch, q), raw projector outputs of this rank's shard, any float dtype
    (bf16/fp16 are promoted to fp32); the global batch must hold N >= 2 rows.

    Returns: {"loss" (differentiable), "on_diagonal", "off_diagonal" (unweighted),
    "invariance"}, the last three detached 0-dim tensors. "invariance" = mean((z1 - z2)^2)
    of the raw embeddings is a diagnostic only (for the trainer's console); it is not part
    of the loss.

    Distributed:
        Global (identical on every rank): "loss", "on_diagonal", "off_diagonal". The column
        sums (2, q) and centred sums of squares (2, q) of both views go through
        ``comm.all_reduce_sum`` (differentiable), then each block of the local products
        x^T y[:, block] (q, chunk_size) is all-reduced -- never a gathered N x q, never a
        q x q. Local: "invariance" (this rank's shard); its mean over ranks is the
        single-process value. Gradient convention: each rank's gradient on its shard,
        divided by world size, equals those rows of the single-process gradient on the
        concatenated batch. Without a process group: a plain single-process loss.

    Example:
        >>> loss_fn = BarlowTwinsLoss()
        >>> z1, z2 = torch.randn(256, 512, requires_grad=True), torch.randn(256, 512)
        >>> loss_fn(z1, z2)["loss"].backward()
    """

    local_components: tuple[str, ...] = ("invariance",)

    def __init__(self, lambd: float = 0.0051, scale_loss: float = 1.0, q: Optional[int] = None,
                 chunk_size: Optional[int] = None, group: comm.Group = None) -> None:
        super().__init__()
        self.lambd = check_coeff("lambd", lambd)
        self.scale_loss = check_coeff("scale_loss", scale_loss, positive=True)
        self.q = check_q(q)
        self.chunk_size = check_chunk_size(chunk_size)
        self.group = group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        validate_views(z1, z2, self.group, q=self.q)
        total = global_rows_for_statistics(z1, self.group, "Barlow Twins' batch normalisation")
        dtype = compute_dtype(z1)
        views = torch.stack([z1.to(dtype), z2.to(dtype)])  # (2, n, q)
        with torch.no_grad():
            invariance = (views[0] - views[1]).square().mean()  # local diagnostic, not in the loss

        mean = comm.all_reduce_sum(views.sum(dim=1), self.group) / total  # (2, q), global
        centred = views - mean.unsqueeze(1)
        var = comm.all_reduce_sum(centred.square().sum(dim=1), self.group) / total  # biased, as BN
        normed = centred * torch.rsqrt(var + BN_EPS).unsqueeze(1)
        block = covariance_block_size(normed.shape[2], self.chunk_size)
        loss, on, off = _CrossCorrelation.apply(normed[0], normed[1], total, self.lambd, self.scale_loss,
                                                block, self.group)
        return {"loss": loss, "on_diagonal": on.detach(), "off_diagonal": off.detach(),
                "invariance": invariance.detach()}

    def extra_repr(self) -> str:
        return (f"lambd={self.lambd}, scale_loss={self.scale_loss}, q={self.q}"
                + (f", chunk_size={self.chunk_size}" if self.chunk_size else ""))


SPEC = LossSpec(
    name="barlow_twins", cls=BarlowTwinsLoss, display="Barlow Twins",
    summary="cross-correlation to the identity (Zbontar et al., 2021)",
    options=(
        Option("lambd", float, 0.0051, "Barlow Twins: weight of the off-diagonal (redundancy) term "
               "sum_{i != j} C_ij^2 of the cross-correlation C; the official 0.0051.", minimum=0.0),
        Option("scale_loss", float, 1.0, "Barlow Twins: factor on the whole loss (> 0); the official "
               "code's early --scale-loss (1/32), 1 in its current version.", minimum=0.0, strict=True),
        Option("chunk_size", int, None, CHUNK_SIZE_HELP, minimum=1),
    ),
    regulariser="off_diagonal")
