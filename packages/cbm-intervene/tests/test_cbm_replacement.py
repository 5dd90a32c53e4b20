"""Replacement values for a logit bottleneck: the authors' percentiles and the sign-median option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cbm_intervene.data import ConceptPredictions
from cbm_intervene.intervention import InterventionConfig, replacement_values, run_intervention


def _rare_concept_predictions() -> ConceptPredictions:
    """Concept 0 is predicted present (logit > 0) in 2 of 100 training samples: its 95th percentile is
    negative, so the authors' "present" value reads as absent to f. Concept 1 is common."""
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(100, 2, generator=generator)
    reference[:, 0] = -3.0 - reference[:, 0].abs()
    reference[:2, 0] = torch.tensor([2.0, 4.0])
    values = torch.tensor([[-2.0, 0.5], [-1.0, -0.5]])
    return ConceptPredictions(
        values=values,
        kind="logit",
        true_concepts=torch.tensor([[1.0, 1.0], [0.0, 0.0]]),
        labels=torch.tensor([1, 0]),
        n_classes=2,
        reference_values=reference,
    )


def test_percentile_present_value_of_a_rare_concept_is_not_positive():
    predictions = _rare_concept_predictions()
    low, high = replacement_values(predictions, "train")
    expected_low, expected_high = np.percentile(predictions.reference_values.numpy(), [5, 95], axis=0)
    np.testing.assert_allclose(high.numpy(), expected_high, rtol=1e-6)
    np.testing.assert_allclose(low.numpy(), expected_low, rtol=1e-6)
    assert high[0] < 0  # the pitfall the sign-median option exists for


def test_sign_median_is_the_median_of_each_side_of_zero():
    predictions = _rare_concept_predictions()
    low, high = replacement_values(predictions, "train", method="sign_median")
    reference = predictions.reference_values.numpy()
    for k in range(2):
        column = reference[:, k]
        assert high[k].item() == pytest.approx(float(np.median(column[column > 0])), rel=1e-6)
        assert low[k].item() == pytest.approx(float(np.median(column[column < 0])), rel=1e-6)
    assert high[0] == pytest.approx(3.0) and (high > 0).all() and (low < 0).all()


def test_sign_median_falls_back_to_the_percentile_magnitude_when_a_side_is_empty():
    predictions = _rare_concept_predictions()
    predictions.reference_values[:2, 0] = -0.5  # no training sample predicts concept 0 present
    _, percentile_high = replacement_values(predictions, "train")
    _, high = replacement_values(predictions, "train", method="sign_median")
    assert high[0].item() == pytest.approx(abs(percentile_high[0].item()))


def test_probability_bottleneck_ignores_the_method():
    predictions = _rare_concept_predictions()
    predictions = ConceptPredictions(
        values=torch.sigmoid(predictions.values),
        kind="prob",
        true_concepts=predictions.true_concepts,
        labels=predictions.labels,
        n_classes=2,
    )
    low, high = replacement_values(predictions, method="sign_median")
    assert low.tolist() == [0.0, 0.0] and high.tolist() == [1.0, 1.0]


def test_intervention_config_takes_the_replacement_by_name():
    assert InterventionConfig().replacement == "percentile"  # the authors' default
    with pytest.raises(ValueError, match="unknown replacement 'median'; expected one of"):
        InterventionConfig(replacement="median")


def test_full_intervention_with_sign_median_fixes_a_rare_present_concept():
    """f predicts class 1 exactly when concept 0's logit is positive: revealing sample 0's present
    concept 0 with the percentile value leaves it wrong; the sign median makes it right."""
    predictions = _rare_concept_predictions()
    f = nn.Linear(2, 2)
    with torch.no_grad():
        f.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        f.bias.zero_()
    errors = {}
    for method in ("percentile", "sign_median"):
        curve = run_intervention(predictions, f, InterventionConfig(criterion="RAND", replacement=method))
        errors[method] = float(curve.error[-1])
    assert errors == {"percentile": 0.5, "sign_median": 0.0}


def test_run_config_passes_the_replacement_to_the_engine():
    from cbm_intervene.config import InterveneRunConfig

    config = InterveneRunConfig(predictions=["p.pt"], replacement="SIGN_MEDIAN")
    assert config.replacement == "sign_median"
    assert config.intervention("error").replacement == "sign_median"
    with pytest.raises(ValueError, match="unknown replacement 'mode'"):
        InterveneRunConfig(predictions=["p.pt"], replacement="mode")


def test_hide_concepts_marks_the_requested_share_reproducibly():
    from cbm_intervene.findings import hide_concepts

    base = _rare_concept_predictions()
    many = ConceptPredictions(
        values=torch.zeros(500, 40),
        kind="prob",
        true_concepts=torch.zeros(500, 40),
        labels=torch.zeros(500, dtype=torch.long),
        n_classes=2,
    )
    hidden = ~hide_concepts(many, 0.2, seed=3).visibility
    assert abs(hidden.float().mean().item() - 0.2) < 0.01  # 20,000 draws: 4 standard deviations is 0.011
    assert torch.equal(hidden, ~hide_concepts(many, 0.2, seed=3).visibility)
    assert hide_concepts(base, 0.0, seed=0).visibility.all()


def test_hidden_concepts_are_not_rands_last_picks():
    """Hiding with the same uniforms RAND orders by would put every hidden concept last in RAND's order."""
    from cbm_intervene.findings import hide_concepts

    generator = torch.Generator().manual_seed(1)
    probs = torch.rand(400, 20, generator=generator)
    predictions = ConceptPredictions(
        values=probs,
        kind="prob",
        true_concepts=(probs > 0.5).float(),
        labels=torch.zeros(400, dtype=torch.long),
        n_classes=2,
    )
    hidden = hide_concepts(predictions, 0.3, seed=0)
    curve = run_intervention(
        hidden, nn.Linear(20, 2), InterventionConfig(criterion="RAND", not_visible="nullify", max_steps=5, seed=0)
    )
    asked_hidden = ((curve.final_values != probs) & ~hidden.visibility).float().sum(1).mean().item()
    assert asked_hidden == pytest.approx(5 * 0.3, abs=0.25)  # 2,000 asks; std of the mean about 0.05
