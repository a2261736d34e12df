"""Alignment and uniformity on the hypersphere.

T. Wang, P. Isola, "Understanding contrastive representation learning through alignment
and uniformity on the hypersphere", ICML 2020. Weighted as in the SFRIK paper's comparison
(Zheng et al., ICLR 2023; official code valeoai/sfrik, ``AUH`` in src/sfrik/ssl.py):
alignment 3000, uniformity 1, scale 2.5.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import comm
from ..gram import kernel_mean
from ..kernels import GaussianKernel
from ._common import check_coeff, global_rows
from .kernel_mmd import KernelMMDLoss
from .spec import CHUNK_SIZE_HELP, MMD_COEFF_HELP, SIM_COEFF_HELP, LossSpec, Option


class AlignUniformLoss(KernelMMDLoss):
    """Alignment plus uniformity (Wang & Isola, 2020), as weighted in the SFRIK paper.

        loss = sim_coeff * mean((z1n - z2n)^2) + mmd_coeff * (U(Z1n) + U(Z2n)) / 2,
        U(Z) = log( (1/(N(N-1))) sum_{i != j} exp(-s |z_i - z_j|^2) )

    zn = z / |z| row-wise. The alignment term is the same invariance as in the other kernel
    losses: the mean over this rank's n x q elements (``F.mse_loss``, as in the official
    SFRIK code), i.e. Wang & Isola's E|z1 - z2|^2 (alpha = 2) divided by q, so sim_coeff is
    comparable across SFRIK, contrastive and this loss. U is the log of the off-diagonal mean
    of the Gaussian kernel exp(-s |u - v|^2) = exp(-2s(1 - u.v)) (Wang & Isola's t is our s),
    obtained from the global kernel mean R (diagonal included) as
    log((N R - phi(1)) / (N - 1)) with phi(1) = 1 on normalised rows; the diagonal's
    gradient is radial and removed by the normalisation, so value and gradient are those of
    the off-diagonal formula.

    Args:
        q: embedding width, >= 2.
        sim_coeff: alignment weight (>= 0); 3000 in the SFRIK paper's comparison.
        mmd_coeff: uniformity weight (>= 0), the official code's ``auh_unif_coeff``; 1.
        scale: s > 0 in exp(-s |u - v|^2); 2.5 in the SFRIK paper's comparison (Wang & Isola use 2).
        chunk_size: peer rows per Gram block in ``gram.kernel_mean`` (None: from the sizes).
        group: process group (None: the default group, or a single process).

    Shapes: z1, z2 (batch, q), raw projector outputs of this rank's shard; the global batch
    must hold N >= 2 rows.

    Returns: {"loss" (differentiable), "invariance", "uniformity" ((U1 + U2)/2),
    "reg_view1" (U(Z1n)), "reg_view2", "mmd2" (the Gaussian kernel's MMD^2 estimate,
    (R1 + R2)/2 - b_0, diagonal included)}, components detached.

    Distributed:
        Global (identical on every rank): "uniformity", "reg_view1", "reg_view2", "mmd2",
        from ``gram.kernel_mean`` (ring exchange of (n, q) shards, one all-reduce of the
        sums, one scalar all-reduce in backward; no gathered N x q, no N x N matrix). Local:
        "invariance" and hence "loss"; their mean over ranks is the single-process value on
        the concatenated batch. Gradient convention: each rank's gradient on its shard,
        divided by world size, equals those rows of the single-process gradient on the
        concatenated batch (DeepSpeed/DDP averaging gives the exact single-process parameter
        gradients). Without a process group: a plain single-process loss.

    Example:
        >>> loss_fn = AlignUniformLoss(q=512, sim_coeff=3000.0, scale=2.5)
        >>> out = loss_fn(torch.randn(256, 512), torch.randn(256, 512))
        >>> float(out["uniformity"]) <= 0
        True
    """

    def __init__(self, q: int, sim_coeff: float = 3000.0, mmd_coeff: float = 1.0, scale: float = 2.5,
                 chunk_size: Optional[int] = None, group: comm.Group = None) -> None:
        scale = check_coeff("scale", scale, positive=True)
        super().__init__(GaussianKernel(q, scale), sim_coeff=sim_coeff, mmd_coeff=mmd_coeff,
                         chunk_size=chunk_size, group=group)
        self.scale = scale

    def _regulariser(self, zn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        total = global_rows(zn, self.group)
        if total < 2:  # shapes agree on all ranks here, so every rank raises alike
            raise ValueError(f"uniformity needs a global batch of at least 2 rows (off-diagonal "
                             f"pairs), got N={total} (z of shape {tuple(zn.shape)})")
        mean = kernel_mean(zn, self.kernel, chunk_size=self.chunk_size, group=self.group,
                           check_inputs=False)  # the raw views were validated in forward
        # (N^2 R - N phi(1)) / (N (N - 1)): drop the N diagonal entries, phi(1) = 1
        off_diagonal = (total * mean - self.kernel.phi_at_one) / (total - 1)
        return torch.log(off_diagonal), mean, {}

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(z1, z2)
        out["uniformity"] = (out["reg_view1"] + out["reg_view2"]) / 2
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale}"


SPEC = LossSpec(
    name="align_uniform", cls=AlignUniformLoss, display="AUH",
    summary="alignment & uniformity on the hypersphere (Wang & Isola, 2020)",
    options=(
        Option("sim_coeff", float, 3000.0, SIM_COEFF_HELP, minimum=0.0),
        Option("mmd_coeff", float, 1.0, MMD_COEFF_HELP, minimum=0.0),
        Option("scale", float, 2.5, "Alignment-uniformity kernel scale s in exp(-s |u - v|^2) (> 0).",
               minimum=0.0, strict=True),
        Option("chunk_size", int, None, CHUNK_SIZE_HELP, minimum=1),
    ),
    regulariser="uniformity")
