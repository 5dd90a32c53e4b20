"""Magnitude, Wanda and N:M masks against hand computations."""

from __future__ import annotations

import pytest
import torch

from recon_prune.masks import WandaStats, magnitude_mask, nm_mask, wanda_mask, wanda_scores


def test_wanda_scores_by_hand() -> None:
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]])
    x = torch.tensor([[1.0, 0.0, 2.0], [2.0, 1.0, 0.0], [2.0, 0.0, 1.0]])  # 3 tokens
    stats = WandaStats(3)
    stats.add_batch(x[:1])
    stats.add_batch(x[1:].unsqueeze(0))
    norms = torch.tensor([3.0, 1.0, 5**0.5])  # sqrt(1+4+4), sqrt(1), sqrt(4+1)
    torch.testing.assert_close(stats.feature_norms(), norms)
    expected = [[1 * 3.0, 2 * 1.0, 3 * 5**0.5], [4 * 3.0, 5 * 1.0, 0.5 * 5**0.5]]
    torch.testing.assert_close(wanda_scores(weight, norms), torch.tensor(expected))
    # lowest third per output row: row 0 drops column 1 (2.0), row 1 drops column 2 (1.118)
    mask = wanda_mask(weight, norms, 1 / 3 + 1e-9)
    assert mask.tolist() == [[True, False, True], [True, True, False]]


def test_wanda_prunes_per_row_not_globally() -> None:
    weight = torch.tensor([[10.0, 11.0, 12.0, 13.0], [1.0, 2.0, 3.0, 4.0]])
    mask = wanda_mask(weight, torch.ones(4), 0.5)
    assert mask.sum(dim=1).tolist() == [2, 2]
    global_mask = magnitude_mask(weight, 0.5)
    assert global_mask[1].sum() == 0 and global_mask[0].all()  # one threshold over the matrix


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_structure_is_exact(n: int, m: int) -> None:
    scores = torch.rand(7, 32, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(scores, n, m)
    groups = mask.view(7, 32 // m, m)
    assert torch.all(groups.sum(-1) == m - n)
    pruned_max = torch.where(~groups, scores.view(7, -1, m), torch.tensor(-1.0)).amax(-1)
    kept_min = torch.where(groups, scores.view(7, -1, m), torch.tensor(2.0)).amin(-1)
    assert torch.all(pruned_max <= kept_min)  # the N lowest of each group are the pruned ones


def test_magnitude_mask_exact_count_and_threshold() -> None:
    weight = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    mask = magnitude_mask(weight, 0.3)
    assert int((~mask).sum()) == 30
    assert weight.abs()[~mask].max() <= weight.abs()[mask].min()
    nm = magnitude_mask(weight[:, :8], 0.5, (2, 4))
    assert torch.all(nm.view(10, 2, 4).sum(-1) == 2)


def test_nm_needs_divisible_columns() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.rand(2, 6), 2, 4)
