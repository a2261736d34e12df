"""sfrik_scale.gram: the chunked kernel mean against dense float64 references, in one
process and on real gloo groups of world size 2 and 3 with different data per rank."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sfrik_scale import gram
from sfrik_scale.gram import NonFiniteInputError, default_chunk_size, kernel_mean, mmd2
from sfrik_scale.kernels import (EnergyKernel, GaussianKernel, QuadraticKernel, TruncatedLegendre,
                                 VICRegAnalogue)

from ._compile import check_path, fused_path, path_report, use_path  # noqa: F401 (fused_path: a fixture)
from ._dist import run_ranks


def make_kernels(q: int) -> dict:
    return {
        "legendre3": TruncatedLegendre((1.0, 40.0, 40.0), q),
        "legendre1": TruncatedLegendre((2.0,), q),
        "legendre5": TruncatedLegendre((0.5, 2.0, 3.0, 0.0, 1.0), q),
        "vicreg_analogue": VICRegAnalogue(q, 1.0, 3.0),
        "quadratic": QuadraticKernel(q),
        "gaussian": GaussianKernel(q, 2.5),
        "energy": EnergyKernel(q, exponent=1.5, constant=2.0),
    }


KERNEL_NAMES = list(make_kernels(4))


def batch(n: int, q: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Normalised rows with some structure (a shared offset), so no term is trivially 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, q, generator=g, dtype=torch.float64) + 0.4 * torch.randn(1, q, generator=g, dtype=torch.float64)
    return F.normalize(x, dim=1).to(dtype)


def dense_reference(z: torch.Tensor, kernel) -> tuple[float, np.ndarray]:
    """Value and gradient of (1/N^2) sum phi(z_i.z_j) in float64, by autograd on the dense Gram.

    The diagonal enters through phi(|z_i|^2); for the energy kernel, whose phi' is singular at
    t = 1, the diagonal's gradient is taken as 0 (coincident points), as in the kernel."""
    z = z.detach().double().clone().requires_grad_(True)
    t = z @ z.T
    if isinstance(kernel, EnergyKernel):
        eye = torch.eye(len(z), dtype=torch.bool)
        off = kernel.phi(torch.where(eye, torch.zeros_like(t), t))
        val = (torch.where(eye, torch.full_like(t, kernel.phi_at_one), off)).mean()
    else:
        val = kernel.phi(t).mean()
    val.backward()
    return val.item(), z.grad.numpy()


# ------------------------------------------------------------------ single process
@pytest.mark.parametrize("name", KERNEL_NAMES)
@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 1000])
def test_kernel_mean_matches_dense_float64_reference(name, chunk, fused_path):
    kernel = make_kernels(16)[name]
    fused_path.expect_compiled = kernel.has_residual  # degree 1: no Gram block at all
    z = batch(37, 16).requires_grad_(True)
    value = kernel_mean(z, kernel, chunk_size=chunk)
    value.backward()
    ref_value, ref_grad = dense_reference(z, kernel)
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(z.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel_mean_passes_gradcheck(name, fused_path):
    kernel = make_kernels(5)[name]
    fused_path.expect_compiled = kernel.has_residual
    z = (0.7 * batch(6, 5, seed=3)).requires_grad_(True)  # |z| < 1 keeps the energy kernel smooth
    assert torch.autograd.gradcheck(lambda x: kernel_mean(x, kernel, chunk_size=4), (z,))


def test_terms_sum_to_value_and_are_each_orders_mean(fused_path):
    q = 12
    kernel = TruncatedLegendre((1.0, 40.0, 40.0), q)
    z = batch(30, q)
    value, terms = kernel_mean(z, kernel, chunk_size=8, return_terms=True)
    assert list(terms) == ["legendre_1", "legendre_2", "legendre_3"]
    assert float(sum(terms.values())) == pytest.approx(float(value), rel=1e-13)
    t = z @ z.T
    from sfrik_scale.kernels import legendre
    for ell, b in zip((1, 2, 3), kernel.coeffs):
        assert float(terms[f"legendre_{ell}"]) == pytest.approx(b * float(legendre(ell, q, t).mean()), rel=1e-12)


def test_degree_one_uses_no_gram(monkeypatch):
    kernel = TruncatedLegendre((3.0,), q=8)

    def forbidden(*args, **kwargs):
        raise AssertionError("the Gram was evaluated for a degree-1 kernel")

    monkeypatch.setattr(kernel, "residual_block", forbidden)
    z = batch(20, 8).requires_grad_(True)
    value = kernel_mean(z, kernel)
    value.backward()
    assert float(value.detach()) == pytest.approx(3.0 * float(z.detach().mean(0).square().sum()), rel=1e-13)
    np.testing.assert_allclose(z.grad.numpy(), np.broadcast_to(6.0 * z.detach().mean(0).numpy() / 20, (20, 8)),
                               rtol=1e-12)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


def test_chunked_forward_and_backward_never_form_the_n_by_n_gram():
    n, q, chunk = 96, 24, 16
    kernel = TruncatedLegendre((1.0, 40.0, 40.0), q)
    z = batch(n, q).requires_grad_(True)
    with ShapeRecorder() as rec:
        kernel_mean(z, kernel, chunk_size=chunk).backward()
    biggest_square = max((s for s in rec.shapes if len(s) == 2 and s[1] != q), key=lambda s: s[0] * s[1])
    assert biggest_square == (n, chunk)
    assert all(not (len(s) == 2 and s[0] == n and s[1] == n) for s in rec.shapes)


def test_default_chunk_size_bounds_block_memory():
    assert default_chunk_size(1024, 1024) == 1024
    big = default_chunk_size(65536, 65536)
    assert 64 <= big < 65536
    assert big * 65536 * 4 * gram._BLOCK_TEMPORARIES <= gram.DEFAULT_BLOCK_BYTES * 2
    assert default_chunk_size(10, 3) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_float64_at_q_32768(dtype, fused_path):
    q, n = 32768, 48
    kernel = TruncatedLegendre((1.0, 40.0, 40.0), q)
    z = batch(n, q, seed=5).to(dtype).requires_grad_(True)
    value = kernel_mean(z, kernel)
    value.backward()
    ref_value, ref_grad = dense_reference(z.detach(), kernel)  # same rounded inputs, float64
    assert value.dtype == torch.float32 and z.grad.dtype == dtype
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-3)
    rel = np.linalg.norm(z.grad.double().numpy() - ref_grad) / np.linalg.norm(ref_grad)
    assert rel < 1e-2  # the gradient itself is rounded to the input dtype


def test_mmd2_is_nonnegative_on_random_and_clustered_batches():
    q = 10
    for name, kernel in make_kernels(q).items():
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            uniform = F.normalize(torch.randn(25, q, generator=g, dtype=torch.float64), dim=1)
            clustered = F.normalize(torch.randn(25, q, generator=g, dtype=torch.float64) * 0.1 + 1.0, dim=1)
            for z in (uniform, clustered):
                assert float(mmd2(z, kernel)) >= -1e-12, name


def test_mmd2_mean_over_uniform_samples_matches_expectation():
    # E[R] over i.i.d. uniform rows = (phi(1) + (N - 1) b_0) / N, so E[MMD^2] = (phi(1) - b_0) / N
    q, n, trials = 16, 32, 400
    g = torch.Generator().manual_seed(11)
    for name, kernel in make_kernels(q).items():
        vals = torch.stack([mmd2(F.normalize(torch.randn(n, q, generator=g, dtype=torch.float64), dim=1), kernel)
                            for _ in range(trials)])
        expected = (kernel.phi_at_one - kernel.b0) / n
        stderr = float(vals.std()) / trials**0.5
        assert abs(float(vals.mean()) - expected) < 4 * stderr + 1e-12, name


# ------------------------------------------------------------------ bad input (one process)
@pytest.mark.parametrize("bad, match", [
    (torch.randn(4, 8, 2), "2-D"),
    (torch.randn(8), "2-D"),
    (torch.randn(5, 1), "q >= 2"),
    (torch.randint(0, 3, (5, 8)), "floating"),
    (torch.randn(0, 8), "no rows"),
    (torch.randn(5, 9), "q=8"),
])
def test_kernel_mean_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        kernel_mean(bad, TruncatedLegendre((1.0, 1.0), q=8))


def test_kernel_mean_rejects_non_finite_values_naming_the_row():
    z = batch(6, 8)
    z[3, 2] = float("nan")
    with pytest.raises(NonFiniteInputError, match="row 3"):
        kernel_mean(z, TruncatedLegendre((1.0, 1.0), q=8))


def test_finite_float64_values_whose_sum_overflows_are_accepted():
    z = torch.full((4, 8), 1e307, dtype=torch.float64)
    gram.validate_embeddings(z, TruncatedLegendre((1.0,), q=8))


@pytest.mark.parametrize("chunk", [0, -2, 2.5])
def test_kernel_mean_rejects_bad_chunk_size(chunk):
    with pytest.raises(ValueError, match="chunk_size"):
        kernel_mean(batch(6, 8), TruncatedLegendre((1.0, 1.0), q=8), chunk_size=chunk)


# ------------------------------------------------------------------ distributed
N_PER_RANK, Q = 9, 12


def _contract_worker(rank: int, world: int, path: str) -> dict:
    """Every kernel, several chunk sizes, on this rank's rows of a shared global batch."""
    use_path(path)
    out = {}
    full = batch(N_PER_RANK * world, Q, seed=100 + world)
    shard = full[rank * N_PER_RANK:(rank + 1) * N_PER_RANK]
    for name, kernel in make_kernels(Q).items():
        for chunk in (None, 4):
            z = shard.clone().requires_grad_(True)
            value, terms = kernel_mean(z, kernel, chunk_size=chunk, return_terms=True)
            (3.0 * value).backward()  # a non-unit upstream gradient
            out[(name, chunk)] = (value.item(), z.grad.numpy(), {k: float(v) for k, v in terms.items()})
    # the naive baseline follows the same contract
    z = shard.clone().requires_grad_(True)
    gram.dense_kernel_mean(z, make_kernels(Q)["legendre3"]).backward()
    out[("dense", None)] = (None, z.grad.numpy(), None)
    # bf16 shards: fp32 compute, contract still holds up to rounding
    z = shard.to(torch.bfloat16).requires_grad_(True)
    value = kernel_mean(z, make_kernels(Q)["legendre3"])
    value.backward()
    out[("bf16", None)] = (float(value), z.grad.float().numpy(), None)
    out["fused"] = path_report()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_contract_every_kernel(world, path):
    results = run_ranks(_contract_worker, world, path)
    for res in results:
        check_path(path, res["fused"])
    full = batch(N_PER_RANK * world, Q, seed=100 + world)
    for name, kernel in make_kernels(Q).items():
        ref_value, ref_grad = dense_reference(full, kernel)
        single_terms = kernel_mean(full, kernel, return_terms=True)[1]
        for chunk in (None, 4):
            for rank, res in enumerate(results):
                value, grad, terms = res[(name, chunk)]
                rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
                assert value == pytest.approx(ref_value, rel=1e-12, abs=1e-14), (name, rank)
                # each rank's gradient / world == its rows of the single-process gradient
                np.testing.assert_allclose(grad / world, 3.0 * ref_grad[rows], rtol=1e-10, atol=1e-12,
                                           err_msg=f"{name} chunk={chunk} rank={rank}")
                for k, v in single_terms.items():
                    assert terms[k] == pytest.approx(float(v), rel=1e-11, abs=1e-14)
    _, ref_grad = dense_reference(full, make_kernels(Q)["legendre3"])
    bf16_full = full.to(torch.bfloat16)
    bf16_value, bf16_grad = dense_reference(bf16_full, make_kernels(Q)["legendre3"])
    for rank, res in enumerate(results):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        np.testing.assert_allclose(res[("dense", None)][1] / world, ref_grad[rows], rtol=1e-10, atol=1e-12)
        assert res[("bf16", None)][0] == pytest.approx(bf16_value, rel=1e-5)
        np.testing.assert_allclose(res[("bf16", None)][1] / world, bf16_grad[rows], rtol=2e-2, atol=2e-2)


BAD_CASES = {
    "n_differs": "shard shapes",
    "q_differs": "shard shapes",
    "nan_on_one_rank": "rank 1: z holds 1 non-finite",
    "3d_on_one_rank": "rank 0: z must be 2-D",
    "kernel_q_on_one_rank": "rank 1: the kernel",
}


def _bad_input_worker(rank: int, world: int) -> dict:
    """Each case in turn on the same group: an error must leave every rank consistent."""
    out = {}
    for case in BAD_CASES:
        kernel = TruncatedLegendre((1.0, 40.0, 40.0), Q)
        z = batch(N_PER_RANK, Q, seed=rank)
        if case == "n_differs" and rank == world - 1:
            z = z[:-1]
        elif case == "q_differs" and rank == 1:
            z = batch(N_PER_RANK, Q + 1, seed=rank)
            kernel = TruncatedLegendre((1.0, 40.0, 40.0), Q + 1)
        elif case == "nan_on_one_rank" and rank == 1:
            z[2, 0] = float("inf")
        elif case == "3d_on_one_rank" and rank == 0:
            z = z.reshape(N_PER_RANK, 3, Q // 3)
        elif case == "kernel_q_on_one_rank" and rank == 1:
            kernel = TruncatedLegendre((1.0,), Q + 5)
        try:
            kernel_mean(z, kernel)
            out[case] = "no error"
        except ValueError as err:
            out[case] = f"{type(err).__name__}: {err}"
    # and the group still works afterwards
    out["after"] = kernel_mean(batch(N_PER_RANK, Q, seed=rank), TruncatedLegendre((1.0, 2.0), Q)).item()
    return out


@pytest.mark.distributed
def test_distributed_bad_input_raises_on_every_rank_without_hang():
    results = run_ranks(_bad_input_worker, 3, timeout=90)
    for case, match in BAD_CASES.items():
        for rank, res in enumerate(results):
            assert match in res[case], (case, rank, res[case])
    assert all(res["nan_on_one_rank"].startswith("NonFiniteInputError") for res in results)
    assert len({res["after"] for res in results}) == 1


def _comms_logger_worker(rank: int, world: int) -> list:
    import deepspeed
    import deepspeed.comm as dscomm

    from sfrik_scale.topology import _skip_cpu_shm_op

    _skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the existing gloo group
    dscomm.configure(enabled=True, prof_all=True, verbose=False)
    import warnings

    z = batch(N_PER_RANK, Q, seed=rank).requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:  # the process's own filters, recorded
        kernel_mean(z, make_kernels(Q)["legendre3"]).backward()
        dscomm.all_gather_into_tensor(torch.empty(2 * N_PER_RANK, Q, dtype=z.dtype), z.detach())  # as ZeRO gathers
    ops = sorted(dscomm.comms_logger.comms_dict)
    return ops, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.distributed
def test_collectives_go_through_deepspeed_comm_when_it_is_initialised():
    for ops, future_warnings in run_ranks(_comms_logger_worker, 2):
        assert {"isend", "irecv", "all_reduce", "all_gather_into_tensor"} <= set(ops), ops
        assert future_warnings == []


def _collective_warnings_worker(rank: int, world: int) -> list:
    import warnings

    from sfrik_scale import comm

    torch.manual_seed(rank)
    z = F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=1).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:  # the process's own filters, recorded
        kernel_mean(z, TruncatedLegendre([1.0, 40.0], q=16), chunk_size=3).backward()
        comm.all_gather_tensor(torch.ones(2) * rank)
        comm.all_gather_rows(z.detach())
        comm.all_gather_objects({"rank": rank})
    return [f"{w.category.__name__}: {w.message}" for w in caught
            if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def test_collectives_raise_no_deprecation_warning_on_any_rank():
    """Each rank printed torch's FutureWarning about all_gather_into_tensor (once per process, and
    again after every change of the warning filters)."""
    assert run_ranks(_collective_warnings_worker, 2) == [[], []]
