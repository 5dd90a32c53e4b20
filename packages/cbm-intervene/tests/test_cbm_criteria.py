"""Each criterion against a direct per-sample, per-concept loop (Shin et al. 2023, Table 1)."""

from __future__ import annotations

import math

import pytest
import torch

from cbm_intervene.intervention import (
    CRITERIA,
    InterventionConfig,
    ScoringContext,
    TargetPredictor,
    get_criterion,
    register_criterion,
    replacement_values,
    run_intervention,
    score_concepts,
)
from cbm_intervene.intervention.criteria import lookahead_scores


def context(predictions, target, mode="soft", chunk_rows=65536, intervened=None):
    low, high = replacement_values(predictions, "train")
    predictor = TargetPredictor(target, predictions.kind, mode, low, high)
    mask = torch.zeros_like(predictions.values, dtype=torch.bool) if intervened is None else intervened
    values = torch.where(mask, torch.where(predictions.true_concepts > 0.5, high, low), predictions.values)
    probs = torch.where(mask, predictions.true_concepts, predictions.probabilities())
    return ScoringContext(
        values=values,
        probs=probs,
        intervened=mask,
        true_concepts=predictions.true_concepts,
        low=low,
        high=high,
        target_model=target,
        log_predict=predictor.lookahead_log_proba,
        generator=torch.Generator().manual_seed(0),
        chunk_rows=chunk_rows,
        f_inputs=predictor.lookahead_inputs,
        kind=predictions.kind,
    )


def f_probs(target, c, kind, mode, low, high, mask):
    """f's class probabilities for one sample under a conceptualization, written out directly."""
    c = c.clone()
    if mode == "hard":
        for i in range(len(c)):
            if not mask[i]:
                if kind == "prob":
                    c[i] = 1.0 if c[i] >= 0.5 else 0.0
                else:
                    c[i] = high[i] if c[i] >= 0 else low[i]
    with torch.no_grad():
        return torch.softmax(target(c[None])[0], dim=0)


def loop_lookahead(ctx, kind, mode, which):
    n, k = ctx.values.shape
    out = torch.zeros(n, k)
    for s in range(n):
        q = f_probs(ctx.target_model, ctx.values[s], kind, mode, ctx.low, ctx.high, ctx.intervened[s])
        for i in range(k):
            p_i = float(ctx.probs[s, i])
            hyp = []
            for v in (ctx.low[i], ctx.high[i]):
                c = ctx.values[s].clone()
                c[i] = v
                m = ctx.intervened[s].clone()
                m[i] = True
                hyp.append(f_probs(ctx.target_model, c, kind, mode, ctx.low, ctx.high, m))
            if which == "ECTP":
                kl = [sum(float(h[j]) * math.log(float(h[j]) / float(q[j])) for j in range(len(q))) for h in hyp]
                out[s, i] = (1 - p_i) * kl[0] + p_i * kl[1]
            else:
                ent = [-sum(float(h[j]) * math.log(float(h[j])) for j in range(len(h))) for h in [q, *hyp]]
                out[s, i] = ent[0] - ((1 - p_i) * ent[1] + p_i * ent[2])
    return out


@pytest.mark.parametrize("kind", ["prob", "logit"])
def test_ucp_and_lcp_match_loop(kind, predictions_factory, target_factory):
    make_predictions, make_target = predictions_factory, target_factory
    predictions = make_predictions(kind)
    ctx = context(predictions, make_target())
    ucp, lcp = score_concepts("UCP", ctx), score_concepts("LCP", ctx)
    for s in range(predictions.n_samples):
        for i in range(predictions.n_concepts):
            p = (
                1 / (1 + math.exp(-float(predictions.values[s, i])))
                if kind == "logit"
                else float(predictions.values[s, i])
            )
            assert ucp[s, i].item() == pytest.approx(1 / abs(p - 0.5), rel=1e-4)
            assert lcp[s, i].item() == pytest.approx(abs(p - float(predictions.true_concepts[s, i])), abs=1e-6)


@pytest.mark.parametrize("kind", ["prob", "logit"])
@pytest.mark.parametrize("hidden", [None, 5])
def test_cctp_matches_per_sample_jacobian(kind, hidden, predictions_factory, target_factory):
    make_predictions, make_target = predictions_factory, target_factory
    predictions, target = make_predictions(kind), make_target(hidden=hidden)
    scores = score_concepts("CCTP", context(predictions, target))
    logit_scores = score_concepts("CCTP_LOGIT", context(predictions, target))
    for s in range(predictions.n_samples):
        c = predictions.values[s]
        jac = torch.autograd.functional.jacobian(lambda x: target(x[None])[0], c)  # (M, K)
        for i in range(predictions.n_concepts):
            # weighted by the concept's probability (the sigmoid of a logit), as the authors' tti.py does
            q = float(c[i]) if kind == "prob" else 1 / (1 + math.exp(-float(c[i])))
            expected = sum(abs(q * float(jac[j, i])) for j in range(jac.shape[0]))
            assert scores[s, i].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
            literal = sum(abs(float(c[i]) * float(jac[j, i])) for j in range(jac.shape[0]))
            assert logit_scores[s, i].item() == pytest.approx(literal, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", ["prob", "logit"])
def test_cctp_under_hard_is_taken_at_the_thresholded_bottleneck(kind, predictions_factory, target_factory):
    """HARD: f reads thresholded concepts (revealed ones as revealed), so c_hat and the Jacobian of
    CCTP are taken there, as ECTP/EUDTP look ahead through the thresholded f."""
    predictions, target = predictions_factory(kind), target_factory(hidden=5)
    intervened = torch.zeros(predictions.n_samples, predictions.n_concepts, dtype=torch.bool)
    intervened[::2, 3] = True
    ctx = context(predictions, target, mode="hard", intervened=intervened)
    scores = score_concepts("CCTP", ctx)
    first_layer = score_concepts("CCTP_FIRST_LAYER", ctx)
    weight = target[0].weight.detach()
    for s in range(predictions.n_samples):
        c = ctx.values[s].clone()
        for i in range(len(c)):
            if not intervened[s, i]:
                if kind == "prob":
                    c[i] = 1.0 if c[i] >= 0.5 else 0.0
                else:
                    c[i] = ctx.high[i] if c[i] >= 0 else ctx.low[i]
        jac = torch.autograd.functional.jacobian(lambda x: target(x[None])[0], c)
        for i in range(predictions.n_concepts):
            q = float(c[i]) if kind == "prob" else 1 / (1 + math.exp(-float(c[i])))
            expected = sum(abs(q * float(jac[j, i])) for j in range(jac.shape[0]))
            assert scores[s, i].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
            expected_first = sum(abs(q * float(weight[h, i])) for h in range(weight.shape[0]))
            assert first_layer[s, i].item() == pytest.approx(expected_first, rel=1e-5, abs=1e-7)
    # SAMP has no single bottleneck: gradient and look-ahead criteria use the soft one
    low, high = replacement_values(predictions, "train")
    samp = TargetPredictor(target, predictions.kind, "samp", low, high)
    torch.testing.assert_close(samp.lookahead_inputs(predictions.values, intervened), predictions.values)


def test_cctp_first_layer_is_authors_variant_and_equals_exact_for_linear_f(prob_predictions, target_factory):
    make_target = target_factory
    mlp_target = make_target(hidden=5)
    scores = score_concepts("CCTP_FIRST_LAYER", context(prob_predictions, mlp_target))
    weight = mlp_target[0].weight.detach()
    for s in range(prob_predictions.n_samples):
        for i in range(prob_predictions.n_concepts):
            c = float(prob_predictions.values[s, i])
            expected = sum(abs(c * float(weight[h, i])) for h in range(weight.shape[0]))
            assert scores[s, i].item() == pytest.approx(expected, rel=1e-5)
    linear = make_target(hidden=None)
    ctx = context(prob_predictions, linear)
    torch.testing.assert_close(
        score_concepts("CCTP_FIRST_LAYER", ctx), score_concepts("CCTP", ctx), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("which", ["ECTP", "EUDTP"])
@pytest.mark.parametrize(("kind", "mode"), [("prob", "soft"), ("logit", "soft"), ("prob", "hard"), ("logit", "hard")])
def test_lookahead_criteria_match_loop(which, kind, mode, predictions_factory, target_factory):
    make_predictions, make_target = predictions_factory, target_factory
    predictions, target = make_predictions(kind), make_target()
    intervened = torch.zeros(predictions.n_samples, predictions.n_concepts, dtype=torch.bool)
    intervened[::3, 1] = True  # some already revealed concepts
    ctx = context(predictions, target, mode=mode, intervened=intervened)
    expected = loop_lookahead(ctx, kind, mode, which)
    torch.testing.assert_close(score_concepts(which, ctx), expected, rtol=1e-4, atol=1e-5)
    # chunking the batched passes must not change anything
    small = context(predictions, target, mode=mode, intervened=intervened, chunk_rows=7)
    torch.testing.assert_close(score_concepts(which, small), expected, rtol=1e-4, atol=1e-5)


def test_rand_is_seeded_uniform(prob_predictions, target):
    a = score_concepts("RAND", context(prob_predictions, target))
    b = score_concepts("RAND", context(prob_predictions, target))
    torch.testing.assert_close(a, b)
    assert ((a >= 0) & (a < 1)).all()
    assert get_criterion("rand").stochastic and not get_criterion("UCP").stochastic


def test_forward_pass_counts():
    assert get_criterion("ECTP").forward_passes(10, 4) == 21  # the current bottleneck + 2 per candidate
    assert get_criterion("EUDTP").forward_passes(3, 4) == 7
    assert get_criterion("UCP").forward_passes(10, 4) == 0
    assert get_criterion("CCTP").forward_passes(10, 4) == 5  # one forward, one backward per class
    assert get_criterion("CCTP_FIRST_LAYER").forward_passes(10, 4) == 0


def test_registry_adds_a_policy_in_a_few_lines(prob_predictions, target):
    @register_criterion("TEST_FIRST_CONCEPTS")
    def first_concepts(ctx):
        return -torch.arange(ctx.values.shape[1], dtype=torch.float32).expand_as(ctx.values)

    try:
        curve = run_intervention(
            prob_predictions, target, InterventionConfig(criterion="test_first_concepts", max_steps=2)
        )
        changed = curve.final_values != prob_predictions.values
        assert not changed[:, 2:].any()  # only concepts 0 and 1 may change
        with pytest.raises(ValueError, match="already registered"):
            register_criterion("TEST_FIRST_CONCEPTS")(first_concepts)
    finally:
        CRITERIA.pop("TEST_FIRST_CONCEPTS")


def test_unknown_criterion_is_rejected():
    with pytest.raises(ValueError, match="unknown criterion 'NOPE'"):
        get_criterion("NOPE")
    with pytest.raises(ValueError, match="unknown criterion"):
        InterventionConfig(criterion="NOPE")


def test_criterion_returning_wrong_shape_is_rejected(prob_predictions, target):
    @register_criterion("TEST_BAD_SHAPE")
    def bad(ctx):
        return torch.zeros(3)

    try:
        with pytest.raises(ValueError, match="returned shape"):
            score_concepts("TEST_BAD_SHAPE", context(prob_predictions, target))
    finally:
        CRITERIA.pop("TEST_BAD_SHAPE")


def test_lookahead_combine_of_the_old_grid_layout_is_rejected(prob_predictions, target):
    # written for base (B, M) against logp (B, K, M): on per-pair inputs it broadcasts to (P, P)
    def kl(log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def old_layout_combine(base, logp0, logp1, p):
        return (1 - p) * kl(logp0, base[:, None]) + p * kl(logp1, base[:, None])

    n_pairs = prob_predictions.values.numel()
    with pytest.raises(ValueError, match=rf"combine returned \({n_pairs}, {n_pairs}\), expected \({n_pairs},\)"):
        lookahead_scores(context(prob_predictions, target), old_layout_combine)


def test_lookahead_combine_gets_one_row_per_pair(prob_predictions, target):
    ctx = context(prob_predictions, target)
    scores = lookahead_scores(ctx, lambda base, logp0, logp1, p: p)  # the pair's own p_i
    torch.testing.assert_close(scores, ctx.probs)


def test_group_scores_of_ucp_and_lcp_average_squared_member_scores(prob_predictions, target):
    """The authors' tti.py squares UCP's and LCP's per-concept scores before averaging a group's
    members; ``group_score="mean_unsquared"`` averages them as they are. Other criteria: plain mean."""
    from cbm_intervene.intervention import score_units

    ctx = context(prob_predictions, target)
    ctx.membership = prob_predictions.groups.membership()
    candidates = torch.ones(prob_predictions.n_samples, prob_predictions.n_concepts, dtype=torch.bool)
    candidates[::2, 2] = False  # a member that will not be asked does not count in its group's mean
    ctx.candidates = candidates
    members = [[0, 1], [2, 3, 4], [5]]
    for name in ("UCP", "LCP", "ECTP"):
        per_concept = score_concepts(name, ctx)
        squared = name in ("UCP", "LCP")
        for how in ("mean", "mean_unsquared"):
            units = score_units(name, ctx, how)
            for s in range(prob_predictions.n_samples):
                for g, group in enumerate(members):
                    kept = [per_concept[s, i].item() for i in group if candidates[s, i]]
                    if how == "mean" and squared:
                        kept = [v * v for v in kept]
                    assert units[s, g].item() == pytest.approx(sum(kept) / len(kept), rel=1e-5), (name, how, s, g)
