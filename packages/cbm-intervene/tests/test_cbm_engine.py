"""Levels, ordering, replacement values, conceptualization, visibility and cost of the engine."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cbm_intervene.data import ConceptGroups, ConceptPredictions
from cbm_intervene.intervention import (
    CostModel,
    InterventionConfig,
    TargetPredictor,
    replacement_values,
    run_intervention,
)

LEVELS = ["I+S", "G+S", "I+B", "G+B"]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("ordering", ["static", "adaptive"])
@pytest.mark.parametrize("criterion", ["RAND", "UCP", "ECTP"])
def test_each_step_intervenes_exactly_the_stated_number(level, ordering, criterion, prob_predictions, target):
    curve = run_intervention(
        prob_predictions, target, InterventionConfig(criterion=criterion, level=level, ordering=ordering)
    )
    n = prob_predictions.n_samples
    sizes = np.array([len(m) for m in prob_predictions.groups.members])
    n_units = len(sizes) if level.startswith("G") else prob_predictions.n_concepts
    assert len(curve.steps) == n_units + 1
    for t in range(n_units + 1):
        if level.endswith("S"):
            assert (curve.unit_counts[t] == t).all(), (level, t, curve.unit_counts[t])
        else:
            assert curve.unit_counts[t].sum() == min(t * n, n * n_units)
        if level.startswith("I"):
            np.testing.assert_array_equal(curve.concept_counts[t], curve.unit_counts[t])
    if level == "G+S":  # concepts asked = sizes of the chosen groups, so at most the t largest groups
        largest = np.cumsum(np.sort(sizes)[::-1])
        for t in range(1, n_units + 1):
            assert (curve.concept_counts[t] <= largest[t - 1]).all()
    assert (curve.concept_counts[-1] == prob_predictions.n_concepts).all()


def test_static_individual_order_is_initial_top_t(prob_predictions, target):
    uncertainty = (prob_predictions.values - 0.5).abs()
    for t in (1, 3):
        curve = run_intervention(prob_predictions, target, InterventionConfig(criterion="UCP", max_steps=t))
        changed = curve.final_values != prob_predictions.values
        expected = torch.zeros_like(changed)
        expected.scatter_(1, uncertainty.argsort(1)[:, :t], True)
        # a revealed concept whose prediction already equals the truth shows no change
        same = prob_predictions.values == prob_predictions.true_concepts
        assert ((changed == expected) | same).all()


def test_batch_level_ranks_all_pairs_together(prob_predictions, target):
    n = prob_predictions.n_samples
    curve = run_intervention(prob_predictions, target, InterventionConfig(criterion="UCP", level="I+B", max_steps=1))
    changed = curve.final_values != prob_predictions.values
    flat = (prob_predictions.values - 0.5).abs().flatten()
    expected = torch.zeros(flat.shape, dtype=torch.bool)
    expected[flat.argsort()[:n]] = True
    assert (changed.flatten() == expected).all()
    assert curve.concept_counts[1].sum() == n and curve.concept_counts[1].max() > 1  # uneven per sample


def test_group_score_mean_and_max_differ_as_defined(prob_predictions, target):
    # sample 0 under LCP: group a = {0,1} has losses (0.95, 0): mean 0.475, max 0.95, mean of squares
    # 0.45125; group b = {2,3,4} has losses (0.6, 0.6, 0.6): mean 0.6, max 0.6, mean of squares 0.36;
    # group c = {5}: 0
    values, true = prob_predictions.values.clone(), prob_predictions.true_concepts.clone()
    values[0] = torch.tensor([0.95, 0.0, 0.6, 0.6, 0.6, 1.0])
    true[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    predictions = ConceptPredictions(**{**prob_predictions.__dict__, "values": values, "true_concepts": true})
    chosen = {}
    for how in ("mean_unsquared", "max", "mean"):
        config = InterventionConfig(criterion="LCP", level="G+S", group_score=how, max_steps=1, allow_oracle=True)
        chosen[how] = int(run_intervention(predictions, target, config).concept_counts[1][0])
    assert chosen["max"] == 2  # group a (2 concepts) by its worst member
    assert chosen["mean_unsquared"] == 3  # group b (3 concepts) by its mean
    assert chosen["mean"] == 2  # the default squares LCP's losses first (the authors' tti.py): group a


def test_full_intervention_reaches_error_of_f_on_true_concepts(prob_predictions, target):
    curve = run_intervention(prob_predictions, target, InterventionConfig(criterion="UCP"))
    with torch.no_grad():
        expected = (target(prob_predictions.true_concepts).argmax(1) != prob_predictions.labels).float().mean().item()
    assert curve.error[-1] == pytest.approx(expected)
    torch.testing.assert_close(curve.final_values, prob_predictions.true_concepts)


def test_full_intervention_on_logits_uses_percentiles(logit_predictions, target):
    low, high = replacement_values(logit_predictions, "train")
    reference = logit_predictions.reference_values.numpy()
    np.testing.assert_allclose(low.numpy(), np.percentile(reference, 5, axis=0), rtol=1e-5)
    np.testing.assert_allclose(high.numpy(), np.percentile(reference, 95, axis=0), rtol=1e-5)
    eval_low, _ = replacement_values(logit_predictions, "eval")
    np.testing.assert_allclose(eval_low.numpy(), np.percentile(logit_predictions.values.numpy(), 5, axis=0), rtol=1e-5)
    curve = run_intervention(logit_predictions, target, InterventionConfig(criterion="ECTP", level="G+B"))
    revealed = torch.where(logit_predictions.true_concepts > 0.5, high, low)
    torch.testing.assert_close(curve.final_values, revealed)
    with torch.no_grad():
        expected = (target(revealed).argmax(1) != logit_predictions.labels).float().mean().item()
    assert curve.error[-1] == pytest.approx(expected)


def test_class_level_concepts_drive_error_to_zero():
    """Concepts that determine the class and an f that decodes them: full intervention gives 0 error."""
    codes = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    labels = torch.arange(4).repeat(5)
    true = codes[labels]
    target = torch.nn.Linear(3, 4)
    with torch.no_grad():  # score(class y) = 2 c.code_y - |code_y|: maximal exactly at the class's own code
        target.weight.copy_(2 * codes - 1)
        target.bias.copy_(-codes.sum(1) + 0.5 * (codes.sum(1) == 0).float())
    noisy = (true + 0.45 * torch.randn(true.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    predictions = ConceptPredictions(values=noisy, kind="prob", true_concepts=true, labels=labels, n_classes=4)
    for criterion in ("RAND", "UCP", "LCP", "CCTP", "ECTP", "EUDTP"):
        curve = run_intervention(predictions, target, InterventionConfig(criterion=criterion, allow_oracle=True))
        assert curve.error[0] > 0
        assert curve.error[-1] == 0.0
    lcp = run_intervention(predictions, target, InterventionConfig(criterion="LCP", allow_oracle=True))
    rand = run_intervention(predictions, target, InterventionConfig(criterion="RAND"))
    assert lcp.error[1] <= rand.error[1]


@pytest.mark.parametrize("policy", ["nullify", "keep", "skip"])
def test_not_visible_policies(policy, prob_predictions, target):
    visibility = torch.ones(prob_predictions.n_samples, prob_predictions.n_concepts, dtype=torch.bool)
    visibility[:, 0] = False
    predictions = ConceptPredictions(**{**prob_predictions.__dict__, "visibility": visibility})
    curve = run_intervention(predictions, target, InterventionConfig(criterion="UCP", not_visible=policy))
    final = curve.final_values
    if policy == "nullify":
        assert (final[:, 0] == 0).all()
        assert (curve.concept_counts[-1] == predictions.n_concepts).all()
    else:
        torch.testing.assert_close(final[:, 0], predictions.values[:, 0])
    if policy == "skip":  # never asked: one step fewer has an effect and the count stops at K-1
        assert (curve.concept_counts[-1] == predictions.n_concepts - 1).all()
    torch.testing.assert_close(final[:, 1:], predictions.true_concepts[:, 1:])


def test_samp_equals_soft_on_binary_bottleneck(prob_predictions, target):
    binary = ConceptPredictions(**{**prob_predictions.__dict__, "values": (prob_predictions.values > 0.5).float()})
    soft = run_intervention(binary, target, InterventionConfig(criterion="UCP", conceptualization="soft"))
    samp = run_intervention(binary, target, InterventionConfig(criterion="UCP", conceptualization="samp", n_samples=3))
    np.testing.assert_allclose(samp.error, soft.error)


def test_hard_thresholds_probabilities_at_half(prob_predictions, target):
    hard = run_intervention(
        prob_predictions, target, InterventionConfig(criterion="UCP", conceptualization="hard", max_steps=0)
    )
    with torch.no_grad():
        predicted = target((prob_predictions.values >= 0.5).float()).argmax(1)
    assert hard.error[0] == pytest.approx((predicted != prob_predictions.labels).float().mean().item())


@pytest.mark.parametrize("kind", ["prob", "logit"])
def test_hard_evaluation_and_lookahead_read_the_same_thresholded_bottleneck(kind, predictions_factory, target):
    predictions = predictions_factory(kind)
    low, high = replacement_values(predictions)
    values = predictions.values.clone()
    values[:, 0] = 0.25  # a logit of 0.25 is present (threshold 0), a probability of 0.25 absent
    intervened = torch.zeros_like(values, dtype=torch.bool)
    intervened[:, 1] = True  # a revealed concept keeps its value
    present = values >= (0.5 if kind == "prob" else 0.0)
    expected = torch.where(present, high, low) if kind == "logit" else present.float()
    expected[:, 1] = values[:, 1]
    predictor = TargetPredictor(target, kind, "hard", low, high)
    torch.testing.assert_close(predictor.lookahead_inputs(values, intervened), expected)
    with torch.no_grad():
        reference = torch.log_softmax(target(expected), dim=-1)
    torch.testing.assert_close(predictor.log_proba(values, intervened), reference)
    torch.testing.assert_close(predictor.lookahead_log_proba(values, intervened), reference)


def test_cost_model_counts_concepts_groups_and_forward_passes(prob_predictions, target):
    costs = CostModel(concept=2.0, group=5.0, forward_pass=0.1)
    k = prob_predictions.n_concepts
    # one pass on the current bottleneck plus two hypotheticals per candidate concept
    static = run_intervention(prob_predictions, target, InterventionConfig(criterion="ECTP", costs=costs))
    np.testing.assert_allclose(static.forward_passes_per_sample, [0] + [2 * k + 1] * k)
    np.testing.assert_allclose(static.cost_per_sample, 2.0 * np.arange(k + 1) + 0.1 * np.array([0] + [2 * k + 1] * k))
    adaptive = run_intervention(
        prob_predictions, target, InterventionConfig(criterion="ECTP", ordering="adaptive", costs=costs)
    )
    # re-scoring before step t looks ahead on the K - (t-1) concepts still hidden
    np.testing.assert_allclose(adaptive.forward_passes_per_sample, np.cumsum([0] + [2 * (k - t) + 1 for t in range(k)]))
    # skipped (not visible) concepts are no candidates: samples 0-5 have K-1, the others K
    visibility = torch.ones(prob_predictions.n_samples, k, dtype=torch.bool)
    visibility[:6, 0] = False
    skipping = ConceptPredictions(**{**prob_predictions.__dict__, "visibility": visibility})
    skipped = run_intervention(skipping, target, InterventionConfig(criterion="EUDTP", not_visible="skip", max_steps=1))
    assert skipped.forward_passes_per_sample[1] == pytest.approx((6 * (2 * k - 1) + 6 * (2 * k + 1)) / 12)
    group = run_intervention(prob_predictions, target, InterventionConfig(criterion="UCP", level="G+S", costs=costs))
    np.testing.assert_allclose(group.cost_per_sample, 5.0 * np.arange(4))


def test_adaptive_rescoring_differs_from_static_only_for_state_dependent_criteria(prob_predictions, target):
    static = run_intervention(prob_predictions, target, InterventionConfig(criterion="UCP"))
    adaptive = run_intervention(prob_predictions, target, InterventionConfig(criterion="UCP", ordering="adaptive"))
    np.testing.assert_allclose(static.error, adaptive.error)  # UCP of unrevealed concepts never changes


def test_balanced_error_metric(prob_predictions, target):
    curve = run_intervention(
        prob_predictions, target, InterventionConfig(criterion="UCP", metric="balanced_error", max_steps=0)
    )
    with torch.no_grad():
        predicted = target(prob_predictions.values).argmax(1)
    recalls = [
        (predicted[prob_predictions.labels == c] == c).float().mean().item()
        for c in prob_predictions.labels.unique().tolist()
    ]
    assert curve.error[0] == pytest.approx(1 - sum(recalls) / len(recalls))


def test_bad_configurations_are_rejected(prob_predictions, logit_predictions, target):
    with pytest.raises(ValueError, match="unknown level 'X\\+Y'"):
        InterventionConfig(level="X+Y")
    with pytest.raises(ValueError, match="unknown ordering"):
        InterventionConfig(ordering="sometimes")
    with pytest.raises(ValueError, match="unknown conceptualization"):
        InterventionConfig(conceptualization="fuzzy")
    with pytest.raises(ValueError, match="unknown not-visible policy"):
        InterventionConfig(not_visible="hide")
    with pytest.raises(ValueError, match="percentiles"):
        InterventionConfig(percentiles=(95, 5))
    with pytest.raises(ValueError, match="cost concept must be non-negative"):
        CostModel(concept=-1)
    no_groups = ConceptPredictions(**{**prob_predictions.__dict__, "groups": None})
    with pytest.raises(ValueError, match="needs concept groups"):
        run_intervention(no_groups, target, InterventionConfig(level="G+S"))
    no_reference = ConceptPredictions(**{**logit_predictions.__dict__, "reference_values": None})
    with pytest.raises(ValueError, match="replacement_source='train' needs reference_values"):
        run_intervention(no_reference, target, InterventionConfig())
    run_intervention(no_reference, target, InterventionConfig(replacement_source="eval", max_steps=1))
    with pytest.raises(ValueError, match=r"to \(2, 3\), expected a tensor of shape \(2, 4\) \(4 class logits\)"):
        run_intervention(prob_predictions, torch.nn.Linear(6, 3), InterventionConfig())


def test_adaptive_step_takes_argmax_of_rescored_criterion(prob_predictions, target):
    """Step 2 of adaptive ECTP must pick, per sample, the best concept re-scored after step 1."""
    from cbm_intervene.intervention import ScoringContext, TargetPredictor, score_concepts

    config = InterventionConfig(criterion="ECTP", ordering="adaptive", max_steps=1)
    after_one = run_intervention(prob_predictions, target, config)
    first = after_one.final_values != prob_predictions.values  # the concept revealed at step 1
    assert (first.sum(1) <= 1).all()
    # reveal exactly the step-1 concept (also where the prediction already equalled the truth)
    second_run = run_intervention(prob_predictions, target, InterventionConfig(criterion="ECTP", max_steps=1))
    static_first = second_run.final_values != prob_predictions.values
    assert (static_first == first).all()  # step 1 is the same for static and adaptive
    low, high = torch.zeros(6), torch.ones(6)
    initial = score_concepts(
        "ECTP",
        ScoringContext(
            values=prob_predictions.values,
            probs=prob_predictions.values,
            intervened=torch.zeros(12, 6, dtype=torch.bool),
            true_concepts=prob_predictions.true_concepts,
            low=low,
            high=high,
            target_model=target,
            log_predict=TargetPredictor(target, "prob", "soft", low, high).lookahead_log_proba,
            generator=torch.Generator(),
        ),
    )
    revealed = torch.zeros(12, 6, dtype=torch.bool)
    revealed[torch.arange(12), initial.argmax(1)] = True
    values = torch.where(revealed, prob_predictions.true_concepts, prob_predictions.values)
    rescored = score_concepts(
        "ECTP",
        ScoringContext(
            values=values,
            probs=values,
            intervened=revealed,
            true_concepts=prob_predictions.true_concepts,
            low=low,
            high=high,
            target_model=target,
            log_predict=TargetPredictor(target, "prob", "soft", low, high).lookahead_log_proba,
            generator=torch.Generator(),
        ),
    ).masked_fill(revealed, -torch.inf)
    expected = revealed.clone()
    expected[torch.arange(12), rescored.argmax(1)] = True
    after_two = run_intervention(
        prob_predictions, target, InterventionConfig(criterion="ECTP", ordering="adaptive", max_steps=2)
    )
    torch.testing.assert_close(
        after_two.final_values, torch.where(expected, prob_predictions.true_concepts, prob_predictions.values)
    )


class RowCounter(torch.nn.Module):
    """Wraps f and counts the rows (bottlenecks) it evaluates."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        self.rows += values.shape[0]
        return self.model(values)


@pytest.mark.parametrize("criterion", ["ECTP", "EUDTP"])
def test_lookahead_evaluates_only_candidates_and_counts_what_it_runs(criterion, prob_predictions, target):
    from cbm_intervene.intervention import ScoringContext, TargetPredictor, get_criterion, score_concepts

    n, k = prob_predictions.values.shape
    counter = RowCounter(target)
    low, high = torch.zeros(k), torch.ones(k)
    candidates = torch.rand(n, k, generator=torch.Generator().manual_seed(1)) < 0.5
    candidates[0] = False  # a sample with nothing left to ask is not evaluated at all

    def scores(mask):
        counter.rows = 0
        ctx = ScoringContext(
            values=prob_predictions.values,
            probs=prob_predictions.values,
            intervened=torch.zeros(n, k, dtype=torch.bool),
            true_concepts=prob_predictions.true_concepts,
            low=low,
            high=high,
            target_model=counter,
            log_predict=TargetPredictor(counter, "prob", "soft", low, high).lookahead_log_proba,
            generator=torch.Generator(),
            chunk_rows=5,
            candidates=mask,
        )
        return score_concepts(criterion, ctx), counter.rows

    full, _ = scores(None)
    partial, rows = scores(candidates)
    torch.testing.assert_close(partial[candidates], full[candidates])
    per_sample = candidates.sum(1)
    charged = sum(get_criterion(criterion).forward_passes(int(c), 4) for c in per_sample if c > 0)
    assert rows == charged == int((per_sample > 0).sum()) + 2 * int(candidates.sum())


def test_rand_orders_groups_uniformly_whatever_their_sizes():
    """RAND is a uniform random permutation of groups: with groups of 1, 15 and 15 concepts the
    singleton comes first, second or last a third of the time each (a mean of uniform concept
    scores puts it first or last ~46% of the time each, a max first ~3%) and makes up a third of
    the (sample, group) pairs a batch level takes first (mean ~46%, max ~5%)."""
    n, k = 3000, 31
    gen = torch.Generator().manual_seed(0)
    predictions = ConceptPredictions(
        values=torch.rand(n, k, generator=gen),
        kind="prob",
        true_concepts=(torch.rand(n, k, generator=gen) < 0.5).float(),
        labels=torch.randint(0, 2, (n,), generator=gen),
        n_classes=2,
        groups=ConceptGroups(
            names=["one", "a", "b"], members=[[0], list(range(1, 16)), list(range(16, 31))], n_concepts=k
        ),
    )
    target = torch.nn.Linear(k, 2)
    for group_score in ("mean", "max"):
        for ordering in ("static", "adaptive"):
            config = InterventionConfig(criterion="RAND", level="G+S", group_score=group_score, ordering=ordering)
            counts = run_intervention(predictions, target, config).concept_counts
            singleton_step = np.argmax(np.diff(counts, axis=0) == 1, axis=0)  # 0, 1, 2: its position
            shares = np.bincount(singleton_step, minlength=3) / n
            np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.05, err_msg=f"{group_score} {ordering}")
        config = InterventionConfig(criterion="RAND", level="G+B", group_score=group_score, max_steps=1)
        first = run_intervention(predictions, target, config).concept_counts[1]
        assert first.sum() > 0
        assert np.mean(first % 15 == 1) == pytest.approx(1 / 3, abs=0.05)  # 1, 16 or 31: singleton taken


def test_group_mean_counts_only_members_that_can_be_asked(prob_predictions, target):
    # sample 0 under LCP with skip: group b = {2,3,4} has losses (1, 0, 0) but concept 2 is not
    # visible, so b's mean over askable members is 0 and group a = {0,1} (losses 0.3, 0.3) goes first
    values, true = prob_predictions.values.clone(), prob_predictions.true_concepts.clone()
    values[0] = torch.tensor([0.3, 0.3, 1.0, 0.0, 0.0, 0.0])
    true[0] = torch.zeros(6)
    visibility = torch.ones(12, 6, dtype=torch.bool)
    visibility[0, 2] = False
    predictions = ConceptPredictions(
        **{**prob_predictions.__dict__, "values": values, "true_concepts": true, "visibility": visibility}
    )
    config = InterventionConfig(criterion="LCP", level="G+S", not_visible="skip", max_steps=1, allow_oracle=True)
    curve = run_intervention(predictions, target, config)
    assert int(curve.concept_counts[1][0]) == 2
    # a mean over all of b's members (1/3 > 0.3) would pick b instead: a stays at 0.3 and the count is 2 too
    torch.testing.assert_close(curve.final_values[0, :2], true[0, :2])  # group a revealed
    torch.testing.assert_close(curve.final_values[0, 2:], values[0, 2:])  # b and c as predicted


def test_target_model_of_wrong_width_is_named(prob_predictions):
    with pytest.raises(
        ValueError, match=r"target model expects 5 inputs \(its first nn.Linear layer\), but the predictions have 6"
    ):
        run_intervention(prob_predictions, torch.nn.Linear(5, 4), InterventionConfig())


def test_target_model_returning_a_tuple_is_named(prob_predictions):
    class LogitsAndInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(6, 4)

        def forward(self, c):
            return self.linear(c), c

    with pytest.raises(ValueError, match=r"target model maps \(2, 6\) inputs to a tuple, expected a tensor of shape"):
        run_intervention(prob_predictions, LogitsAndInputs(), InterventionConfig())


def test_criteria_reading_true_concepts_need_the_oracle_switch(prob_predictions, target):
    """LCP (and any criterion declared needs_true_concepts) reads the labels the expert is asked
    for: an oracle reference, refused unless allow_oracle=True asks for it by name."""
    from cbm_intervene.intervention import CRITERIA, register_criterion

    with pytest.raises(ValueError, match=r"criterion 'LCP' reads the true concepts .*allow_oracle=True"):
        InterventionConfig(criterion="LCP")
    with pytest.raises(ValueError, match="criterion 'LCP' reads the true concepts"):
        replace(InterventionConfig(criterion="UCP"), criterion="lcp")  # as evaluate_grid builds its cells
    curve = run_intervention(prob_predictions, target, InterventionConfig(criterion="LCP", allow_oracle=True))
    assert curve.error[-1] <= curve.error[0]

    @register_criterion("TEST_PEEKS", needs_true_concepts=True)
    def peeks(ctx):
        return ctx.true_concepts

    try:
        with pytest.raises(ValueError, match="criterion 'TEST_PEEKS' reads the true concepts"):
            InterventionConfig(criterion="test_peeks")
        InterventionConfig(criterion="test_peeks", allow_oracle=True)
    finally:
        CRITERIA.pop("TEST_PEEKS")


def test_not_visible_default_keeps_predictions_as_the_authors_ran(prob_predictions, target):
    """Every command of the authors' README passes -no_intervention_when_invisible: a revealed
    concept the expert cannot see keeps its prediction. Nullifying it is the opt-in pitfall."""
    from cbm_intervene.config import InterveneRunConfig

    assert InterventionConfig().not_visible == "keep"
    assert InterveneRunConfig(predictions=["p.pt"]).not_visible == "keep"
    visibility = torch.ones_like(prob_predictions.values, dtype=torch.bool)
    visibility[:, 0] = False
    predictions = ConceptPredictions(**{**prob_predictions.__dict__, "visibility": visibility})
    curve = run_intervention(predictions, target, InterventionConfig(criterion="UCP"))
    torch.testing.assert_close(curve.final_values[:, 0], prob_predictions.values[:, 0])
    torch.testing.assert_close(curve.final_values[:, 1:], prob_predictions.true_concepts[:, 1:])
