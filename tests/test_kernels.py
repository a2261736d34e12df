"""sfrik_scale.kernels against float64 references (scipy's Gegenbauer, closed forms)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sp
import torch

from sfrik_scale.kernels import (EnergyKernel, GaussianKernel, QuadraticKernel, TruncatedLegendre,
                                 VICRegAnalogue, legendre, legendre_derivative, uniform_expectation)

from ._compile import fused_path  # noqa: F401 (a fixture)

QS = [3, 17, 8192, 32768, 10**6]
T = np.linspace(-1.0, 1.0, 41)


def gegenbauer_reference(ell: int, q: int, t: np.ndarray) -> np.ndarray:
    alpha = (q - 2) / 2
    return sp.eval_gegenbauer(ell, alpha, t) / sp.eval_gegenbauer(ell, alpha, 1.0)


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("ell", range(9))
def test_legendre_matches_scipy_gegenbauer(q, ell):
    np.testing.assert_allclose(legendre(ell, q, T), gegenbauer_reference(ell, q, T), rtol=0, atol=1e-13)


@pytest.mark.parametrize("ell", range(9))
def test_legendre_in_dimension_two_is_chebyshev(ell):
    np.testing.assert_allclose(legendre(ell, 2, T), sp.eval_chebyt(ell, T), atol=1e-13)


def test_legendre_low_degrees_closed_forms():
    q = 11
    np.testing.assert_allclose(legendre(2, q, T), (q * T**2 - 1) / (q - 1), atol=1e-15)
    np.testing.assert_allclose(legendre(3, q, T), ((q + 2) * T**3 - 3 * T) / (q - 1), atol=1e-15)


@pytest.mark.parametrize("q", [2, 3, 100, 10**6])
def test_legendre_is_one_at_one_and_bounded(q):
    for ell in range(12):
        assert legendre(ell, q, 1.0) == pytest.approx(1.0, abs=1e-12)
        assert np.all(np.abs(legendre(ell, q, T)) <= 1 + 1e-12)


def test_legendre_accepts_torch_and_keeps_dtype():
    t = torch.linspace(-1, 1, 5, dtype=torch.float32)
    out = legendre(3, 7, t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), legendre(3, 7, t.double().numpy()), atol=1e-6)


@pytest.mark.parametrize("q", [3, 17, 8192])
@pytest.mark.parametrize("ell", [1, 2, 3, 5, 8])
def test_legendre_derivative_matches_autograd(q, ell):
    t = torch.linspace(-0.99, 0.99, 31, dtype=torch.float64, requires_grad=True)
    legendre(ell, q, t).sum().backward()
    np.testing.assert_allclose(legendre_derivative(ell, q, t.detach()).numpy(), t.grad.numpy(),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("q", [3, 17, 8192, 32768])
def test_truncated_legendre_dphi_recurrence_matches_closed_form(q):
    coeffs = (1.0, 40.0, 40.0, 3.0, 0.5)
    kernel = TruncatedLegendre(coeffs, q)
    t = torch.linspace(-1, 1, 101, dtype=torch.float64)
    ref = sum(b * legendre_derivative(l, q, t) for l, b in enumerate(coeffs, start=1))
    np.testing.assert_allclose(kernel.dphi(t).numpy(), ref.numpy(), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(kernel.phi(t).numpy(),
                               sum(b * legendre(l, q, t) for l, b in enumerate(coeffs, 1)).numpy(),
                               atol=1e-12)


def test_truncated_legendre_residual_block_excludes_degree_one():
    kernel = TruncatedLegendre((2.0, 3.0, 4.0), q=9)
    t = torch.linspace(-1, 1, 17, dtype=torch.float64).reshape(1, -1)
    sums, d = kernel.residual_block(t, need_grad=True)
    assert sums.tolist() == pytest.approx([3.0 * float(legendre(2, 9, t).sum()), 4.0 * float(legendre(3, 9, t).sum())])
    np.testing.assert_allclose(d.numpy(), (kernel.dphi(t) - 2.0).numpy(), atol=1e-12)
    assert kernel.term_names == ("legendre_2", "legendre_3")


@pytest.mark.parametrize("q", [2, 3, 17, 8192, 10**6])
@pytest.mark.parametrize("ell", [1, 2, 3, 6])
def test_uniform_expectation_of_legendre_is_zero(q, ell):
    assert uniform_expectation(lambda t: legendre(ell, q, t), q) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("q", [2, 3, 17, 8192, 10**6])
def test_uniform_expectation_integrates_density_to_one(q):
    assert uniform_expectation(lambda t: np.ones_like(t), q) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("q", QS)
def test_quadratic_b0_is_one_over_q_and_matches_quadrature(q):
    kernel = QuadraticKernel(q)
    assert kernel.b0 == 1.0 / q
    assert uniform_expectation(kernel.phi_numpy, q) == pytest.approx(1.0 / q, rel=1e-8)


@pytest.mark.parametrize("q", [2] + QS)
@pytest.mark.parametrize("scale", [0.5, 2.5])
def test_gaussian_b0_matches_hypergeometric_closed_form(q, scale):
    # E[exp(k t)] under the uniform law = 0F1(; q/2; k^2/4)
    ref = math.exp(-2 * scale) * sp.hyp0f1(q / 2, scale**2)
    assert GaussianKernel(q, scale).b0 == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("q", [2] + QS)
@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_energy_b0_matches_beta_closed_form(q, a):
    # E|u - v|^a = 2^a B((q-1)/2 + a/2, (q-1)/2) / B((q-1)/2, (q-1)/2)
    h = (q - 1) / 2
    ref = 2**a * math.exp(sp.betaln(h + a / 2, h) - sp.betaln(h, h))
    assert EnergyKernel(q, exponent=a, constant=1.0).b0 == pytest.approx(1.0 - ref, rel=1e-8, abs=1e-12)


def test_energy_from_s_uses_slides_exponent():
    assert EnergyKernel.from_s(q=10, s=5.25).exponent == pytest.approx(1.5)


def test_vicreg_analogue_is_b1_t_plus_b2_p2():
    q = 64
    kernel = VICRegAnalogue(q, b1=2.0, b2=5.0)
    t = torch.linspace(-1, 1, 11, dtype=torch.float64)
    np.testing.assert_allclose(kernel.phi(t).numpy(), (2 * t + 5 * (q * t**2 - 1) / (q - 1)).numpy(), atol=1e-13)
    assert kernel.b0 == 0.0


def test_batch_identities_for_p1_and_p2():
    # (1/N^2) sum P_1 = |mean z|^2 ; (1/N^2) sum P_2 = (q |M|_F^2 - 1)/(q - 1), M = Z^T Z / N
    torch.manual_seed(0)
    n, q = 40, 23
    z = torch.nn.functional.normalize(torch.randn(n, q, dtype=torch.float64) + 0.3, dim=1)
    t = z @ z.T
    assert float(legendre(1, q, t).mean()) == pytest.approx(float(z.mean(0).square().sum()), rel=1e-12)
    m = z.T @ z / n
    assert float(legendre(2, q, t).mean()) == pytest.approx(float((q * m.square().sum() - 1) / (q - 1)), rel=1e-12)


@pytest.mark.parametrize("bad", [(1.0, -40.0), (-1.0,), (), (1.0, float("nan"))])
def test_truncated_legendre_rejects_bad_coefficients(bad):
    with pytest.raises(ValueError, match="coeffs"):
        TruncatedLegendre(bad, q=8)


def test_negative_coefficient_error_explains_positive_definiteness():
    with pytest.raises(ValueError, match="not positive definite"):
        TruncatedLegendre((1.0, -1.0), q=8)


@pytest.mark.parametrize("q", [1, 0, -3, 2.5, True])
def test_kernels_reject_q_below_two(q):
    with pytest.raises(ValueError, match="q"):
        TruncatedLegendre((1.0,), q=q)
    with pytest.raises(ValueError, match="q"):
        legendre(2, q, 0.5)


def test_gaussian_and_energy_reject_bad_parameters():
    with pytest.raises(ValueError, match="scale"):
        GaussianKernel(8, scale=0.0)
    with pytest.raises(ValueError, match="exponent"):
        EnergyKernel(8, exponent=2.5)
    with pytest.raises(ValueError, match="exponent"):
        EnergyKernel.from_s(q=100, s=2.0)  # a = 2s - q + 1 < 0


def test_kernel_reports_dimension_mismatch():
    assert TruncatedLegendre((1.0,), q=8).check_dim(8) is None
    assert "q=8" in TruncatedLegendre((1.0,), q=8).check_dim(9)


# ------------------------------------------------------------------ the fused block pass
FUSED_KERNELS = {
    "legendre3": lambda q: TruncatedLegendre((1.0, 40.0, 40.0), q),
    "legendre5": lambda q: TruncatedLegendre((0.5, 2.0, 3.0, 0.0, 1.0), q),
    "vicreg_analogue": lambda q: VICRegAnalogue(q, 1.0, 3.0),
    "quadratic": QuadraticKernel,
    "gaussian": lambda q: GaussianKernel(q, 2.5),
    "energy": lambda q: EnergyKernel(q, exponent=1.5, constant=2.0),
}
# fp32: the compiled loop may contract a * b + c into one fused multiply-add and sums in vector
# lanes; a few ulps of the block's largest derivative / of the sum of magnitudes.
FUSED_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("name", list(FUSED_KERNELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("need_grad", [True, False])
def test_fused_residual_block_matches_eager_block(name, dtype, need_grad, fused_path):
    kernel = FUSED_KERNELS[name](12)
    g = torch.Generator().manual_seed(0)
    for shape in ((37, 37), (37, 5)):  # one graph for both: sizes are symbolic
        t = (torch.rand(shape, generator=g, dtype=torch.float64) * 1.8 - 0.9).to(dtype)
        sums, d = kernel.fused_residual_block(t, need_grad)
        ref_sums, ref_d = kernel.residual_block(t, need_grad)
        assert sums.dtype == torch.float64 and sums.shape == ref_sums.shape
        scale = float(kernel.phi(t.double()).abs().sum()) + 1.0
        np.testing.assert_allclose(sums.numpy(), ref_sums.numpy(), rtol=0, atol=FUSED_RTOL[dtype] * scale)
        if need_grad:
            assert d.shape == t.shape and d.dtype == dtype
            np.testing.assert_allclose(d.numpy(), ref_d.numpy(), rtol=0,
                                       atol=FUSED_RTOL[dtype] * float(ref_d.abs().max()))
        else:
            assert d is None


def test_fused_blocks_of_kernels_with_other_coefficients_use_their_own(fused_path):
    """Coefficients are compile-time constants guarded by value (a symbolic float was baked into
    the first kernel's graph: the second kernel then got the first's derivative)."""
    t = torch.rand(12, 12, dtype=torch.float64) - 0.5
    for coeffs, q in (((1.0, 40.0, 40.0), 16), ((1.0, 4.0, 3.0), 16), ((1.0, 4.0, 3.0), 8)):
        kernel = TruncatedLegendre(coeffs, q)
        sums, d = kernel.fused_residual_block(t, True)
        ref_sums, ref_d = kernel.residual_block(t, True)
        np.testing.assert_allclose(sums.numpy(), ref_sums.numpy(), rtol=1e-12)
        np.testing.assert_allclose(d.numpy(), ref_d.numpy(), rtol=1e-12, atol=1e-12)
