"""SparseGPT against a direct row-by-row optimal-brain-surgeon loop with explicit inverses."""

from __future__ import annotations

import pytest
import torch

from recon_prune.sparsegpt import SparseGPT


def _damped_hessian(x: torch.Tensor, percdamp: float) -> torch.Tensor:
    H = 2.0 * x.T.double() @ x.double() / x.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    return H + percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)


def reference_obs(weight: torch.Tensor, x: torch.Tensor, sparsity: float, blocksize: int, percdamp: float, nm=None):
    """Frantar & Alistarh (2023), Sec. 3: columns processed left to right; pruning w_j with the not
    yet processed columns F = {j, ...} free gives delta_F = -w_j / [H_F^-1]_00 * [H_F^-1]_{0,:}.
    Each H_F^-1 is an explicit inverse here (no Cholesky trick); masks are chosen at block starts
    (or every M columns) from w^2 / [H_F^-1]_00."""
    H = _damped_hessian(x, percdamp)
    W = weight.double().clone()
    W[:, torch.diag(2.0 * x.T.double() @ x.double()) == 0] = 0.0
    rows, cols = W.shape
    inv_diag = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0].item() for j in range(cols)], dtype=torch.float64)
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if nm is None:
            scores = W[:, b0:b1] ** 2 / inv_diag[b0:b1]
            k = int(scores.numel() * sparsity)
            flat = torch.argsort(scores.flatten())[:k]
            block_mask = torch.ones(rows, b1 - b0, dtype=torch.bool)
            block_mask.view(-1)[flat] = False
            mask[:, b0:b1] = block_mask
        for r in range(rows):  # row by row
            for j in range(b0, b1):
                if nm is not None and (j - b0) % nm[1] == 0:  # N:M: choose from this row's updated weights
                    scores = W[r, j : j + nm[1]] ** 2 / inv_diag[j : j + nm[1]]
                    for c in torch.argsort(scores)[: nm[0]]:
                        mask[r, j + int(c)] = False
                if not mask[r, j]:  # a kept weight is fixed as is; later columns stay free
                    Hinv_F = torch.linalg.inv(H[j:, j:])
                    W[r, j:] -= W[r, j] / Hinv_F[0, 0] * Hinv_F[0, :]
                    W[r, j] = 0.0
    return W, mask


def _layer(rows=6, cols=32, tokens=200, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    for j in dead:
        x[:, j] = 0.0
    w = torch.randn(rows, cols, generator=g)
    return w, x


@pytest.mark.parametrize("blocksize", [8, 32])
def test_sparsegpt_matches_row_by_row_obs(blocksize: int) -> None:
    w, x = _layer()
    pruner = SparseGPT(x.shape[1])
    for chunk in x.split(64):
        pruner.add_batch(chunk)
    updated, mask = pruner.prune(w, 0.5, blocksize=blocksize, percdamp=0.01)
    ref_w, ref_mask = reference_obs(w, x, 0.5, blocksize, 0.01)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(updated.double(), ref_w, rtol=1e-4, atol=1e-4)
    assert torch.all(updated[~mask] == 0)


def test_sparsegpt_nm_matches_reference_and_structure() -> None:
    w, x = _layer(cols=16)
    pruner = SparseGPT(16)
    pruner.add_batch(x)
    updated, mask = pruner.prune(w, 0.5, nm=(2, 4), blocksize=8, percdamp=0.01)
    ref_w, ref_mask = reference_obs(w, x, 0.5, 8, 0.01, nm=(2, 4))
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(updated.double(), ref_w, rtol=1e-4, atol=1e-4)
    assert torch.all(mask.view(6, 4, 4).sum(-1) == 2)


def test_hessian_is_running_mean_of_2xxT() -> None:
    _, x = _layer(cols=8, tokens=50)
    pruner = SparseGPT(8)
    pruner.add_batch(x[:13])
    pruner.add_batch(x[13:].reshape(1, 37, 8))
    torch.testing.assert_close(pruner.H, 2 * x.T @ x / 50, rtol=1e-5, atol=1e-5)


def test_dead_inputs_are_zeroed_and_do_not_break_cholesky() -> None:
    w, x = _layer(dead=(3, 7))
    pruner = SparseGPT(32)
    pruner.add_batch(x)
    updated, mask = pruner.prune(w, 0.25, blocksize=16, percdamp=0.0)
    assert torch.all(updated[:, 3] == 0) and torch.all(updated[:, 7] == 0)
    assert torch.isfinite(updated).all()
    _ref_w, ref_mask = reference_obs(w, x, 0.25, 16, 0.0)
    assert torch.equal(mask, ref_mask)


def test_cholesky_failure_retries_with_more_damping_and_warns() -> None:
    pruner = SparseGPT(4)
    pruner.add_batch(torch.randn(10, 4))
    pruner.H = torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0]))  # indefinite: plain Cholesky fails
    with pytest.warns(RuntimeWarning, match="Cholesky factorization .* failed; succeeded after raising damping"):
        updated, mask = pruner.prune(torch.randn(2, 4), 0.5, percdamp=0.01)
    assert torch.isfinite(updated).all()
    assert int((~mask).sum()) == 4


def test_prune_without_data_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no calibration inputs"):
        SparseGPT(4).prune(torch.randn(2, 4), 0.5)
