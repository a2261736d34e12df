"""VICReg: variance-invariance-covariance regularisation.

A. Bardes, J. Ponce, Y. LeCun, "VICReg: Variance-invariance-covariance regularization for
self-supervised learning", ICLR 2022. Follows the official code (facebookresearch/vicreg,
``VICReg.forward`` in main_vicreg.py) term by term; it is the q x q baseline the SFRIK paper
compares memory against.

The covariance term never holds a q x q matrix: ``off_diagonal_covariance`` builds the
global covariance C = X_c^T X_c / (N - 1) a block of columns at a time (all-reduced per
block, overlapping the next block's product), adds the block's off-diagonal squares to
the value and its contribution 4 X_c C_off[:, block] / (N - 1) to the gradient, then drops
the block. Memory O(2 q x block + n x q) instead of O(q^2); work and communication stay
O(N q^2) and O(q^2), the method's inherent cost.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ._common import (check_chunk_size, check_coeff, check_q, compute_dtype, global_rows_for_statistics,
                      reduced_column_blocks, validate_views)
from .spec import CHUNK_SIZE_HELP, SIM_COEFF_HELP, LossSpec, Option


_BLOCK_ELEMENTS = 1 << 25
"""Default covariance block: 2^25 elements (128 MiB in fp32), e.g. 1024 columns at q = 32768."""


def covariance_block_size(q: int, block_size: Optional[int] = None) -> int:
    """Columns per covariance block: ``block_size`` (clipped to [1, q]) or the default budget."""
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // q)
    return max(1, min(q, int(block_size)))


class _OffDiagonalCovariance(torch.autograd.Function):
    """sum_{k != l} C_kl^2 of the global covariance C = sum_ranks X_c^T X_c / (N - 1), by column blocks.

    The gradient is accumulated in the forward pass (no q x q tensor is kept for
    backward): d/dX_c = 4 X_c C_off / (N - 1), times the world size (the losses'
    gradient convention, as ``comm.all_reduce_sum``'s backward gives for the other terms).
    Each block's all-reduce overlaps the next block's product: two blocks are live at once.
    """

    @staticmethod
    def forward(ctx, xc: torch.Tensor, total: int, block: int, group: comm.Group):  # type: ignore[override]
        xc = xc.detach()
        world = comm.rank_and_world(group)[1]
        grad = torch.empty_like(xc) if ctx.needs_input_grad[0] else None
        value = xc.new_zeros((), dtype=torch.float64)

        def finish(c: torch.Tensor, start: int, stop: int) -> None:
            nonlocal value
            c.div_(total - 1)
            c[start:stop].diagonal().zero_()  # C_kk of this block's columns
            value += c.square().sum(dtype=torch.float64)
            if grad is not None:
                grad[:, start:stop] = xc @ c  # (X_c C_off)[:, block] = X_c C_off[:, block]

        reduced_column_blocks(xc, xc, block, group, finish)  # two blocks live, never q x q
        if grad is not None:
            grad.mul_(4.0 * world / (total - 1))
            ctx.save_for_backward(grad)
        return value.to(xc.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None


def off_diagonal_covariance(xc: torch.Tensor, total: int, block_size: Optional[int] = None,
                            group: comm.Group = None) -> torch.Tensor:
    """Differentiable sum of the squared off-diagonal entries of the global covariance of ``xc``.

    ``xc``: (n, q) this rank's rows, centred by the global mean; ``total``: N, the global
    number of rows. The same value on every rank; memory O(2 q x block_size + n x q).
    """
    return _OffDiagonalCovariance.apply(xc, total, covariance_block_size(xc.shape[1], block_size), group)


class VICRegLoss(nn.Module):
    """VICReg's loss on two views (Bardes et al., ICLR 2022), on raw (unnormalised) embeddings.

        invariance = mean((z1 - z2)^2)                   over this rank's n x q elements
        variance   = mean_k relu(1 - std_k(Z1)) / 2 + mean_k relu(1 - std_k(Z2)) / 2,
                     std_k = sqrt(var_k + eps), var unbiased (N - 1) over the global batch
        covariance = sum_{k != l} C(Z1)_kl^2 / q + sum_{k != l} C(Z2)_kl^2 / q,
                     C(Z) = (Z - mean Z)^T (Z - mean Z) / (N - 1) over the global batch
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance

    Cost: O(N q^2) work and an all-reduce of q^2 numbers per view, the method's inherent
    cost, which SFRIK's N x N route avoids. Memory: the covariance is built a block of
    ``chunk_size`` columns at a time (`off_diagonal_covariance`), so a rank holds
    2 q x chunk_size + n x q numbers, never the q x q matrix (4.3 GB in fp32 at q = 32768;
    the official code holds two, in fp16).

    Args:
        sim_coeff, std_coeff, cov_coeff: the weights (>= 0); the paper's 25, 25, 1.
        eps: added to the variance under the square root (> 0); the paper's 1e-4.
        q: if given, the embedding width the inputs must have (checked); None: any q >= 2.
        chunk_size: covariance columns per block (None: 2^25 / q, 128 MiB in fp32).
        group: process group (None: the default group, or a single process).

    Shapes: z1, z2 (batch, q), raw projector outputs of this rank's shard, any float dtype
    (bf16/fp16 are promoted to fp32); the global batch must hold N >= 2 rows.

    Returns: {"loss" (differentiable), "invariance", "variance", "covariance"} (the last
    three detached 0-dim tensors, unweighted).

    Distributed:
        Global (identical on every rank): "variance" and "covariance". Their statistics run
        over the global batch of N rows through ``comm.all_reduce_sum`` (differentiable;
        backward all-reduces the gradient): one all-reduce of the two views' column sums
        (2, q), one of their centred sums of squares (2, q), then one per covariance block
        of the local products X_c^T X_c[:, block] (q, chunk_size) -- never a gathered
        N x q, never a q x q. Local: "invariance" (``F.mse_loss`` on this rank's shard, as
        in the official code) and hence "loss"; their mean over ranks is the single-process
        value on the concatenated batch. Gradient convention: each rank's gradient on its
        shard, divided by world size, equals those rows of the single-process gradient on
        the concatenated batch (DeepSpeed/DDP averaging gives the exact single-process
        parameter gradients). Without a process group: a plain single-process loss.

    Example:
        >>> loss_fn = VICRegLoss()
        >>> z1, z2 = torch.randn(256, 512, requires_grad=True), torch.randn(256, 512)
        >>> out = loss_fn(z1, z2)
        >>> out["loss"].backward()
    """

    local_components: tuple[str, ...] = ("loss", "invariance")

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 eps: float = 1e-4, q: Optional[int] = None, chunk_size: Optional[int] = None,
                 group: comm.Group = None) -> None:
        super().__init__()
        self.sim_coeff = check_coeff("sim_coeff", sim_coeff)
        self.std_coeff = check_coeff("std_coeff", std_coeff)
        self.cov_coeff = check_coeff("cov_coeff", cov_coeff)
        self.eps = check_coeff("eps", eps, positive=True)
        self.q = check_q(q)
        self.chunk_size = check_chunk_size(chunk_size)
        self.group = group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        validate_views(z1, z2, self.group, q=self.q)
        total = global_rows_for_statistics(z1, self.group, "VICReg's unbiased variance")
        dtype = compute_dtype(z1)
        x, y = z1.to(dtype), z2.to(dtype)
        q = x.shape[1]

        invariance = F.mse_loss(x, y)  # local, as in the official code

        views = torch.stack([x, y])  # (2, n, q)
        mean = comm.all_reduce_sum(views.sum(dim=1), self.group) / total  # (2, q), global
        centred = views - mean.unsqueeze(1)
        var = comm.all_reduce_sum(centred.square().sum(dim=1), self.group) / (total - 1)  # (2, q), unbiased
        std = torch.sqrt(var + self.eps)
        variance = F.relu(1 - std).mean(dim=1).sum() / 2
        covariance = (off_diagonal_covariance(centred[0], total, self.chunk_size, self.group)
                      + off_diagonal_covariance(centred[1], total, self.chunk_size, self.group)) / q

        loss = self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance
        return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
                "covariance": covariance.detach()}

    def extra_repr(self) -> str:
        return (f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}, "
                f"eps={self.eps}, q={self.q}" + (f", chunk_size={self.chunk_size}" if self.chunk_size else ""))


SPEC = LossSpec(
    name="vicreg", cls=VICRegLoss, display="VICReg", summary="variance-invariance-covariance (Bardes et al., 2022)",
    options=(
        Option("sim_coeff", float, 25.0, SIM_COEFF_HELP, minimum=0.0),
        Option("std_coeff", float, 25.0, "VICReg variance-hinge weight.", minimum=0.0),
        Option("cov_coeff", float, 1.0, "VICReg covariance weight.", minimum=0.0),
        Option("chunk_size", int, None, CHUNK_SIZE_HELP, minimum=1),
    ),
    regulariser="covariance")
