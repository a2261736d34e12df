"""Rotation-invariant kernels on the sphere S^{q-1}: Legendre polynomials, the kernel
family of the SFRIK paper, and the uniform-law constant b_0.

Pure maths: no distributed code, no DeepSpeed (docs/architecture.md: only comm talks to the process group).

A kernel K(u, v) = phi(u.v) on S^{q-1} is positive definite iff
phi = sum_l b_l P_l(q; .) with b_l >= 0 (Schoenberg, 1942), where P_l(q; .) is the
Legendre polynomial of degree l in dimension q (Gegenbauer C_l^{(q-2)/2} normalised to
P_l(q; 1) = 1). The squared MMD between a distribution Q and the uniform law U is
E_{z,z'~Q}[phi(z.z')] - b_0 with b_0 = E_{u,v~U}[phi(u.v)]; under U the density of
t = u.v is proportional to (1 - t^2)^{(q-3)/2}.

Reference: L. Zheng, G. Puy, E. Riccietti, P. Perez, R. Gribonval, "Self-supervised
learning with rotation-invariant kernels", ICLR 2023.

Each kernel exposes what the chunked Gram (gram.py) needs:
  * ``linear_coeff`` c: the part c * t of phi, which the Gram code evaluates as
    c |sum_i z_i|^2 / N^2 from one all-reduced q-vector instead of the N x N Gram;
  * ``residual_block(t, need_grad)``: per-term sums over a Gram block of phi(t) - c t,
    and its derivative elementwise (``fused_residual_block``: the same, compiled into one
    pass over large blocks, see ``fused``);
  * ``b0``: E_U[phi], exact where a closed form exists, else by quadrature.
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import fused

ArrayLike = Union[torch.Tensor, np.ndarray, float]


# ----------------------------------------------------------------------------------------
# Legendre polynomials P_l(q; t)
# ----------------------------------------------------------------------------------------
def _check_q(q: int) -> int:
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 2:
        raise ValueError(f"q (the embedding dimension) must be an integer >= 2, got q={q!r}")
    return int(q)


def _check_degree(ell: int) -> int:
    if isinstance(ell, bool) or not isinstance(ell, (int, np.integer)) or ell < 0:
        raise ValueError(f"the degree ell must be an integer >= 0, got ell={ell!r}")
    return int(ell)


def _ones_like(t: ArrayLike) -> ArrayLike:
    if isinstance(t, torch.Tensor):
        return torch.ones_like(t)
    return np.ones_like(np.asarray(t, dtype=np.float64))


def _zeros_like(t: ArrayLike) -> ArrayLike:
    if isinstance(t, torch.Tensor):
        return torch.zeros_like(t)
    return np.zeros_like(np.asarray(t, dtype=np.float64))


def legendre(ell: int, q: int, t: ArrayLike) -> ArrayLike:
    """P_l(q; t), the Legendre polynomial of degree ``ell`` in dimension ``q``.

    Three-term recurrence, stable for large q (no factorials, no Gegenbauer normalisers):
    P_0 = 1, P_1 = t, P_{l+1} = ((2l + q - 2) t P_l - l P_{l-1}) / (l + q - 2).

    Args:
        ell: degree >= 0.
        q: dimension >= 2 (q = 3 gives the classical Legendre polynomials, q = 2 Chebyshev).
        t: torch tensor, numpy array or float of any shape, values in [-1, 1].
    Returns:
        Same type and shape as ``t``.

    Example:
        >>> legendre(2, 3, 0.5)   # (3 t^2 - 1) / 2
        -0.125
    """
    ell, q = _check_degree(ell), _check_q(q)
    if not isinstance(t, torch.Tensor):
        t = np.asarray(t, dtype=np.float64)
    p_prev, p = _ones_like(t), t
    if ell == 0:
        return p_prev
    for l in range(1, ell):
        p_prev, p = p, ((2 * l + q - 2) * t * p - l * p_prev) / (l + q - 2)
    return p


def legendre_derivative(ell: int, q: int, t: ArrayLike) -> ArrayLike:
    """d/dt P_l(q; t) = l (l + q - 2) / (q - 1) * P_{l-1}(q + 2; t) (Gegenbauer identity)."""
    ell, q = _check_degree(ell), _check_q(q)
    if ell == 0:
        return _zeros_like(t)
    return ell * (ell + q - 2) / (q - 1) * legendre(ell - 1, q + 2, t)


# ----------------------------------------------------------------------------------------
# Expectations under the uniform law on the sphere
# ----------------------------------------------------------------------------------------
def uniform_expectation(f: Callable[[np.ndarray], np.ndarray], q: int) -> float:
    """E[f(u.v)] for u, v independent and uniform on S^{q-1}, by adaptive quadrature.

    t = u.v has density (1 - t^2)^{(q-3)/2} / B(1/2, (q-1)/2) on [-1, 1]. With t = sin(theta)
    the weight becomes cos(theta)^{q-2} / B(...), smooth for every q >= 2, and is evaluated in
    log space so that q up to 10^6 neither overflows nor loses the normaliser. The mass sits
    within a few 1/sqrt(q) of 0, so the interval is cut at multiples of that width.
    ``f`` takes and returns float64 numpy arrays.
    """
    from scipy import integrate, special

    q = _check_q(q)
    log_norm = special.betaln(0.5, (q - 1) / 2)

    def integrand(theta: float) -> float:
        c = math.cos(theta)
        if c <= 0.0:
            return 0.0 if q > 2 else float(f(np.asarray(math.sin(theta)))) / math.exp(log_norm)
        log_w = (q - 2) * math.log(c) - log_norm
        if log_w < -745.0:  # exp underflows: the weight is exactly 0 in float64
            return 0.0
        return float(f(np.asarray(math.sin(theta)))) * math.exp(log_w)

    half = math.pi / 2
    width = 1.0 / math.sqrt(max(q - 1, 1))
    cuts = sorted({min(k * width, half) for k in (0.5, 2, 5, 10, 20, 40, 80)} | {half})
    edges = [-c for c in reversed(cuts)] + [0.0] + cuts
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            val, _ = integrate.quad(integrand, a, b, epsabs=0.0, epsrel=1e-12, limit=200)
            total += val
    return total


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
class Kernel:
    """A rotation-invariant kernel K(u, v) = phi(u.v) on S^{q-1}.

    Subclasses implement ``phi`` and ``dphi`` (torch tensors, elementwise, any float dtype)
    and may override ``linear_coeff``, ``residual_block`` and ``b0`` for speed or exactness.
    """

    name: str = "kernel"
    #: the coefficient c of the part c * t handled from the batch mean (see module docstring)
    linear_coeff: float = 0.0
    #: the name under which that linear part is reported
    linear_term_name: str = "linear"

    def __init__(self, q: int) -> None:
        self.q = _check_q(q)

    # -- elementwise ------------------------------------------------------------------
    def phi(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dphi(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def phi_numpy(self, t: np.ndarray) -> np.ndarray:
        """phi in float64 numpy (used for quadrature)."""
        return self.phi(torch.as_tensor(t, dtype=torch.float64)).numpy()

    # -- what the Gram code consumes ------------------------------------------------------
    @property
    def term_names(self) -> tuple[str, ...]:
        """Names of the entries of ``residual_block``'s per-term sums."""
        return (self.name,)

    @property
    def has_residual(self) -> bool:
        """False when phi is exactly linear_coeff * t, so no Gram block is needed at all."""
        return True

    def residual_block(self, t: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-term sums over the block of phi(t) - c t (float64 vector), and d/dt of it.

        Element-wise apart from the sums (``fused_residual_block`` hands it the block flattened).

        Args:
            t: a Gram block (n, c), or that block flattened; fp32 or fp64.
            need_grad: whether to return the derivative block (else None).
        """
        val = self.phi(t)
        if self.linear_coeff:
            val = val - self.linear_coeff * t
        sums = val.sum(dtype=torch.float64).reshape(1)
        d = None
        if need_grad:
            d = self.dphi(t)
            if self.linear_coeff:
                d = d - self.linear_coeff
        return sums, d

    def fused_residual_block(self, t: torch.Tensor, need_grad: bool
                             ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``residual_block``, compiled by ``fused`` into one loop over blocks of at least
        ``fused.COMPILE_MIN_ELEMENTS`` entries (it reads t once and writes the derivative
        once); eager below that, or where compiling is off or fails. What the Gram code calls."""
        if not fused.wants_compile(t.numel(), t):
            return self.residual_block(t, need_grad)
        # flattened: residual_block is element-wise plus sums, and one dynamic size compiles
        # one graph for every block shape
        sums, dphi = _FUSED_RESIDUAL_BLOCK(self, t.reshape(-1), need_grad, elements=t.numel())
        return sums, (dphi.view(t.shape) if dphi is not None else None)

    # -- constants ----------------------------------------------------------------------
    @cached_property
    def b0(self) -> float:
        """b_0 = E_{u,v ~ U}[phi(u.v)], the constant subtracted to turn the mean into MMD^2."""
        return uniform_expectation(self.phi_numpy, self.q)

    @property
    def phi_at_one(self) -> float:
        """phi(1): the value of every diagonal Gram entry of normalised embeddings."""
        return float(self.phi(torch.ones((), dtype=torch.float64)))

    def check_dim(self, q: int, what: str = "z") -> Optional[str]:
        """An error message when the data's width differs from the kernel's q, else None."""
        if q != self.q:
            return (f"the kernel {self.name!r} was built for q={self.q} but {what} has "
                    f"{q} columns")
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(q={self.q})"


def _residual_block(kernel: Kernel, t: torch.Tensor, need_grad: bool):
    return kernel.residual_block(t, need_grad)


# The kernel's parameters are compile-time constants: one graph per kernel, dtype and grad mode
# (TruncatedLegendre passes its numbers as a tensor instead: one graph per degree).
_FUSED_RESIDUAL_BLOCK = fused.Fusible(_residual_block, "a kernel's Gram-block pass")


def _check_coeffs(coeffs: Sequence[float], what: str = "coeffs") -> tuple[float, ...]:
    try:
        values = tuple(float(c) for c in coeffs)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of numbers (b_1, ..., b_L), got {coeffs!r}") from None
    if len(values) == 0:
        raise ValueError(f"{what} must hold at least one coefficient (b_1, ..., b_L), got none")
    for i, c in enumerate(values, start=1):
        if not math.isfinite(c):
            raise ValueError(f"{what}: b_{i} = {c} is not finite")
        if c < 0:
            raise ValueError(f"{what}: b_{i} = {c} < 0; a Legendre kernel with a negative "
                             f"coefficient is not positive definite (Schoenberg), so its MMD "
                             f"can be negative. Use coefficients >= 0.")
    return values


class TruncatedLegendre(Kernel):
    """SFRIK's kernel phi(t) = sum_{l=1..L} b_l P_l(q; t), b_l >= 0.

    b_0 = 0 (no constant term, and E_U[P_l] = 0 for l >= 1), so the kernel mean is the MMD^2.
    The degree-1 term b_1 t is handled by the mean-vector identity
    (1/N^2) sum_{i,j} z_i.z_j = |mean z|^2 in the Gram code.

    Args:
        coeffs: (b_1, ..., b_L), all >= 0; SFRIK's published L = 3 recipe is (1, 40, 40).
        q: embedding dimension >= 2.

    Example:
        >>> k = TruncatedLegendre((1.0, 40.0, 40.0), q=8192)
        >>> k.phi(torch.tensor([1.0]))  # sum of the coefficients
        tensor([81.])
    """

    name = "legendre"
    linear_term_name = "legendre_1"

    def __init__(self, coeffs: Sequence[float], q: int) -> None:
        super().__init__(q)
        self.coeffs = _check_coeffs(coeffs)
        self.degree = len(self.coeffs)
        self.linear_coeff = self.coeffs[0]
        self._tables: dict = {}  # device -> _recurrence_table

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(f"legendre_{l}" for l in range(2, self.degree + 1))

    @property
    def has_residual(self) -> bool:
        return self.degree >= 2

    def _recurrence(self, t: torch.Tensor, need_grad: bool, start: int):
        """Yield (l, P_l, P_l') for l = 1..L; derivatives by differentiating the recurrence."""
        q = self.q
        p_prev, p = torch.ones_like(t), t
        d_prev = d = None
        if need_grad:
            d_prev, d = torch.zeros_like(t), torch.ones_like(t)
        yield 1, p, d
        for l in range(1, self.degree):
            a, b = (2 * l + q - 2) / (l + q - 2), l / (l + q - 2)
            p_next = a * t * p - b * p_prev
            if need_grad:
                d_next = a * (p + t * d) - b * d_prev
                d_prev, d = d, d_next
            p_prev, p = p, p_next
            yield l + 1, p, d

    def residual_block(self, t: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        sums = torch.zeros(max(self.degree - 1, 0), dtype=torch.float64, device=t.device)
        dphi = torch.zeros_like(t) if need_grad else None
        for l, p, d in self._recurrence(t, need_grad, start=2):
            if l == 1:
                continue
            b = self.coeffs[l - 1]
            sums[l - 2] = b * p.sum(dtype=torch.float64)
            if need_grad:
                dphi.add_(d, alpha=b)
        return sums, dphi

    def fused_residual_block(self, t: torch.Tensor, need_grad: bool
                             ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # The kernel's numbers travel as a tensor, not as compile-time constants: every q and
        # every set of coefficients of one degree share one graph (compiled once per process, and
        # once per machine through inductor's cache, whatever the recipe).
        if not fused.wants_compile(t.numel(), t):
            return self.residual_block(t, need_grad)
        table = self._tables.get(t.device)
        if table is None:
            table = self._tables[t.device] = self._recurrence_table().to(t.device)
        sums, dphi = _FUSED_LEGENDRE_BLOCK(t.reshape(-1), table, need_grad, elements=t.numel())
        return sums, (dphi.view(t.shape) if dphi is not None else None)

    def _recurrence_table(self) -> torch.Tensor:
        """(3, L - 1) float64: a_l and b_l of P_{l+1} = a_l t P_l - b_l P_{l-1} (l = 1..L-1), as
        in ``_recurrence``, and the coefficient b_{l+1} of the polynomial that step produces."""
        q = self.q
        rows = [((2 * l + q - 2) / (l + q - 2), l / (l + q - 2), self.coeffs[l]) for l in range(1, self.degree)]
        return torch.tensor(rows, dtype=torch.float64).T.contiguous()

    def phi(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(t)
        for l, p, _ in self._recurrence(t, False, start=1):
            out = out + self.coeffs[l - 1] * p
        return out

    def dphi(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(t)
        for l, _, d in self._recurrence(t, True, start=1):
            out = out + self.coeffs[l - 1] * d
        return out

    @cached_property
    def b0(self) -> float:
        return 0.0

    def __repr__(self) -> str:
        return f"TruncatedLegendre(coeffs={self.coeffs}, q={self.q})"


def _legendre_block(t: torch.Tensor, table: torch.Tensor, need_grad: bool):
    """``TruncatedLegendre.residual_block`` with the recurrence's numbers read from ``table``
    (``_recurrence_table``), the same operations in the same order."""
    sums = []
    p_prev, p = torch.ones_like(t), t
    d_prev = d = dphi = None
    if need_grad:
        d_prev, d = torch.zeros_like(t), torch.ones_like(t)
    for i in range(table.shape[1]):
        a, b, coeff = table[0, i].to(t.dtype), table[1, i].to(t.dtype), table[2, i]
        p_next = a * t * p - b * p_prev
        if need_grad:
            d_prev, d = d, a * (p + t * d) - b * d_prev
        p_prev, p = p, p_next
        sums.append(coeff * p.sum(dtype=torch.float64))
        if need_grad:
            step = coeff.to(t.dtype) * d
            dphi = step if dphi is None else dphi + step
    return torch.stack(sums), dphi


_FUSED_LEGENDRE_BLOCK = fused.Fusible(_legendre_block, "the Legendre kernel's Gram-block pass")


class VICRegAnalogue(TruncatedLegendre):
    """The kernel behind VICReg's regulariser: phi(t) = b_1 t + b_2 P_2(q; t).

    P_2(q; t) = (q t^2 - 1)/(q - 1); its batch mean equals (q |M|_F^2 - 1)/(q - 1) with
    M = Z^T Z / N, the (uncentred) covariance whose off-diagonal VICReg penalises.
    """

    name = "vicreg_analogue"

    def __init__(self, q: int, b1: float = 1.0, b2: float = 1.0) -> None:
        super().__init__((b1, b2), q)

    def __repr__(self) -> str:
        return f"VICRegAnalogue(q={self.q}, b1={self.coeffs[0]}, b2={self.coeffs[1]})"


class QuadraticKernel(Kernel):
    """phi(t) = t^2: the sample-contrastive regulariser (Garrido et al., 2023).

    Legendre expansion: t^2 = 1/q + (q - 1)/q P_2(q; t), so b_0 = 1/q exactly.
    """

    name = "quadratic"

    def phi(self, t: torch.Tensor) -> torch.Tensor:
        return t * t

    def dphi(self, t: torch.Tensor) -> torch.Tensor:
        return 2 * t

    @cached_property
    def b0(self) -> float:
        return 1.0 / self.q


class GaussianKernel(Kernel):
    """phi(t) = exp(-2 s (1 - t)) = exp(-s |u - v|^2) on the sphere (Wang & Isola, 2020).

    b_0 = exp(-2s) 0F1(; q/2; s^2) in closed form; the default uses quadrature (tested
    against that identity).

    Args:
        q: embedding dimension.
        scale: s > 0 (the paper's alignment-uniformity recipe uses 2.5).
    """

    name = "gaussian"

    def __init__(self, q: int, scale: float = 2.0) -> None:
        super().__init__(q)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got scale={scale!r}")
        self.scale = float(scale)

    def phi(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-2.0 * self.scale * (1.0 - t))

    def dphi(self, t: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.scale * self.phi(t)

    def __repr__(self) -> str:
        return f"GaussianKernel(q={self.q}, scale={self.scale})"


class EnergyKernel(Kernel):
    """phi(t) = C - |u - v|^a = C - (2 - 2t)^{a/2}, 0 < a <= 2 (energy distance / PointContrast).

    The slides write the exponent as a = 2s - q + 1. -|u - v|^a is conditionally positive
    definite for 0 < a <= 2, so the MMD^2 (kernel mean - b_0) is >= 0 whatever C; C only
    shifts b_0. Coincident points (t = 1) get derivative 0: |u - v|^a is flat there for
    a > 1 and 0 is a subgradient for a <= 1, and any radial component is removed by the
    normalisation before the kernel anyway.
    """

    name = "energy"

    def __init__(self, q: int, exponent: float = 1.0, constant: float = 0.0) -> None:
        super().__init__(q)
        if not (isinstance(exponent, (int, float)) and 0 < exponent <= 2):
            raise ValueError(f"exponent must satisfy 0 < a <= 2 (else -|u-v|^a is not "
                             f"conditionally positive definite), got exponent={exponent!r}")
        self.exponent = float(exponent)
        self.constant = float(constant)

    @classmethod
    def from_s(cls, q: int, s: float, constant: float = 0.0) -> "EnergyKernel":
        """The slides' parametrisation: exponent a = 2s - q + 1."""
        return cls(q, exponent=2 * s - q + 1, constant=constant)

    def phi(self, t: torch.Tensor) -> torch.Tensor:
        dist2 = torch.clamp(2.0 - 2.0 * t, min=0.0)
        return self.constant - dist2 ** (self.exponent / 2)

    def dphi(self, t: torch.Tensor) -> torch.Tensor:
        dist2 = torch.clamp(2.0 - 2.0 * t, min=0.0)
        a = self.exponent
        if a == 2.0:
            return torch.full_like(t, 2.0)
        safe = torch.where(dist2 > 1e-12, dist2, torch.ones_like(dist2))
        return torch.where(dist2 > 1e-12, a * safe ** (a / 2 - 1), torch.zeros_like(dist2))

    def __repr__(self) -> str:
        return f"EnergyKernel(q={self.q}, exponent={self.exponent}, constant={self.constant})"
