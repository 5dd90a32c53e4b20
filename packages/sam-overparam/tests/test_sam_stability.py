"""The linear-stability verdict of ``analyze`` on hand-built quadratics whose answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sam_overparam import hessian as hs
from sam_overparam.analysis import hessian_analysis
from sam_overparam.config import AnalysisConfig, TrainConfig
from sam_overparam.train import final_lr


class _Quadratic(nn.Module):
    """``f(w) = 1/2 w^T diag(curvatures) w``: its Hessian is ``diag(curvatures)`` at every point."""

    def __init__(self, curvatures: list[float]) -> None:
        super().__init__()
        self.curvatures = torch.tensor(curvatures, dtype=torch.float64)
        self.w = nn.Parameter(torch.zeros(len(curvatures), dtype=torch.float64))


def _operator(curvatures: list[float]) -> hs.HessianOperator:
    model = _Quadratic(curvatures)
    return hs.HessianOperator(model, lambda m, _batch: 0.5 * (m.curvatures * m.w * m.w).sum(), [torch.zeros(4)])


@pytest.mark.parametrize(
    ("curvatures", "lr", "sharpness_stable", "negative_curvature"),
    [
        ([1.0, 0.5, 0.2], 0.1, True, False),  # (1 - 0.1)^2 < 1
        ([30.0, 1.0, 0.2], 0.1, False, False),  # (1 - 3)^2 = 4: too sharp for the step
        ([1.0, 0.5, -0.023], 0.1, True, True),  # (1 + 0.0023)^2 = 1.0046 from the negative direction only
        ([30.0, 1.0, -0.5], 0.1, False, True),
    ],
)
def test_verdict_separates_sharpness_from_negative_curvature(curvatures, lr, sharpness_stable, negative_curvature):
    report = hs.stability_report(_operator(curvatures), lr=lr, rho=0.0, steps=3)
    exact = max((1 - lr * c) ** 2 for c in curvatures)
    assert report.lambda_max == pytest.approx(exact, rel=1e-10)
    assert report.sharpness_stable is sharpness_stable
    assert report.negative_curvature is negative_curvature
    expected_sharpness = max((1 - lr * c) ** 2 for c in curvatures if c >= 0)
    assert report.sharpness_lambda_max == pytest.approx(expected_sharpness, rel=1e-10)
    assert ("unstable" in report.verdict) is (not sharpness_stable)
    assert ("negative curvature" in report.verdict) is negative_curvature


def test_usam_rho_enters_as_j_equals_h_plus_rho_h_squared():
    report = hs.stability_report(_operator([10.0, 1.0]), lr=0.1, rho=0.1, steps=2)
    assert report.lambda_max == pytest.approx((1 - 0.1 * (10 + 0.1 * 100)) ** 2, rel=1e-10)  # 1.0
    assert report.sharpness_stable  # exactly at the edge counts as stable


def test_final_lr_follows_the_step_schedule():
    config = TrainConfig(lr=0.1, epochs=20, milestones=[0.25, 0.5, 0.75], gamma=0.1)
    assert final_lr(config) == pytest.approx(0.1 * 0.1**3)  # epochs 15..19 run at 1e-4
    assert final_lr(TrainConfig(lr=0.1, epochs=1, milestones=[0.5], gamma=0.1)) == pytest.approx(0.1)


def test_analysis_uses_the_final_lr_and_names_the_rho_convention():
    config = TrainConfig(model="mlp", widths=[6], num_train=64, num_test=16, lr=0.1, epochs=4, rho=0.05)
    from sam_overparam.train import build_model, load_split

    split = load_split(config)
    model = build_model(config, split).double().eval()
    settings = AnalysisConfig(num_examples=32, batch_size=16, probes=2, lanczos_steps=5, density_probes=1)
    metrics, _ = hessian_analysis(model, config, settings, split)
    assert metrics["stability_lr"] == pytest.approx(final_lr(config)) and final_lr(config) < config.lr
    assert metrics["initial_lr"] == config.lr
    assert "unnormalized" in metrics["stability_rho_convention"]
    assert "normalised SAM" in metrics["stability_rho_note"]
    for verdict in metrics["stability"].values():
        assert {"lambda_max", "sharpness_lambda_max", "sharpness_stable", "negative_curvature", "verdict"} <= set(
            verdict
        )
