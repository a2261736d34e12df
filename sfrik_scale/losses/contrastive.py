"""The sample-contrastive loss with the quadratic kernel phi(t) = t^2.

Q. Garrido, Y. Chen, A. Bardes, L. Najman, Y. LeCun, "On the duality between contrastive
and non-contrastive self-supervised learning", ICLR 2023: the sample-contrastive criterion
sum_{i != j} (z_i.z_j)^2. The SFRIK paper (Zheng et al., ICLR 2023) reads it as an MMD to
the uniform law with the kernel (u.v)^2, which is what is computed here.
"""
from __future__ import annotations

from typing import Optional

from .. import comm
from ..kernels import QuadraticKernel
from .kernel_mmd import KernelMMDLoss
from .spec import CHUNK_SIZE_HELP, MMD_COEFF_HELP, SIM_COEFF_HELP, LossSpec, Option


class ContrastiveQuadraticLoss(KernelMMDLoss):
    """Invariance plus the quadratic-kernel regulariser (Garrido et al., 2023).

        loss = sim_coeff * mean((z1n - z2n)^2) + mmd_coeff * (R(Z1n) + R(Z2n)) / 2,
        R(Z) = (1/N^2) sum_{i,j} (z_i.z_j)^2

    zn = z / |z| row-wise, the mean over this rank's n x q elements, R over the global batch
    of N rows. Garrido et al. sum over i != j only; on normalised rows the diagonal adds the
    constant 1/N with no gradient, so the two differ by a constant. Note that
    (1/N^2) sum_{i,j} (z_i.z_j)^2 = |Z^T Z / N|_F^2: the same quantity as the
    (uncentred) covariance criterion, computed here from the N x N Gram, never the q x q matrix.

    Args:
        q: embedding width, >= 2.
        sim_coeff: invariance weight (>= 0); default 4000 as in its SPEC.
        mmd_coeff: regulariser weight (>= 0).
        chunk_size: peer rows per Gram block in ``gram.kernel_mean`` (None: from the sizes).
        group: process group (None: the default group, or a single process).

    Shapes: z1, z2 (batch, q), raw projector outputs of this rank's shard.

    Returns: {"loss" (differentiable), "invariance", "reg_view1" (R(Z1n)), "reg_view2",
    "mmd2" ((R1 + R2)/2 - 1/q, since b_0 = 1/q for t^2)}, components detached.

    Distributed:
        Global (identical on every rank): "reg_view1", "reg_view2", "mmd2", from
        ``gram.kernel_mean`` (ring exchange of (n, q) shards, one all-reduce of the sums,
        one scalar all-reduce in backward; no gathered N x q). Local: "invariance" and hence
        "loss"; their mean over ranks is the single-process value on the concatenated batch.
        Gradient convention: each rank's gradient on its shard, divided by world size, equals
        those rows of the single-process gradient on the concatenated batch (DeepSpeed/DDP
        averaging gives the exact single-process parameter gradients). Without a process
        group: a plain single-process loss.

    Example:
        >>> import torch
        >>> loss_fn = ContrastiveQuadraticLoss(q=512)
        >>> out = loss_fn(torch.randn(256, 512), torch.randn(256, 512))
        >>> float(out["mmd2"]) >= 0
        True
    """

    def __init__(self, q: int, sim_coeff: float = 4000.0, mmd_coeff: float = 1.0,
                 chunk_size: Optional[int] = None, group: comm.Group = None) -> None:
        super().__init__(QuadraticKernel(q), sim_coeff=sim_coeff, mmd_coeff=mmd_coeff,
                         chunk_size=chunk_size, group=group)


SPEC = LossSpec(
    name="contrastive", cls=ContrastiveQuadraticLoss, display="Contrastive",
    summary="quadratic-kernel sample-contrastive, t^2 (Garrido et al., 2023)",
    options=(
        Option("sim_coeff", float, 4000.0, SIM_COEFF_HELP, minimum=0.0),
        Option("mmd_coeff", float, 1.0, MMD_COEFF_HELP, minimum=0.0),
        Option("chunk_size", int, None, CHUNK_SIZE_HELP, minimum=1),
    ),
    regulariser="mmd2")
