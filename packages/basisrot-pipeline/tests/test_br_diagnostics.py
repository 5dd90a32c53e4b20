"""The Hessian (1,1)-norm diagnostic against a Kronecker-structured quadratic with a known Hessian."""

from __future__ import annotations

import pytest
import torch

from basisrot_pipeline.diagnostics import block_hessian, misalignment, rotate_hessian
from basisrot_pipeline.optim import eigenbasis


def _spd(n, seed):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(n, dtype=torch.float64)


def test_quadratic_hessian_is_kronecker_and_eigenbases_diagonalise_it():
    # f(W) = 1/2 tr(W^T A W B) has Hessian kron(A, B) in row-major vec(W)
    a, b = _spd(3, 0), _spd(4, 1)
    weight = torch.randn(3, 4, dtype=torch.float64)

    def loss(w):
        return 0.5 * torch.trace(w.T @ a @ w @ b)

    hessian = block_hessian(loss, weight)
    torch.testing.assert_close(hessian, torch.kron(a, b))
    result = misalignment(loss, weight, eigenbasis(a), eigenbasis(b))
    # in the eigenbasis the Hessian is diagonal with the (positive) eigenvalue products: norm = trace
    assert result["rotated"] == pytest.approx(result["trace"], rel=1e-8)
    assert result["original"] > result["rotated"]
    rotated = rotate_hessian(hessian, eigenbasis(a), eigenbasis(b))
    off_diagonal = rotated - torch.diag(torch.diagonal(rotated))
    assert off_diagonal.abs().max() < 1e-8


def test_identity_and_one_sided_rotation():
    hessian = _spd(6, 2)
    torch.testing.assert_close(rotate_hessian(hessian, None, None), hessian)
    torch.testing.assert_close(rotate_hessian(hessian, torch.eye(2, dtype=torch.float64), None), hessian)
    with pytest.raises(ValueError, match="do not fit a Hessian of size 6"):
        rotate_hessian(hessian, torch.eye(4), torch.eye(4))


def test_parameter_misalignment_on_a_trained_tiny_model(tiny_config, tiny_batches):
    from basisrot_pipeline.diagnostics import parameter_misalignment
    from basisrot_pipeline.model import GPT, lm_loss
    from basisrot_pipeline.optim import BasisRotation, rotation_param_groups

    torch.manual_seed(0)
    model = GPT(tiny_config)
    optimizer = BasisRotation(rotation_param_groups(model), lr=1e-2)
    for m in range(3):
        x, y = tiny_batches.batch(m)
        lm_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    x, y = tiny_batches.batch(0)
    name = "blocks.0.attn.proj.weight"  # 16 x 16: a 256 x 256 Hessian block
    unrotated = parameter_misalignment(model, name, x, y)
    result = parameter_misalignment(model, name, x, y, optimizer)
    assert unrotated["original"] == unrotated["rotated"] == pytest.approx(result["original"])
    # an orthogonal change of basis keeps the trace and the Frobenius norm, not the (1,1)-norm
    assert result["rotated"] != pytest.approx(result["original"], rel=1e-3)
    with pytest.raises(ValueError, match="expected a matrix"):
        parameter_misalignment(model, "blocks.0.ln_1.weight", x, y)
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        parameter_misalignment(model, "nope", x, y)
