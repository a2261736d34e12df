"""The two-view structure shared by the kernel losses (SFRIK, sample-contrastive,
alignment & uniformity): invariance + a rotation-invariant kernel regulariser per view.

    loss = sim_coeff * mean((z1n - z2n)^2) + mmd_coeff * (reg(Z1n) + reg(Z2n)) / 2

with zn = z / |z| row-wise and reg(Z) = R(Z) = (1/N^2) sum_{i,j} phi(z_i.z_j) over the
global batch (SFRIK paper, Zheng et al., ICLR 2023, eq. of the generic loss). Subclasses
fix the kernel, and may turn R into another regulariser (``_regulariser``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import comm
from ..gram import kernel_mean
from ..kernels import Kernel
from ._common import check_chunk_size, check_coeff, normalised_views, validate_views, views_problem


class KernelMMDLoss(nn.Module):
    """Invariance plus the kernel MMD^2 regulariser of each view, for any ``kernels.Kernel``.

    loss = sim_coeff * mean((z1n - z2n)^2) + mmd_coeff * (R(Z1n) + R(Z2n)) / 2, where the
    mean is over the n x q elements of this rank's batch and R(Z) = (1/N^2) sum_{i,j}
    phi(z_i.z_j) runs over the global batch of N = n x world_size rows, diagonal included
    (a V-statistic; on normalised rows the diagonal is the constant phi(1)).

    Args:
        kernel: the rotation-invariant kernel, built for the embedding width q.
        sim_coeff: weight of the invariance term (>= 0).
        mmd_coeff: weight of the regulariser (>= 0).
        chunk_size: peer rows per Gram block in ``gram.kernel_mean`` (None: from the sizes).
        group: process group (None: the default group, or a single process).

    Shapes: z1, z2 (batch, q) raw projector outputs, this rank's shard; any float dtype
    (bf16/fp16 are normalised and reduced in fp32).

    Returns: {"loss": differentiable 0-dim tensor, "invariance", "reg_view1", "reg_view2",
    "mmd2": detached 0-dim tensors}; subclasses may add per-term components.
    "mmd2" = (R(Z1n) + R(Z2n)) / 2 - b_0, the estimate of MMD^2 to the uniform law.

    Distributed:
        Global (identical on every rank): "reg_view1", "reg_view2", "mmd2" and any kernel
        terms, through ``gram.kernel_mean`` (ring exchange of shards, one all-reduce of the
        per-term sums; its backward all-reduces the scalar upstream gradient). Local: the
        invariance, a mean over this rank's n x q elements, so "loss" differs across ranks
        and its mean over ranks is the single-process loss on the concatenated batch.
        Gradient convention: each rank's gradient on its shard, divided by world size,
        equals those rows of the single-process gradient on the concatenated batch, so
        DeepSpeed/DDP gradient averaging gives the exact single-process parameter gradient.
        Without a process group: a plain single-process loss.

    Example:
        >>> import torch
        >>> from sfrik_scale.kernels import QuadraticKernel
        >>> loss_fn = KernelMMDLoss(QuadraticKernel(q=128), sim_coeff=100.0)
        >>> z1 = torch.randn(64, 128, requires_grad=True)
        >>> out = loss_fn(z1, torch.randn(64, 128))
        >>> out["loss"].backward()
    """

    #: components whose value is this rank's own (they average over ranks to the global one)
    local_components: tuple[str, ...] = ("loss", "invariance")
    #: whether to report the kernel's per-term parts (e.g. each Legendre order) as components
    report_terms: bool = False

    def __init__(self, kernel: Kernel, sim_coeff: float, mmd_coeff: float = 1.0,
                 chunk_size: Optional[int] = None, group: comm.Group = None) -> None:
        super().__init__()
        if not isinstance(kernel, Kernel):
            raise ValueError(f"kernel must be a sfrik_scale.kernels.Kernel, got {type(kernel).__name__}")
        check_chunk_size(chunk_size)
        self.kernel = kernel
        self.q = kernel.q
        self.sim_coeff = check_coeff("sim_coeff", sim_coeff)
        self.mmd_coeff = check_coeff("mmd_coeff", mmd_coeff)
        self.chunk_size = chunk_size
        self.group = group

    def _regulariser(self, zn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(regulariser of one view, its kernel mean R, the kernel's per-term parts of R).

        Here the regulariser is R itself; subclasses may transform it."""
        # check_inputs=False: forward already validated the raw views (normalised rows of
        # finite rows are finite), which saves a collective and a host sync per view
        value, terms = kernel_mean(zn, self.kernel, chunk_size=self.chunk_size, group=self.group,
                                   return_terms=True, check_inputs=False)
        return value, value, terms

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        hints = None
        if views_problem(z1, z2, self.kernel, self.chunk_size) is None:  # else validate_views raises
            # one fused pass (large views): normalised rows, the local invariance (mean over this
            # rank's n x q elements) and the row norms, whose finiteness stands for the views'
            z1n, z2n, invariance, hints = normalised_views(z1, z2)
        validate_views(z1, z2, self.group, kernel=self.kernel, chunk_size=self.chunk_size, finite_hints=hints)
        reg1, mean1, terms1 = self._regulariser(z1n)
        reg2, mean2, terms2 = self._regulariser(z2n)
        regulariser = (reg1 + reg2) / 2
        out = {
            "loss": self.sim_coeff * invariance + self.mmd_coeff * regulariser,
            "invariance": invariance.detach(),
            "reg_view1": reg1.detach(),
            "reg_view2": reg2.detach(),
            "mmd2": ((mean1 + mean2).detach() / 2 - self.kernel.b0),
        }
        if self.report_terms:
            out.update({name: (terms1[name] + terms2[name]) / 2 for name in terms1})
        return out

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel!r}, sim_coeff={self.sim_coeff}, mmd_coeff={self.mmd_coeff}, "
                f"chunk_size={self.chunk_size}")
