"""The demo table: error reductions against the standard practice (LR for SparseGPT, the mask for Wanda)."""

from __future__ import annotations

import pytest

from recon_prune.experiments import add_error_reductions, demo_table, reduction_baseline

FINAL_ERRORS = {
    ("sparsegpt", "none"): 0.25,
    ("sparsegpt", "lr"): 0.04,
    ("sparsegpt", "br+gp+cr"): 0.01,
    ("wanda", "none"): 0.2,
    ("wanda", "lr"): 0.2,
    ("wanda", "br"): 0.05,
    ("magnitude", "none"): 0.5,
    ("magnitude", "br"): 0.1,
}


def _rows() -> list[dict]:
    return [
        {"method": m, "reconstruction": r, "perplexity": 4.0, "final_block_error": e}
        for (m, r), e in FINAL_ERRORS.items()
    ]


def test_baselines_are_lr_for_sparsegpt_and_the_mask_otherwise() -> None:
    assert [reduction_baseline(m) for m in ("sparsegpt", "wanda", "magnitude")] == ["lr", "none", "none"]


def test_reductions_are_against_lr_for_sparsegpt_and_against_the_mask_for_wanda() -> None:
    rows = _rows()
    add_error_reductions(rows)
    by_run = {(r["method"], r["reconstruction"]): r for r in rows}
    # sparsegpt br+gp+cr: 1 - 0.01 / 0.04 (LR), not 1 - 0.01 / 0.25 (= 96%, the mask without its update)
    assert by_run["sparsegpt", "br+gp+cr"]["error_reduction"] == pytest.approx(0.75)
    assert by_run["sparsegpt", "lr"]["error_reduction"] == pytest.approx(0.0)
    assert by_run["sparsegpt", "none"]["error_reduction"] == pytest.approx(1 - 0.25 / 0.04)  # worse than LR
    assert by_run["wanda", "br"]["error_reduction"] == pytest.approx(0.75)
    assert by_run["magnitude", "br"]["error_reduction"] == pytest.approx(0.8)
    assert {r["method"]: r["reduction_baseline"] for r in rows} == {
        "sparsegpt": "lr",
        "wanda": "none",
        "magnitude": "none",
    }
    table = demo_table(rows, {"chunks": 2, "perplexity": 3.9}, nsamples=4, seq_len=32, eval_len=32)
    assert "| sparsegpt | br+gp+cr | 4.000 | 0.01 | 75.0% | lr |" in table
    assert "| wanda | br | 4.000 | 0.05 | 75.0% | none |" in table
    assert "error reduction | against |" in table
