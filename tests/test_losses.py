"""sfrik_scale.losses against float64 dense references written out here (dense Gram, full
covariance, full softmax), in one process and on real gloo groups of world size 2 and 3
with different data on each rank."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sfrik_scale.gram import NonFiniteInputError
from sfrik_scale.losses import (LOSSES, AlignUniformLoss, SFRIKLoss, SimCLRLoss, VICRegLoss, build_loss,
                                loss_parameters)

from ._compile import check_path, fused_path, path_report, use_path  # noqa: F401 (fused_path: a fixture)
from ._dist import run_ranks
from ._tensors import largest_tensor_numel

Q, N_PER_RANK = 8, 5
# Coefficients chosen so that every term matters in the gradient at this small q.
LOSS_KWARGS = {
    "sfrik": dict(coeffs=(1.0, 4.0, 3.0), sim_coeff=10.0, mmd_coeff=2.0),
    "contrastive": dict(sim_coeff=10.0, mmd_coeff=3.0),
    "align_uniform": dict(sim_coeff=10.0, mmd_coeff=2.0, scale=2.5),
    "vicreg": dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0),
    "simclr": dict(temperature=0.15),
}
NAMES = list(LOSS_KWARGS)
#: the losses with compiled (fused) passes: the kernel losses' normalisation and Gram blocks
FUSED_LOSSES = ("sfrik", "contrastive", "align_uniform")


def make_loss(name: str, q: int = Q, **overrides):
    return build_loss(name, q, **{**LOSS_KWARGS[name], **overrides})


def views(n: int, q: int, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated raw views; columns of different spread so that VICReg's variance hinge
    is active for some and not others, and a shared offset so no term is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.4, 1.6, q, dtype=torch.float64)
    base = torch.randn(n, q, generator=g, dtype=torch.float64) * scales + 0.5 * torch.randn(q, generator=g, dtype=torch.float64)
    z1 = base + 0.3 * torch.randn(n, q, generator=g, dtype=torch.float64)
    z2 = base + 0.3 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return z1.to(dtype), z2.to(dtype)


# ------------------------------------------------------------------ float64 references
def legendre_closed_form(ell: int, q: int, t: torch.Tensor) -> torch.Tensor:
    return {1: t, 2: (q * t**2 - 1) / (q - 1), 3: ((q + 2) * t**3 - 3 * t) / (q - 1)}[ell]


def ref_sfrik(z1, z2, coeffs, sim_coeff, mmd_coeff):
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    q = z1.shape[1]
    terms = [[c * legendre_closed_form(ell, q, z @ z.T).mean() for ell, c in enumerate(coeffs, 1)] for z in (a, b)]
    r1, r2 = sum(terms[0]), sum(terms[1])
    inv = ((a - b) ** 2).mean()
    out = {"loss": sim_coeff * inv + mmd_coeff * (r1 + r2) / 2, "invariance": inv, "reg_view1": r1,
           "reg_view2": r2, "mmd2": (r1 + r2) / 2}
    out.update({f"legendre_{ell}": (terms[0][ell - 1] + terms[1][ell - 1]) / 2 for ell in range(1, len(coeffs) + 1)})
    return out


def ref_contrastive(z1, z2, sim_coeff, mmd_coeff):
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    r1, r2 = ((a @ a.T) ** 2).mean(), ((b @ b.T) ** 2).mean()
    inv = ((a - b) ** 2).mean()
    return {"loss": sim_coeff * inv + mmd_coeff * (r1 + r2) / 2, "invariance": inv, "reg_view1": r1,
            "reg_view2": r2, "mmd2": (r1 + r2) / 2 - 1 / z1.shape[1]}


def ref_align_uniform(z1, z2, sim_coeff, mmd_coeff, scale):
    """The official AUH formula: log of the off-diagonal mean of exp(-2s(1 - t)) per view."""
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    off = ~torch.eye(len(a), dtype=torch.bool)
    u1, u2 = [torch.exp(-2 * scale * (1 - z @ z.T))[off].mean().log() for z in (a, b)]
    inv = F.mse_loss(a, b)
    return {"loss": sim_coeff * inv + mmd_coeff * (u1 + u2) / 2, "invariance": inv, "uniformity": (u1 + u2) / 2,
            "reg_view1": u1, "reg_view2": u2}


def official_vicreg(x, y, sim_coeff, std_coeff, cov_coeff, eps=1e-4):
    """VICReg.forward of facebookresearch/vicreg (main_vicreg.py) on the full batch, one GPU."""
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)

    def off_diagonal(m):
        n = m.shape[0]
        return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()

    cov_loss = off_diagonal(cov_x).pow(2).sum() / num_features + off_diagonal(cov_y).pow(2).sum() / num_features
    loss = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
    return {"loss": loss, "invariance": repr_loss, "variance": std_loss, "covariance": cov_loss}


def ref_simclr(z1, z2, temperature):
    """NT-Xent with the full (2N, 2N) softmax: row i's positive is its other view."""
    n = len(z1)
    emb = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    logits = (emb @ emb.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = (torch.arange(2 * n) + n) % (2 * n)
    return {"loss": F.cross_entropy(logits, target),
            "positive_sim": (emb[:n] * emb[n:]).sum(dim=1).mean(),
            "accuracy": (logits.argmax(dim=1) == target).double().mean()}


REFERENCES = {"sfrik": ref_sfrik, "contrastive": ref_contrastive, "align_uniform": ref_align_uniform,
              "vicreg": official_vicreg, "simclr": ref_simclr}


def reference(name: str, z1: torch.Tensor, z2: torch.Tensor) -> tuple[dict, np.ndarray, np.ndarray]:
    """Reference components (floats) and the gradients of its loss w.r.t. z1 and z2."""
    z1, z2 = (z.detach().double().clone().requires_grad_(True) for z in (z1, z2))
    out = REFERENCES[name](z1, z2, **LOSS_KWARGS[name])
    out["loss"].backward()
    return {k: float(v.detach()) for k, v in out.items()}, z1.grad.numpy(), z2.grad.numpy()


def run_loss(loss_fn, z1: torch.Tensor, z2: torch.Tensor) -> tuple[dict, np.ndarray, np.ndarray]:
    z1, z2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    out = loss_fn(z1, z2)
    out["loss"].backward()
    return {k: float(v.detach()) for k, v in out.items()}, z1.grad.numpy(), z2.grad.numpy()


# ------------------------------------------------------------------ single process
@pytest.mark.parametrize("name", NAMES)
def test_loss_value_components_and_gradients_match_float64_reference(name, fused_path):
    fused_path.expect_compiled = name in FUSED_LOSSES
    z1, z2 = views(12, Q, seed=1)
    values, g1, g2 = run_loss(make_loss(name), z1, z2)
    ref, r1, r2 = reference(name, z1, z2)
    for key, ref_value in ref.items():
        assert values[key] == pytest.approx(ref_value, rel=1e-10, abs=1e-13), key
    np.testing.assert_allclose(g1, r1, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g2, r2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_differentiable_and_components_are_detached(name):
    loss_fn = make_loss(name)
    z1, z2 = views(6, Q, seed=2)
    out = loss_fn(z1.requires_grad_(True), z2)
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    assert all(not v.requires_grad and v.ndim == 0 for k, v in out.items() if k != "loss")
    assert set(type(loss_fn).local_components) <= set(out)


def test_sfrik_order_terms_sum_to_mmd2_and_regularisers():
    loss_fn = SFRIKLoss(Q, coeffs=(1.0, 40.0, 40.0), sim_coeff=4000.0)
    out = loss_fn(*views(12, Q, seed=3))
    orders = [out[f"legendre_{ell}"] for ell in (1, 2, 3)]
    assert float(sum(orders)) == pytest.approx(float(out["mmd2"]), rel=1e-12)
    assert float(out["mmd2"]) == pytest.approx(float(out["reg_view1"] + out["reg_view2"]) / 2, rel=1e-12)


def test_sfrik_loss_is_sim_times_invariance_plus_mmd_times_mean_regulariser():
    loss_fn = SFRIKLoss(Q, coeffs=(1.0, 40.0, 40.0), sim_coeff=4000.0, mmd_coeff=3.0)
    out = loss_fn(*views(12, Q, seed=4))
    expected = 4000.0 * out["invariance"] + 3.0 * (out["reg_view1"] + out["reg_view2"]) / 2
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-14)


def test_sfrik_equals_slides_form_times_sim_over_q():
    # slides: (1/n) sum |z1_i - z2_i|^2 + lambda/2 (L(Z1) + L(Z2)), lambda = mmd_coeff q / sim_coeff
    q, n = 16, 10
    loss_fn = SFRIKLoss(q, coeffs=(1.0, 40.0, 40.0), sim_coeff=4000.0, mmd_coeff=1.5)
    z1, z2 = views(n, q, seed=5)
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    regs = [sum(c * legendre_closed_form(ell, q, z @ z.T).mean() for ell, c in enumerate((1.0, 40.0, 40.0), 1))
            for z in (a, b)]
    lam = loss_fn.slides_lambda
    assert lam == pytest.approx(1.5 * q / 4000.0)
    slides = ((a - b) ** 2).sum(dim=1).mean() + lam / 2 * (regs[0] + regs[1])
    assert float(loss_fn(z1, z2)["loss"]) == pytest.approx(4000.0 / q * float(slides), rel=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 24, 100])
def test_vicreg_matches_official_formula_with_paper_coefficients_and_q_above_batch(chunk_size):
    z1, z2 = views(10, 24, seed=6)  # q > N: rank-deficient covariance, every hinge active
    z1, z2 = 0.5 * z1, 0.5 * z2
    values, g1, g2 = run_loss(VICRegLoss(chunk_size=chunk_size), z1, z2)  # blocks of 1, 5 (uneven), all
    z1r, z2r = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    ref = official_vicreg(z1r, z2r, 25.0, 25.0, 1.0)
    ref["loss"].backward()
    for key in ("loss", "invariance", "variance", "covariance"):
        assert values[key] == pytest.approx(float(ref[key].detach()), rel=1e-10), key
    np.testing.assert_allclose(g1, z1r.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g2, z2r.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_vicreg_never_holds_a_q_by_q_tensor():
    """Forward and backward at q = 64 with blocks of 8 columns: no tensor of q x q elements appears."""
    q, n = 64, 16
    z1, z2 = views(n, q, seed=9)
    z1.requires_grad_(True)
    largest = largest_tensor_numel(lambda: VICRegLoss(chunk_size=8)(z1, z2)["loss"].backward())
    assert largest == 2 * n * q  # the stacked views; blocks are q x 8 = 512 < 2 n q = 2048 < q^2


def test_vicreg_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_size"):
        VICRegLoss(chunk_size=0)


def test_sfrik_bf16_inputs_give_a_finite_loss_close_to_float64(fused_path):
    q, n = 1024, 64
    loss_fn = SFRIKLoss(q, coeffs=(1.0, 40.0, 40.0), sim_coeff=4000.0)
    z1, z2 = views(n, q, seed=7, dtype=torch.bfloat16)
    z1.requires_grad_(True)
    out = loss_fn(z1, z2)
    out["loss"].backward()
    ref = ref_sfrik(z1.detach().double(), z2.double(), (1.0, 40.0, 40.0), 4000.0, 1.0)  # same rounded inputs
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert z1.grad.dtype == torch.bfloat16 and bool(torch.isfinite(z1.grad).all())
    assert float(out["loss"].detach()) == pytest.approx(float(ref["loss"]), rel=1e-3)


# ------------------------------------------------------------------ construction
def test_build_loss_builds_every_registered_loss_with_its_q():
    from pathlib import Path

    # every registered loss meets its float64 reference: here, or in its own tests/test_<name>.py
    untested = [n for n in LOSSES if n not in NAMES and not (Path(__file__).parent / f"test_{n}.py").is_file()]
    assert set(NAMES) <= set(LOSSES) and untested == []
    for name in LOSSES:
        loss_fn = build_loss(name, q=12, **{k: None for k in loss_parameters(name)})  # None: defaults
        assert loss_fn.q == 12


def test_build_loss_rejects_an_argument_the_loss_does_not_take():
    with pytest.raises(ValueError, match="'simclr' does not take coeffs; it takes temperature"):
        build_loss("simclr", q=8, coeffs=(1.0,))
    with pytest.raises(KeyError, match="known: align_uniform"):
        build_loss("barlow", q=8)


@pytest.mark.parametrize("make, match", [
    (lambda: SFRIKLoss(8, coeffs=(1.0, -1.0)), "b_2 = -1.0 < 0"),
    (lambda: SFRIKLoss(8, sim_coeff=-1.0), "sim_coeff"),
    (lambda: SFRIKLoss(8, chunk_size=0), "chunk_size"),
    (lambda: VICRegLoss(eps=0.0), "eps"),
    (lambda: VICRegLoss(q=1), "q"),
    (lambda: SimCLRLoss(temperature=0.0), "temperature"),
    (lambda: AlignUniformLoss(8, scale=-2.5), "scale"),
])
def test_constructors_reject_bad_coefficients(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------ bad input (one process)
BAD_INPUTS = {
    "views_differ": (lambda: (torch.randn(5, Q, dtype=torch.float64), torch.randn(6, Q, dtype=torch.float64)),
                     r"z1 \(5, 8\) and z2 \(6, 8\)"),
    "wrong_ndim": (lambda: (torch.randn(5, 2, 4), torch.randn(5, 2, 4)), "z1 must be 2-D"),
    "non_finite": (lambda: (torch.randn(5, Q), torch.randn(5, Q).index_fill_(0, torch.tensor([3]), float("nan"))),
                   "z2 holds 8 non-finite"),
    "q_mismatch": (lambda: (torch.randn(5, Q + 1), torch.randn(5, Q + 1)), "q=8"),
    "one_row": (lambda: (torch.randn(1, Q), torch.randn(1, Q)), "at least 2 rows"),
}


@pytest.mark.parametrize("name, case", [(name, case) for name in NAMES for case in BAD_INPUTS
                                         # a V-statistic is defined for a single row
                                         if not (case == "one_row" and name in ("sfrik", "contrastive"))])
def test_loss_rejects_bad_input_naming_it(name, case, fused_path):
    fused_path.expect_compiled = False  # most cases are rejected before any pass; the errors must not differ
    make_inputs, match = BAD_INPUTS[case]
    error = NonFiniteInputError if case == "non_finite" else ValueError
    with pytest.raises(error, match=match):
        make_loss(name)(*make_inputs())


# ------------------------------------------------------------------ distributed
# One launch per world size (spawning gloo ranks is the slow part): the world-3 launch also
# runs the bad-input cases, each test below checks one behaviour of the cached results.
DIST_BAD_CASES = {
    "nan_on_one_rank": "rank 1: z2 holds 1 non-finite",
    "3d_on_one_rank": "rank 0: z1 must be 2-D",
    "q_on_one_rank": "rank 2",
    "views_differ_on_one_rank": "shard shapes (n, q) of z2 differ",
    "views_differ_everywhere": "z1 and z2 must have the same shape",
}


def _contract(rank: int, world: int) -> dict:
    """Every loss on this rank's rows of a shared global batch; values and both gradients."""
    z1, z2 = views(N_PER_RANK * world, Q, seed=100 + world)
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    out = {name: run_loss(make_loss(name), z1[rows], z2[rows]) for name in NAMES}
    out["sfrik_chunked"] = run_loss(make_loss("sfrik", chunk_size=2), z1[rows], z2[rows])
    out["vicreg_chunked"] = run_loss(make_loss("vicreg", chunk_size=3), z1[rows], z2[rows])  # uneven blocks
    return out


def _bad_inputs(rank: int) -> dict:
    """Every loss, each case in turn on the same group: an error must leave all ranks consistent."""
    out = {}
    for name in NAMES:
        for case in DIST_BAD_CASES:
            z1, z2 = views(N_PER_RANK, Q, seed=rank)
            if case == "nan_on_one_rank" and rank == 1:
                z2[2, 0] = float("nan")
            elif case == "3d_on_one_rank" and rank == 0:
                z1 = z1.reshape(N_PER_RANK, 2, Q // 2)
            elif case == "q_on_one_rank" and rank == 2:
                z1, z2 = views(N_PER_RANK, Q + 1, seed=rank)
            elif case == "views_differ_on_one_rank" and rank == 1:
                z2 = z2[:-1]
            elif case == "views_differ_everywhere":
                z2 = z2[:-1]
            try:
                make_loss(name)(z1, z2)
                out[(name, case)] = "no error"
            except ValueError as err:
                out[(name, case)] = f"{type(err).__name__}: {err}"
        out[(name, "after")] = float(make_loss(name)(*views(N_PER_RANK, Q, seed=rank))["loss"])  # group still works
    return out


def _worker(rank: int, world: int, path: str) -> dict:
    use_path(path)
    return {"contract": _contract(rank, world), "bad": _bad_inputs(rank) if world == 3 else None,
            "fused": path_report()}


@lru_cache(maxsize=None)
def launched(world: int, path: str = "eager") -> tuple:
    return tuple(run_ranks(_worker, world, path, timeout=180))


@pytest.mark.distributed
@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_contract_every_loss(world, path):
    results = [res["contract"] for res in launched(world, path)]
    for res in launched(world, path):
        check_path(path, res["fused"])
    z1, z2 = views(N_PER_RANK * world, Q, seed=100 + world)
    for key in NAMES + ["sfrik_chunked", "vicreg_chunked"]:
        name = key.split("_chunked")[0]
        ref, ref_g1, ref_g2 = reference(name, z1, z2)
        local = LOSSES.get(name).local_components
        for comp, ref_value in ref.items():
            per_rank = [res[key][0][comp] for res in results]
            if comp in local:  # this rank's own: the mean over ranks is the global value
                assert np.mean(per_rank) == pytest.approx(ref_value, rel=1e-10, abs=1e-13), (key, comp)
            else:  # global: the single-process value on every rank
                for value in per_rank:
                    assert value == pytest.approx(ref_value, rel=1e-10, abs=1e-13), (key, comp)
        for rank, res in enumerate(results):
            rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
            _, g1, g2 = res[key]
            # each rank's gradient / world == its rows of the single-process gradient
            np.testing.assert_allclose(g1 / world, ref_g1[rows], rtol=1e-9, atol=1e-12, err_msg=f"{key} z1 {rank}")
            np.testing.assert_allclose(g2 / world, ref_g2[rows], rtol=1e-9, atol=1e-12, err_msg=f"{key} z2 {rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_distributed_bad_input_raises_on_every_rank_without_hang(path):
    results = [res["bad"] for res in launched(3, path)]
    for name in NAMES:
        for case, match in DIST_BAD_CASES.items():
            for rank, res in enumerate(results):
                assert match in res[(name, case)], (name, case, rank, res[(name, case)])
        assert all(res[(name, "nan_on_one_rank")].startswith("NonFiniteInputError") for res in results)
        assert all(np.isfinite(res[(name, "after")]) for res in results)
