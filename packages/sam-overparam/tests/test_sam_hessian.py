"""Every Hessian analysis routine against dense torch.func.hessian matrices in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sam_overparam import hessian as hs


def _model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (12,), generator=generator)
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _dense_hessian(model, batch) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def flat_loss(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[name] = flat[offset : offset + size].view(shape)
            offset += size
        return _loss(lambda x: torch.func.functional_call(model, params, (x,)), batch)

    return torch.func.hessian(flat_loss)(flat0)


@pytest.fixture(scope="module")
def setup():
    model, batches = _model(), _batches()
    op = hs.HessianOperator(model, _loss, batches)
    per_batch = [_dense_hessian(model, b) for b in batches]
    full = sum(per_batch) / len(per_batch)
    return op, per_batch, full


def test_hvp_matches_dense(setup):
    op, per_batch, full = setup
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matvec(v), full @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.batch_matvec(1, v), per_batch[1] @ v, rtol=1e-10, atol=1e-12)


def test_power_iteration_and_lanczos_top_eigenvalue(setup):
    op, _, full = setup
    eigs = torch.linalg.eigvalsh(full)
    largest_magnitude = eigs[eigs.abs().argmax()]
    value, vector = hs.power_iteration(op.matvec, op.dim, iters=2000, tol=1e-14, dtype=torch.float64)
    assert value == pytest.approx(float(largest_magnitude), rel=1e-6)
    torch.testing.assert_close(full @ vector, value * vector, rtol=1e-4, atol=1e-6)
    top = hs.top_eigenvalue_lanczos(op.matvec, op.dim, steps=op.dim, k=3, dtype=torch.float64)
    torch.testing.assert_close(top, eigs.flip(0)[:3], rtol=1e-8, atol=1e-10)


def test_lanczos_basis_is_orthonormal_and_tridiagonalises(setup):
    op, _, full = setup
    alphas, betas, Q = hs.lanczos(op.matvec, op.dim, 10, dtype=torch.float64)
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
    T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    torch.testing.assert_close(Q.T @ full @ Q, T, atol=1e-9, rtol=0)


def test_hutchinson_trace_exact_and_stochastic(setup):
    op, _, full = setup
    exact = hs.hutchinson_trace(op.matvec, op.dim, num_probes=None, dtype=torch.float64)
    assert exact.value == pytest.approx(float(torch.trace(full)), rel=1e-10)
    estimate = hs.hutchinson_trace(op.matvec, op.dim, num_probes=400, seed=3, dtype=torch.float64)
    assert abs(estimate.value - float(torch.trace(full))) < 5 * estimate.stderr + 1e-12
    # Rademacher probes: the estimator's error only comes from off-diagonal entries
    diagonal = torch.diag(torch.diag(full))
    diag_only = hs.hutchinson_trace(lambda v: diagonal @ v, op.dim, num_probes=3, dtype=torch.float64)
    assert diag_only.value == pytest.approx(float(torch.trace(full)), rel=1e-12)


def test_trace_of_powers(setup):
    op, _, full = setup
    traces = hs.trace_of_powers(op, (1, 2, 3, 4), num_probes=None)
    for k, estimate in traces.items():
        assert estimate.value == pytest.approx(float(torch.trace(torch.linalg.matrix_power(full, k))), rel=1e-8)


def test_moment_nonuniformity(setup):
    op, per_batch, full = setup
    results = hs.moment_nonuniformity(op, (2, 3, 4), num_probes=None, lanczos_steps=op.dim)
    for result in results:
        k = result.power
        expected = sum(torch.linalg.matrix_power(h, k) for h in per_batch) / len(per_batch)
        full_k = torch.linalg.matrix_power(full, k)
        assert result.trace_expected == pytest.approx(float(torch.trace(expected)), rel=1e-8)
        assert result.trace_full == pytest.approx(float(torch.trace(full_k)), rel=1e-8)
        assert result.top_expected == pytest.approx(float(torch.linalg.eigvalsh(expected)[-1]), rel=1e-7)
        assert result.top_full == pytest.approx(float(torch.linalg.eigvalsh(full_k)[-1]), rel=1e-7)
    # E[H_B^2] - H^2 is a covariance, hence PSD: its trace ratio is at least one
    assert results[0].trace_ratio >= 1.0


def test_moment_traces_take_ceil_half_products_per_probe_and_batch(setup, monkeypatch):
    # Lanczos (k products per step) is left out: only the traces' products are counted.
    op, per_batch, full = setup
    monkeypatch.setattr(hs, "top_eigenvalue_lanczos", lambda *args, **kwargs: (0.0,))
    calls = {"n": 0}
    plain = op.batch_matvec

    def counted(index, vector):
        calls["n"] += 1
        return plain(index, vector)

    monkeypatch.setattr(op, "batch_matvec", counted)
    probes, batches = 5, len(per_batch)
    results = hs.moment_nonuniformity(op, (2, 3, 4), num_probes=probes, seed=3)
    # ceil(4 / 2) = 2 products per probe with each H_B (expected moments) and 2 full products
    # (one per batch each); k per power and per side before: 2 * 5 * 3 * (2 + 3 + 4) = 270
    assert calls["n"] == 2 * probes * batches * 2
    # the same Rademacher probes against dense float64 Hessians (torch.func.hessian)
    zs = torch.stack(hs._probes(op.dim, probes, 3, torch.float64, torch.device("cpu")))
    for result in results:
        k = result.power
        expected = sum(torch.linalg.matrix_power(h, k) for h in per_batch) / batches
        full_k = torch.linalg.matrix_power(full, k)
        assert result.trace_expected == pytest.approx(
            float(torch.einsum("pi,ij,pj->", zs, expected, zs)) / probes, rel=1e-9
        )
        assert result.trace_full == pytest.approx(float(torch.einsum("pi,ij,pj->", zs, full_k, zs)) / probes, rel=1e-9)


def test_spectral_density_quadrature(setup):
    op, _, full = setup
    density = hs.spectral_density(op.matvec, op.dim, num_probes=3, steps=op.dim, seed=5, dtype=torch.float64)
    eigs = torch.linalg.eigvalsh(full)
    for nodes, weights in zip(density.nodes, density.weights, strict=True):
        assert float(weights.sum()) == pytest.approx(1.0, rel=1e-10)
        # a full-length run recovers the eigenvalues (each node is an eigenvalue of H)
        distances = (nodes[:, None] - eigs[None, :]).abs().min(dim=1).values
        assert float(distances.max()) < 1e-6
    # quadrature moments equal Hutchinson on the same Rademacher probes, exactly
    generator = torch.Generator().manual_seed(5)
    probes = [(torch.randint(0, 2, (op.dim,), generator=generator) * 2 - 1).double() for _ in range(3)]
    for k in (1, 2, 3):
        hk = torch.linalg.matrix_power(full, k)
        hutchinson = sum(float(z @ hk @ z) for z in probes) / 3
        assert density.moment(k) == pytest.approx(hutchinson, rel=1e-8)
    grid = torch.linspace(float(eigs[0]) - 1, float(eigs[-1]) + 1, 4001)
    values = density.evaluate(grid, sigma=0.01)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_linear_stability_operator(setup, rho):
    op, per_batch, _ = setup
    lr = 0.7
    eye = torch.eye(op.dim, dtype=torch.float64)
    factors = [eye - lr * (h + rho * h @ h) for h in per_batch]
    dense = sum(f @ f for f in factors) / len(factors)
    expected = float(torch.linalg.eigvalsh(dense)[-1])
    assert hs.linear_stability(op, lr=lr, rho=rho, steps=op.dim) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("kind", ["operator", "lambda", "tensor_matmul", "stability"])
def test_defaults_follow_a_float64_operator(setup, kind):
    # No dtype given: the vectors must be float64 like the operator, not float32 (which made
    # power iteration fail on torch.dot and Lanczos silently round the products to float32).
    op, per_batch, full = setup
    if kind == "operator":
        matvec, dense = op.matvec, full
    elif kind == "lambda":  # a plain callable: dtype and device come from one probe product
        matvec, dense = (lambda v: op.power_matvec(v, 2)), full @ full
    elif kind == "tensor_matmul":
        matvec, dense = full.matmul, full
    else:
        # lr and rho chosen for a well-separated top eigenvalue, so power iteration is quick
        matvec = hs.stability_matvec(op, 5.0, 1.0)
        eye = torch.eye(op.dim, dtype=torch.float64)
        factors = [eye - 5.0 * (h + 1.0 * h @ h) for h in per_batch]
        dense = sum(f @ f for f in factors) / len(factors)
    eigs = torch.linalg.eigvalsh(dense)
    value, vector = hs.power_iteration(matvec, op.dim, iters=2000, tol=1e-12)
    assert vector.dtype == torch.float64
    assert value == pytest.approx(float(eigs[eigs.abs().argmax()]), rel=1e-6)
    top = hs.top_eigenvalue_lanczos(matvec, op.dim, steps=op.dim, k=2)
    assert top.dtype == torch.float64
    torch.testing.assert_close(top, eigs.flip(0)[:2], rtol=1e-9, atol=1e-11)
    alphas, _, basis = hs.lanczos(matvec, op.dim, 6)
    assert alphas.dtype == basis.dtype == torch.float64
    exact = hs.hutchinson_trace(matvec, op.dim, num_probes=None)
    assert exact.value == pytest.approx(float(torch.trace(dense)), rel=1e-11)
    density = hs.spectral_density(matvec, op.dim, num_probes=2, steps=op.dim, seed=5)
    assert density.nodes[0].dtype == torch.float64
    assert density.moment(1) == pytest.approx(hs.hutchinson_trace(matvec, op.dim, num_probes=2, seed=5).value, rel=1e-9)


def test_matvec_whose_dtype_cannot_be_probed_asks_for_it(setup):
    op, _, full = setup
    dense = full.clone()
    with pytest.raises(TypeError, match=r"a probe product with torch.float32 on cpu failed .*pass dtype="):
        hs.power_iteration(lambda v: dense @ v, op.dim)
    value, _ = hs.power_iteration(lambda v: dense @ v, op.dim, iters=2000, tol=1e-12, dtype=torch.float64)
    eigs = torch.linalg.eigvalsh(full)
    assert value == pytest.approx(float(eigs[eigs.abs().argmax()]), rel=1e-6)


def test_explicit_dtype_still_wins(setup):
    op, _, full = setup
    value, vector = hs.power_iteration(op.matvec, op.dim, iters=500, tol=1e-7, dtype=torch.float32)
    assert vector.dtype == torch.float32
    eigs = torch.linalg.eigvalsh(full)
    assert value == pytest.approx(float(eigs[eigs.abs().argmax()]), rel=1e-4)


def test_batchnorm_buffers_untouched_by_analysis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = hs.HessianOperator(model, _loss, _batches())
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bad_arguments():
    op = hs.HessianOperator(_model(), _loss, _batches())
    with pytest.raises(ValueError, match=r"lr must be > 0"):
        hs.linear_stability(op, lr=0.0)
    with pytest.raises(ValueError, match=r"rho must be >= 0, got -1"):
        hs.linear_stability(op, lr=0.1, rho=-1)
    with pytest.raises(ValueError, match=r"at least one batch"):
        hs.HessianOperator(_model(), _loss, [])
    with pytest.raises(ValueError, match=r"num_probes must be >= 1"):
        hs.hutchinson_trace(op.matvec, op.dim, num_probes=0)


def _diagonal(values: torch.Tensor):
    def matvec(v: torch.Tensor) -> torch.Tensor:
        return values * v

    return matvec


@pytest.mark.parametrize("scale", [1e-11, 1.0, 1e6])
def test_lanczos_breakdown_test_is_relative_to_the_operators_scale(scale):
    """A diagonal operator's spectrum only scaled: Lanczos must take the same number of steps and
    find the same top eigenvalue, relative to the scale (an absolute test stopped after one step at 1e-11)."""
    values = torch.linspace(0.1, 1.0, 40, dtype=torch.float64) * scale
    alphas, _, _ = hs.lanczos(_diagonal(values), 40, 25, dtype=torch.float64, device="cpu")
    assert len(alphas) == 25
    top = hs.top_eigenvalue_lanczos(_diagonal(values), 40, steps=25, dtype=torch.float64, device="cpu")
    assert float(top[0]) == pytest.approx(scale, rel=1e-6)  # was 0.47 * scale at 1e-11


def test_lanczos_still_stops_on_an_invariant_subspace():
    values = torch.tensor([2.0, 2.0, 2.0, 5.0, 5.0], dtype=torch.float64) * 1e-11
    alphas, _, _ = hs.lanczos(_diagonal(values), 5, 5, dtype=torch.float64, device="cpu")
    assert len(alphas) == 2  # two distinct eigenvalues: the Krylov space has dimension 2
    top = hs.top_eigenvalue_lanczos(_diagonal(values), 5, steps=5, k=2, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(top, torch.tensor([5e-11, 2e-11], dtype=torch.float64), rtol=1e-10, atol=0)


def test_power_iteration_reports_no_convergence_for_eigenvalues_plus_minus_one():
    values = torch.tensor([1.0, -1.0, 0.5, 0.1], dtype=torch.float64)
    with pytest.warns(hs.ConvergenceWarning, match=r"power iteration did not converge"):
        result = hs.power_iteration(_diagonal(values), 4, iters=50, dtype=torch.float64, device="cpu")
    value, _ = result  # still unpacks as (eigenvalue, vector)
    assert not result.converged and result.iterations == 50
    assert abs(value) < 1.0  # the Rayleigh quotient of a mix of +1 and -1: no eigenvalue at all


@pytest.mark.parametrize("scale", [1e-11, 1.0])
def test_power_iteration_converges_and_says_so(scale):
    values = torch.tensor([1.0, 0.5, -0.3, 0.1], dtype=torch.float64) * scale
    result = hs.power_iteration(_diagonal(values), 4, iters=500, tol=1e-12, dtype=torch.float64, device="cpu")
    assert result.converged and result.iterations < 500
    assert result.eigenvalue == pytest.approx(scale, rel=1e-10)


def test_top_eigenvalue_lanczos_warns_when_ritz_values_have_not_converged():
    values = torch.linspace(0.0, 1.0, 400, dtype=torch.float64)
    with pytest.warns(hs.ConvergenceWarning, match=r"Lanczos"):
        hs.top_eigenvalue_lanczos(_diagonal(values), 400, steps=3, dtype=torch.float64, device="cpu")
