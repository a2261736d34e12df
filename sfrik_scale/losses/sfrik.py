"""SFRIK: invariance plus the MMD^2 to the uniform law under a truncated Legendre kernel.

L. Zheng, G. Puy, E. Riccietti, P. Perez, R. Gribonval, "Self-supervised learning with
rotation-invariant kernels", ICLR 2023 (official code: valeoai/sfrik, ``SFRIK`` in
src/sfrik/ssl.py, whose formula this follows term by term).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from .. import comm
from ..kernels import TruncatedLegendre
from .kernel_mmd import KernelMMDLoss
from .spec import CHUNK_SIZE_HELP, MMD_COEFF_HELP, SIM_COEFF_HELP, LossSpec, Option


class SFRIKLoss(KernelMMDLoss):
    """SFRIK's loss on two views (Zheng et al., ICLR 2023).

        loss = sim_coeff * mean((z1n - z2n)^2) + mmd_coeff * (R(Z1n) + R(Z2n)) / 2,
        R(Z) = (1/N^2) sum_{i,j} sum_{l=1..L} b_l P_l(q; z_i.z_j)

    zn = z / |z| row-wise; the mean is over the n x q elements of this rank's batch (as
    ``F.mse_loss`` in the official code); R runs over the global batch of N rows, diagonal
    included. b_0 = 0 for this kernel, so R is itself the MMD^2 estimate.

    Relation to the slides, which write (1/n) sum_i |z1_i - z2_i|^2 + lambda/2 (L(Z1) + L(Z2)):
    the loss here is sim_coeff / q times that, with lambda = mmd_coeff * q / sim_coeff
    (``slides_lambda``). Published recipes: ResNet-50, projector 8192-8192-32768:
    sim_coeff 40000 (lambda = 0.8192); ResNet-18, projector 8192-8192-8192 on ImageNet 20%:
    sim_coeff 4000 (lambda = 2.048), the default here and in its SPEC. Keep
    lambda, not sim_coeff, when changing q.

    Args:
        q: embedding width (the projector's last width), >= 2.
        coeffs: (b_1, ..., b_L), all >= 0; the paper's L = 3 recipe is (1, 40, 40).
        sim_coeff: invariance weight (>= 0); see above for the published values.
        mmd_coeff: regulariser weight (>= 0).
        chunk_size: peer rows per Gram block in ``gram.kernel_mean`` (None: from the sizes).
        group: process group (None: the default group, or a single process).

    Shapes: z1, z2 (batch, q), raw projector outputs of this rank's shard, any float dtype
    (bf16/fp16 are normalised and the Gram evaluated in fp32).

    Returns: {"loss" (differentiable), "invariance", "reg_view1" (R(Z1n)), "reg_view2",
    "mmd2" ((R1 + R2)/2 - b_0 = (R1 + R2)/2 here), "legendre_1", ..., "legendre_L"
    (b_l * mean P_l over the global Gram, averaged over the two views; they sum to "mmd2")}.
    Components are detached 0-dim tensors.

    Distributed:
        Global (identical on every rank): "reg_view1", "reg_view2", "mmd2", "legendre_l",
        from ``gram.kernel_mean``: a ring exchange of (n, q) shards, never a gathered N x q
        nor an N x N matrix; one all-reduced q-vector for the degree-1 term; one all-reduce
        of the per-order sums; backward all-reduces one scalar. Local: "invariance" (this
        rank's n x q elements) and hence "loss"; their mean over ranks is the single-process
        value on the concatenated batch. Gradient convention: each rank's gradient on its
        shard, divided by world size, equals those rows of the single-process gradient on the
        concatenated batch, so DeepSpeed/DDP averaging gives the exact single-process
        parameter gradients. Without a process group: a plain single-process loss.

    Example:
        >>> import torch
        >>> loss_fn = SFRIKLoss(q=512, coeffs=(1.0, 40.0, 40.0), sim_coeff=4000.0)
        >>> z1, z2 = torch.randn(256, 512, requires_grad=True), torch.randn(256, 512)
        >>> out = loss_fn(z1, z2)
        >>> out["loss"].backward()
        >>> sorted(out)
        ['invariance', 'legendre_1', 'legendre_2', 'legendre_3', 'loss', 'mmd2', 'reg_view1', 'reg_view2']
    """

    report_terms = True

    def __init__(self, q: int, coeffs: Sequence[float] = (1.0, 40.0, 40.0), sim_coeff: float = 4000.0,
                 mmd_coeff: float = 1.0, chunk_size: Optional[int] = None, group: comm.Group = None) -> None:
        super().__init__(TruncatedLegendre(coeffs, q), sim_coeff=sim_coeff, mmd_coeff=mmd_coeff,
                         chunk_size=chunk_size, group=group)
        self.coeffs = self.kernel.coeffs

    @property
    def slides_lambda(self) -> float:
        """lambda of the slides' form (1/n) sum |z1 - z2|^2 + lambda/2 (L(Z1) + L(Z2)):
        mmd_coeff * q / sim_coeff (inf when sim_coeff = 0)."""
        return self.mmd_coeff * self.q / self.sim_coeff if self.sim_coeff else float("inf")


def _coeffs_problem(coeffs) -> Optional[str]:
    if len(coeffs) < 1:
        return "needs at least b_1, e.g. [1, 40, 40]"
    for i, b in enumerate(coeffs):
        if b < 0:
            return (f"b_{i + 1} = {b} is negative: the truncated Legendre kernel is positive definite only with "
                    "all coefficients >= 0 (Schoenberg)")
    return None if any(b > 0 for b in coeffs) else "all coefficients are zero: no regularisation"


SPEC = LossSpec(
    name="sfrik", cls=SFRIKLoss, display="SFRIK", summary="truncated Legendre kernel MMD (Zheng et al., 2023)",
    options=(
        Option("coeffs", Tuple[float, ...], (1.0, 40.0, 40.0), (
            "SFRIK Legendre coefficients (b_1, ..., b_L), all >= 0 and not all zero (Schoenberg: the kernel is "
            "positive definite). (1, 40, 40) is the paper's L = 3; (1, 40) its L = 2."), check=_coeffs_problem),
        Option("sim_coeff", float, 4000.0, SIM_COEFF_HELP, minimum=0.0),
        Option("mmd_coeff", float, 1.0, MMD_COEFF_HELP, minimum=0.0),
        Option("chunk_size", int, None, CHUNK_SIZE_HELP, minimum=1),
    ),
    regulariser="mmd2")
