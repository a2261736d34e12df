"""VICReg: variance-invariance-covariance regularisation.

A. Bardes, J. Ponce, Y. LeCun, "VICReg: Variance-invariance-covariance regularization for
self-supervised learning", ICLR 2022. Follows the official code (facebookresearch/vicreg,
``VICReg.forward`` in main_vicreg.py) term by term; it is the q x q baseline the SFRIK paper
compares memory against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ._common import check_coeff, check_q, compute_dtype, global_rows, validate_views


class VICRegLoss(nn.Module):
    """VICReg's loss on two views (Bardes et al., ICLR 2022), on raw (unnormalised) embeddings.

        invariance = mean((z1 - z2)^2)                   over this rank's n x q elements
        variance   = mean_k relu(1 - std_k(Z1)) / 2 + mean_k relu(1 - std_k(Z2)) / 2,
                     std_k = sqrt(var_k + eps), var unbiased (N - 1) over the global batch
        covariance = sum_{k != l} C(Z1)_kl^2 / q + sum_{k != l} C(Z2)_kl^2 / q,
                     C(Z) = (Z - mean Z)^T (Z - mean Z) / (N - 1) over the global batch
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance

    Cost: two q x q covariance matrices (and their gradients) per rank, O(N q^2) work: at
    q = 32768 one fp32 q x q matrix is 4.3 GB. That is the method's inherent cost and the
    baseline SFRIK's N x N route avoids.

    Args:
        sim_coeff, std_coeff, cov_coeff: the weights (>= 0); the paper's 25, 25, 1.
        eps: added to the variance under the square root (> 0); the paper's 1e-4.
        q: if given, the embedding width the inputs must have (checked); None: any q >= 2.
        group: process group (None: the default group, or a single process).

    Shapes: z1, z2 (batch, q), raw projector outputs of this rank's shard, any float dtype
    (bf16/fp16 are promoted to fp32); the global batch must hold N >= 2 rows.

    Returns: {"loss" (differentiable), "invariance", "variance", "covariance"} (the last
    three detached 0-dim tensors, unweighted).

    Distributed:
        Global (identical on every rank): "variance" and "covariance". Their statistics run
        over the global batch of N rows through ``comm.all_reduce_sum`` (differentiable;
        backward all-reduces the gradient): one all-reduce of the two views' column sums
        (2, q), then one of the two views' local centred products X_c^T X_c (2, q, q) --
        never a gathered N x q. Local: "invariance" (``F.mse_loss`` on this rank's shard, as
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
                 eps: float = 1e-4, q: Optional[int] = None, group: comm.Group = None) -> None:
        super().__init__()
        self.sim_coeff = check_coeff("sim_coeff", sim_coeff)
        self.std_coeff = check_coeff("std_coeff", std_coeff)
        self.cov_coeff = check_coeff("cov_coeff", cov_coeff)
        self.eps = check_coeff("eps", eps, positive=True)
        self.q = check_q(q)
        self.group = group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        validate_views(z1, z2, self.group, q=self.q)
        total = global_rows(z1, self.group)
        if total < 2:  # shapes agree on all ranks here, so every rank raises alike
            raise ValueError(f"VICReg's unbiased variance needs a global batch of at least 2 rows, "
                             f"got N={total} (z1 of shape {tuple(z1.shape)})")
        dtype = compute_dtype(z1)
        x, y = z1.to(dtype), z2.to(dtype)
        q = x.shape[1]

        invariance = F.mse_loss(x, y)  # local, as in the official code

        views = torch.stack([x, y])  # (2, n, q)
        mean = comm.all_reduce_sum(views.sum(dim=1), self.group) / total  # (2, q), global
        centred = views - mean.unsqueeze(1)
        cov = comm.all_reduce_sum(centred.transpose(1, 2) @ centred, self.group) / (total - 1)  # (2, q, q)
        var = torch.diagonal(cov, dim1=1, dim2=2)  # (2, q): the unbiased variance, as torch.var
        std = torch.sqrt(var + self.eps)
        variance = F.relu(1 - std).mean(dim=1).sum() / 2
        # sum of off-diagonal squares = all squares - diagonal squares (no q x q mask needed);
        # accumulated in float64 to keep the small off-diagonal part against the diagonal
        off_diagonal = cov.square().sum(dtype=torch.float64) - var.square().sum(dtype=torch.float64)
        covariance = off_diagonal.to(dtype) / q

        loss = self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance
        return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
                "covariance": covariance.detach()}

    def extra_repr(self) -> str:
        return (f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}, "
                f"eps={self.eps}, q={self.q}")
