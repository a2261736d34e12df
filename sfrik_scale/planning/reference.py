"""The paper's training step, re-expressed for the memory simulator ("as the paper ran it").

The SFRIK paper measured memory with its official code (valeoai/sfrik, PyTorch 1.10, whose
VICReg baseline is VICReg's official code): ``torch.nn.parallel.DistributedDataParallel``
over 8 GPUs, ``torch.cuda.amp.autocast`` (fp16 activations, fp32 weights) with a
``GradScaler``, VICReg's LARS, and losses that first gather the global batch of embeddings
on every GPU (``FullGatherLayer``, a differentiable all-gather) and then work densely:

* SFRIK: the N x N Gram of the gathered, normalised embeddings and the Legendre
  polynomials evaluated elementwise on it (``src/sfrik/ssl.py``);
* VICReg: the two q x q covariance matrices of the gathered embeddings, their
  off-diagonal elements copied out and squared in place (``main_vicreg.py``).

This module reproduces the *sequence of tensor operations* of those steps (the same
shapes, lifetimes and in-place updates, and the dtype CUDA autocast gives each op, spelled
out because the simulator's fake tensors live on the CPU, whose autocast policy differs
for norms, powers and sums), not their numerics, so that the simulator can run it on fake
tensors. The model's forward runs under real (CPU) autocast, whose policy for convolutions
and linear layers is CUDA's: fp16 compute with cached fp16 weight copies. The equations are the papers'; see
:mod:`sfrik_scale.losses` for this project's implementations, which never gather.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

#: SFRIK's truncated Legendre kernel of the paper's runs (b_1, b_2, b_3)
PAPER_SFRIK_WEIGHTS = (1.0, 40.0, 40.0)


class _GatherRows(torch.autograd.Function):
    """Differentiable all-gather as the official ``FullGatherLayer``: forward returns one
    freshly allocated (n, q) tensor per rank; backward stacks the incoming gradients,
    all-reduces them (in place) and returns this rank's slice. No process group is needed:
    values are irrelevant to the simulator, allocations are what it measures. Each rank's
    tensor is a copy of this rank's rows, which is the exact gather at world size 1, so the
    same step also runs for real on one GPU (``sfrik-scale selftest --gpu``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world: int):  # type: ignore[override]
        ctx.world = world
        return tuple(x.clone() for _ in range(world))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        stacked = torch.stack(grads)  # all-reduced in place in the original
        return stacked[0], None


def gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """(n, q) -> (world * n, q), through the official code's gather-then-concatenate."""
    return torch.cat(_GatherRows.apply(x, world), dim=0)


def _legendre(q: int, degree: int, t: torch.Tensor) -> torch.Tensor:
    # the closed forms of P_1..P_3 in dimension q, evaluated elementwise as the official code
    # does; under CUDA autocast ``t ** k`` runs in fp32 (pow is on autocast's fp32 list)
    if degree == 1:
        return t
    c = 1.0 / (q - 1) if degree == 2 else 3.0 / (q - 1)
    tf = t.float()
    return (1 + c) * tf ** 2 - c if degree == 2 else (1 + c) * tf ** 3 - c * t


def _amp_normalize(z: torch.Tensor) -> torch.Tensor:
    # F.normalize under CUDA autocast: the norm is reduced in fp32 (no copy of z), and the
    # fp16 / fp32 division promotes the result to fp32
    return z / z.norm(p=2, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12).expand_as(z)


def _amp_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # mse_loss is on CUDA autocast's fp32 list: fp16 inputs are copied to fp32 first
    return F.mse_loss(x.float(), y.float())


def _amp_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # matrix products run in fp16 under autocast; each fp32 argument gets its own fp16 copy
    return torch.mm(a.half(), b.half())


def paper_sfrik_loss(q: int, world: int, sim_coeff: float = 40000.0, mmd_coeff: float = 1.0,
                     weights: Sequence[float] = PAPER_SFRIK_WEIGHTS) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """SFRIK's loss as in the official code, with the dtypes CUDA autocast gives each op:
    normalise (fp32 out), invariance (fp32), gather, a dense N x N Gram per view (fp16) and
    the Legendre polynomials on it (fp32)."""

    def psi(t: torch.Tensor) -> torch.Tensor:
        return sum(w * _legendre(q, d + 1, t) for d, w in enumerate(weights))

    def mmd(emb: torch.Tensor) -> torch.Tensor:
        return psi(_amp_mm(emb, emb.t())).mean()

    def loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        x, y = _amp_normalize(z1), _amp_normalize(z2)
        invariance = _amp_mse(x, y)
        x, y = gather_rows(x, world), gather_rows(y, world)
        return sim_coeff * invariance + mmd_coeff * (mmd(x) + mmd(y)) / 2

    return loss


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()  # a copy: the slice is strided


def paper_vicreg_loss(q: int, world: int, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                      cov_coeff: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """VICReg's loss as in its official code, with CUDA autocast's dtypes: invariance (fp32
    copies), gather (fp16), centre, variance hinge, two q x q covariances (fp16) whose
    off-diagonal copies are squared in place and summed in fp32. ``cov_x`` and ``cov_y`` are
    locals of the official forward, alive until it returns: so here too."""

    def loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        invariance = _amp_mse(z1, z2)
        x, y = gather_rows(z1, world), gather_rows(z2, world)
        total = x.shape[0]
        x = x - x.mean(dim=0)
        y = y - y.mean(dim=0)
        std_x = torch.sqrt(x.var(dim=0) + 0.0001)
        std_y = torch.sqrt(y.var(dim=0) + 0.0001)
        std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
        cov_x = (x.T @ x) / (total - 1)
        cov_y = (y.T @ y) / (total - 1)
        cov_loss = (_off_diagonal(cov_x).pow_(2).sum(dtype=torch.float32).div(q)
                    + _off_diagonal(cov_y).pow_(2).sum(dtype=torch.float32).div(q))
        return sim_coeff * invariance + std_coeff * std_loss + cov_coeff * cov_loss

    return loss


PAPER_LOSSES = {"sfrik": paper_sfrik_loss, "vicreg": paper_vicreg_loss}


@torch.no_grad()
def paper_lars_step(params: Sequence[torch.Tensor], momentum_buffers: dict, lr: float = 0.1,
                    weight_decay: float = 1e-6, momentum: float = 0.9, eta: float = 0.001) -> None:
    """One step of VICReg's LARS (the optimiser of the paper's runs), op for op: two
    temporaries of a parameter's size (the decayed update and its rescaled copy) per
    weight tensor; biases and normalisation parameters (ndim 1) are neither decayed nor
    adapted; one momentum buffer per parameter."""
    for p in params:
        dp = p.grad
        if dp is None:
            continue
        if p.ndim != 1:
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            ratio = torch.where(param_norm > 0.0,
                                torch.where(update_norm > 0, eta * param_norm / update_norm, one), one)
            dp = dp.mul(ratio)
        mu = momentum_buffers.get(p)
        if mu is None:
            mu = momentum_buffers[p] = torch.zeros_like(p)
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)
