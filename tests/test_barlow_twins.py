"""BarlowTwinsLoss against a float64 dense reference written out here (BatchNorm1d(affine=False)
in training mode, the full q x q cross-correlation, the official formula), in one process and
on real gloo groups of world size 2 and 3 with different data on each rank."""
from __future__ import annotations

import inspect
from functools import lru_cache

import numpy as np
import pytest
import torch
from torch import nn

from sfrik_scale.gram import NonFiniteInputError
from sfrik_scale.losses.barlow_twins import SPEC, BarlowTwinsLoss

from ._dist import run_ranks
from ._tensors import largest_tensor_numel
from .test_losses import N_PER_RANK, Q, run_loss, views

# lambd large enough that the off-diagonal term matters in the gradient at this small q
KWARGS = dict(lambd=0.3)
COMPONENTS = ("loss", "on_diagonal", "off_diagonal", "invariance")


def official_barlow_twins(z1, z2, lambd=0.0051, scale_loss=1.0):
    """BarlowTwins.forward of the official code on the full batch, one process (dense C)."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False, dtype=z1.dtype)  # training mode: batch statistics
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    off = ~torch.eye(c.shape[0], dtype=torch.bool)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c[off].pow(2).sum()
    return {"loss": scale_loss * (on_diag + lambd * off_diag), "on_diagonal": on_diag, "off_diagonal": off_diag,
            "invariance": (z1 - z2).pow(2).mean()}


def reference(z1, z2, **kwargs) -> tuple[dict, np.ndarray, np.ndarray]:
    z1, z2 = (z.detach().double().clone().requires_grad_(True) for z in (z1, z2))
    out = official_barlow_twins(z1, z2, **kwargs)
    out["loss"].backward()
    return {k: float(v.detach()) for k, v in out.items()}, z1.grad.numpy(), z2.grad.numpy()


def assert_matches(values, g1, g2, ref, r1, r2, rtol=1e-10):
    assert set(values) == set(COMPONENTS)
    for key in COMPONENTS:
        assert values[key] == pytest.approx(ref[key], rel=rtol, abs=1e-13), key
    np.testing.assert_allclose(g1, r1, rtol=rtol, atol=1e-13)
    np.testing.assert_allclose(g2, r2, rtol=rtol, atol=1e-13)


# ------------------------------------------------------------------ single process
@pytest.mark.parametrize("kwargs", [{}, KWARGS, dict(lambd=0.0039, scale_loss=1 / 32)])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 8, 100])  # one block, q blocks, uneven blocks, clipped
def test_matches_official_formula_value_components_and_gradients(kwargs, chunk_size):
    z1, z2 = views(12, Q, seed=1)
    values, g1, g2 = run_loss(BarlowTwinsLoss(**kwargs, chunk_size=chunk_size), z1, z2)
    assert_matches(values, g1, g2, *reference(z1, z2, **kwargs))


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_q_above_batch(chunk_size):
    z1, z2 = views(10, 24, seed=6)  # rank-deficient C
    values, g1, g2 = run_loss(BarlowTwinsLoss(**KWARGS, chunk_size=chunk_size), z1, z2)
    assert_matches(values, g1, g2, *reference(z1, z2, **KWARGS))


def test_official_defaults_and_detached_components():
    loss_fn = BarlowTwinsLoss()
    assert (loss_fn.lambd, loss_fn.scale_loss) == (0.0051, 1.0)
    out = loss_fn(views(6, Q, seed=2)[0].requires_grad_(True), views(6, Q, seed=2)[1])
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    assert all(not v.requires_grad and v.ndim == 0 for k, v in out.items() if k != "loss")
    assert set(BarlowTwinsLoss.local_components) == {"invariance"}
    # the invariance diagnostic is not part of the loss
    expected = out["on_diagonal"] + 0.0051 * out["off_diagonal"]
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-14)


def test_never_holds_a_q_by_q_tensor():
    """Forward and backward at q = 64 with blocks of 8 columns: no tensor of q x q elements appears."""
    q, n = 64, 16
    z1, z2 = views(n, q, seed=9)
    z1.requires_grad_(True)
    largest = largest_tensor_numel(lambda: BarlowTwinsLoss(chunk_size=8)(z1, z2)["loss"].backward())
    assert largest == 2 * n * q < q * q  # the stacked views; blocks are q x 8 = 512


def test_bf16_inputs_give_a_finite_loss_close_to_float64():
    q, n = 512, 64
    z1, z2 = views(n, q, seed=7, dtype=torch.bfloat16)
    z1.requires_grad_(True)
    out = BarlowTwinsLoss(chunk_size=100)(z1, z2)
    out["loss"].backward()
    ref = official_barlow_twins(z1.detach().double(), z2.double())  # same rounded inputs
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert z1.grad.dtype == torch.bfloat16 and bool(torch.isfinite(z1.grad).all())
    for key in COMPONENTS:
        assert float(out[key].detach()) == pytest.approx(float(ref[key]), rel=1e-4), key


# ------------------------------------------------------------------ bad input and construction
@pytest.mark.parametrize("make, match", [
    (lambda: BarlowTwinsLoss(lambd=-0.1), "lambd"),
    (lambda: BarlowTwinsLoss(lambd=float("nan")), "lambd"),
    (lambda: BarlowTwinsLoss(scale_loss=0.0), "scale_loss"),
    (lambda: BarlowTwinsLoss(chunk_size=0), "chunk_size"),
    (lambda: BarlowTwinsLoss(q=1), "q"),
])
def test_constructor_rejects_bad_coefficients(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make_inputs, error, match", [
    (lambda: (torch.randn(5, Q), torch.randn(5, Q).index_fill_(0, torch.tensor([3]), float("nan"))),
     NonFiniteInputError, "z2 holds 8 non-finite"),
    (lambda: (torch.randn(5, Q), torch.randn(6, Q)), ValueError, r"z1 \(5, 8\) and z2 \(6, 8\)"),
    (lambda: (torch.randn(5, 2, 4), torch.randn(5, 2, 4)), ValueError, "z1 must be 2-D"),
    (lambda: (torch.randn(5, Q + 1), torch.randn(5, Q + 1)), ValueError, "q=8"),
    (lambda: (torch.randn(1, Q), torch.randn(1, Q)), ValueError, "at least 2 rows"),
])
def test_rejects_bad_input_naming_it(make_inputs, error, match):
    with pytest.raises(error, match=match):
        BarlowTwinsLoss(q=Q)(*make_inputs())


def test_spec_describes_the_class():
    assert (SPEC.name, SPEC.cls, SPEC.regulariser) == ("barlow_twins", BarlowTwinsLoss, "off_diagonal")
    params = inspect.signature(BarlowTwinsLoss).parameters
    for option in SPEC.options:
        assert option.name in params, option.name
        if option.default is not None:
            assert option.default == params[option.name].default, option.name
    assert SPEC.option("lambd").problem(-1.0) and SPEC.option("scale_loss").problem(0.0)
    out = SPEC.cls(q=Q, group=None, **SPEC.defaults())(*views(6, Q, seed=3))
    assert SPEC.regulariser in out


# ------------------------------------------------------------------ distributed
def _worker(rank: int, world: int) -> dict:
    """The loss on this rank's rows of a shared global batch; then (world 3) a NaN on rank 1."""
    z1, z2 = views(N_PER_RANK * world, Q, seed=100 + world)
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    out = {chunk: run_loss(BarlowTwinsLoss(**KWARGS, chunk_size=chunk), z1[rows], z2[rows]) for chunk in (None, 3)}
    if world == 3:
        a, b = views(N_PER_RANK, Q, seed=rank)
        if rank == 1:
            b[2, 0] = float("nan")
        try:
            BarlowTwinsLoss()(a, b)
            out["nan"] = "no error"
        except ValueError as err:
            out["nan"] = f"{type(err).__name__}: {err}"
        out["after"] = float(BarlowTwinsLoss()(*views(N_PER_RANK, Q, seed=rank))["loss"])  # group still works
    return out


@lru_cache(maxsize=None)
def launched(world: int) -> tuple:
    return tuple(run_ranks(_worker, world, timeout=120))


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_contract(world):
    results = launched(world)
    z1, z2 = views(N_PER_RANK * world, Q, seed=100 + world)
    ref, ref_g1, ref_g2 = reference(z1, z2, **KWARGS)
    for chunk in (None, 3):
        for comp in COMPONENTS:
            per_rank = [res[chunk][0][comp] for res in results]
            if comp in BarlowTwinsLoss.local_components:  # this rank's own: averages to the global value
                assert np.mean(per_rank) == pytest.approx(ref[comp], rel=1e-10, abs=1e-13), (chunk, comp)
                assert len(set(per_rank)) == world, (chunk, comp)  # really per rank
            else:  # global: the single-process value, bit-identical on every rank
                assert len(set(per_rank)) == 1, (chunk, comp, per_rank)
                assert per_rank[0] == pytest.approx(ref[comp], rel=1e-10, abs=1e-13), (chunk, comp)
        for rank, res in enumerate(results):
            rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
            _, g1, g2 = res[chunk]
            # each rank's gradient / world == its rows of the single-process gradient
            np.testing.assert_allclose(g1 / world, ref_g1[rows], rtol=1e-10, atol=1e-13, err_msg=f"{chunk} z1 {rank}")
            np.testing.assert_allclose(g2 / world, ref_g2[rows], rtol=1e-10, atol=1e-13, err_msg=f"{chunk} z2 {rank}")


@pytest.mark.distributed
def test_distributed_nan_on_one_rank_raises_on_every_rank_without_hang():
    for res in launched(3):
        assert res["nan"].startswith("NonFiniteInputError") and "rank 1: z2 holds 1 non-finite" in res["nan"]
        assert np.isfinite(res["after"])


def test_its_memory_is_simulated_without_a_q_by_q_matrix():
    """The memory simulator runs the loss as the trainer builds it (small_barlow_twins recipe):
    at q = 16384 in blocks of 256 columns its workspace stays far below one q x q fp32 matrix."""
    from sfrik_scale.config import load_config
    from sfrik_scale.planning.simulate import Scenario, simulate

    cfg = load_config("small_barlow_twins", ["model.projector=512-512-16384", "loss.chunk_size=256"]).validate(1)
    estimate = simulate(Scenario.from_config(cfg, 1, device="cpu"))
    assert estimate.scenario.method == "barlow_twins"
    assert 0 < estimate.breakdown["loss_workspace"] < 16384 ** 2 * 4 / 4
