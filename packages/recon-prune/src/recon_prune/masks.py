"""Mask selection for magnitude and Wanda pruning, and the shared N:M / per-row / global rules.

Masks are boolean tensors shaped like the ``(out_features, in_features)`` weight: ``True`` keeps a
weight, ``False`` prunes it. Scores are "importance": the lowest scores are pruned.

- Magnitude (Han et al., 2015): score ``|W|``; one threshold over the whole matrix.
- Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
  ICLR 2024, Eq. 1): score ``|W_ij| * ||X_j||_2`` with the norm of input feature ``j`` over all
  calibration tokens; the lowest fraction is pruned within each output row (their Sec. 3,
  "comparison group" = per output).
- N:M (Mishra et al., 2021): within each group of M consecutive input columns of a row, prune the
  N lowest scores.
"""

from __future__ import annotations

import torch


def global_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(numel * sparsity)`` lowest scores of the whole matrix."""
    k = int(scores.numel() * sparsity)
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        pruned = torch.topk(scores.flatten(), k, largest=False).indices
        mask.view(-1)[pruned] = False
    return mask


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(in_features * sparsity)`` lowest scores of every output row."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        pruned = torch.topk(scores, k, dim=1, largest=False).indices
        mask.scatter_(1, pruned, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest scores of every group of ``m`` consecutive columns in each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern with M={m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    pruned = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, pruned, False)
    return mask.reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    scores = weight.detach().abs().float()
    return nm_mask(scores, *nm) if nm is not None else global_mask(scores, sparsity)


class WandaStats:
    """Accumulates ``sum_t x_tj^2`` over calibration tokens for one linear layer's input."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.ntokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.sq_sum.device, torch.float64)
        self.sq_sum += (x * x).sum(dim=0)
        self.ntokens += x.shape[0]

    def feature_norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (Wanda, Eq. 1)."""
    return weight.detach().abs().float() * feature_norms.to(weight.device).float().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, feature_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    scores = wanda_scores(weight, feature_norms)
    return nm_mask(scores, *nm) if nm is not None else row_mask(scores, sparsity)
