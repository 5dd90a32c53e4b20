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
