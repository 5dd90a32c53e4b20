"""SparseGPT: one-shot pruning with the optimal-brain-surgeon update, column block by column block.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(ICML 2023), Algorithm 1. For a linear layer with weight ``W`` (rows x cols) and calibration inputs
``X``, the layer-wise objective ``||W X - W' X||^2`` has Hessian ``H = 2 X X^T`` (we average it:
``H = (2/n) sum_t x_t x_t^T``, which only rescales). Removing weight ``w_j`` of a row and keeping the
columns after ``j`` free, the OBS update is ``delta = -(w_j / [H_F^-1]_jj) [H_F^-1]_{j,:}`` with
``F`` the not-yet-processed columns. The rows of ``H_F^-1`` for ``F = {j, j+1, ...}`` are the rows of
the upper Cholesky factor ``U`` of ``H^-1`` scaled by ``U_jj`` (their Sec. 3.2), so one factorization
serves every column. Masks are chosen adaptively per block of ``blocksize`` columns from
``w^2 / U_jj^2``; for N:M they are chosen at every M-th column from the already-updated weights.

Robustness (the most reported failure of every peer): inputs that are always zero ("dead") get
``H_jj = 1`` and their weights zeroed; damping is ``percdamp * mean(diag H)``; if the Cholesky
factorization still fails, damping grows tenfold per retry and a warning says so.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

log = logging.getLogger(__name__)

MAX_DAMPING_RETRIES = 6


class SparseGPT:
    """Hessian accumulator and pruner for one linear layer (weights in ``(out, in)`` layout)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.columns = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add calibration inputs of shape ``(..., in_features)`` to the running mean Hessian."""
        x = inputs.detach().reshape(-1, self.columns).to(self.H.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * math.sqrt(2.0 / self.nsamples)
        self.H += x.T @ x

    def inverse_cholesky(self, percdamp: float, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(U, dead)``: upper Cholesky factor of the damped ``H^-1`` and the dead-input mask."""
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        mean_diag = torch.mean(torch.diag(H)).item()
        damp = percdamp * mean_diag
        eye = torch.eye(self.columns, device=H.device, dtype=H.dtype)
        for attempt in range(MAX_DAMPING_RETRIES + 1):
            L, info = torch.linalg.cholesky_ex(H + damp * eye)
            if info.item() == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info.item() == 0 and torch.isfinite(U).all():
                    if attempt:
                        message = (
                            f"SparseGPT: Cholesky factorization of the Hessian of {name} failed; "
                            f"succeeded after raising damping to {damp:.3g} ({attempt} retr{'y' if attempt == 1 else 'ies'})"
                        )
                        warnings.warn(message, RuntimeWarning, stacklevel=2)
                        log.warning(message)
                    return U, dead
            damp = max(damp * 10.0, 1e-8 * max(mean_diag, 1.0), 1e-6) if damp > 0 else max(1e-2 * mean_diag, 1e-6)
        raise RuntimeError(
            f"SparseGPT: Hessian of {name} is not positive definite even with damping {damp:.3g}; "
            "check the calibration inputs for NaN/inf"
        )

    def prune(
        self,
        weight: torch.Tensor,
        sparsity: float,
        *,
        nm: tuple[int, int] | None = None,
        blocksize: int = 128,
        percdamp: float = 0.01,
        name: str = "layer",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(updated_weight, keep_mask)``; ``weight`` (rows x cols) is not modified."""
        if self.nsamples == 0:
            raise RuntimeError(f"SparseGPT: no calibration inputs were added for {name}")
        W = weight.detach().to(self.H.device, torch.float32).clone(memory_format=torch.contiguous_format)
        _rows, cols = W.shape
        if cols != self.columns:
            raise ValueError(f"weight of {name} has {cols} input columns, Hessian has {self.columns}")
        if nm is not None and cols % nm[1]:
            raise ValueError(f"N:M pattern with M={nm[1]} needs in_features divisible by {nm[1]}, got {cols} ({name})")
        U, dead = self.inverse_cholesky(percdamp, name)
        W[:, dead] = 0.0
        mask = torch.ones_like(W, dtype=torch.bool)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            d = torch.diag(U1)
            mask1 = torch.ones(W1.shape, dtype=torch.bool, device=W1.device)
            if nm is None:
                k = int(W1.numel() * sparsity)
                if k > 0:
                    scores = W1.pow(2) / d.pow(2).unsqueeze(0)
                    mask1.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = False
            for j in range(i2 - i1):
                if nm is not None and j % nm[1] == 0:
                    group = slice(j, j + nm[1])
                    scores = W1[:, group].pow(2) / d[group].pow(2).unsqueeze(0)
                    pruned = torch.topk(scores, nm[0], dim=1, largest=False).indices
                    mask1[:, group].scatter_(1, pruned, False)
                w = W1[:, j]
                q = w * mask1[:, j]
                err = (w - q) / d[j]
                W1[:, j:] -= err.unsqueeze(1) @ U1[j, j:].unsqueeze(0)
                Q1[:, j] = q
                Err1[:, j] = err
            W[:, i1:i2] = Q1
            mask[:, i1:i2] = mask1
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        return W, mask
