"""Concept selection criteria of Shin et al. (ICML 2023, Sec. 3.1, Table 1) and a registry for more.

Every criterion maps a :class:`ScoringContext` (the current bottleneck of every evaluation sample)
to scores of shape ``(N, K)``: larger means "ask the expert about this concept first". Notation:
``p_i`` is the predicted probability of concept ``i`` (sigmoid of a logit), ``c_hat`` the values f
reads, ``f`` the concept-to-target model, ``c_hat|c_i=v`` the bottleneck with concept ``i`` set to
the replacement value of ``v``.

======== ========================================================================= ==============
RAND     a uniform random permutation of the units (concepts or groups)             0 passes
UCP      ``1 / |p_i - 0.5|`` (uncertainty of concept prediction)                   0 passes
LCP      ``|p_i - c_i|`` (loss; needs the true concepts -- an oracle reference)     0 passes
CCTP     ``sum_j |q_i * d f_j / d c_hat_i|`` (contribution to the target)          1 + M passes
ECTP     ``(1-p_i) KL(f(c_hat|c_i=0) || f(c_hat)) + p_i KL(f(c_hat|c_i=1) || f(c_hat))``  1 + 2C passes
EUDTP    ``H(f(c_hat)) - [(1-p_i) H(f(c_hat|c_i=0)) + p_i H(f(c_hat|c_i=1))]``     1 + 2C passes
======== ========================================================================= ==============

Passes are per scored sample: M is the number of classes of f, C the number of *candidate* concepts
of that sample (those still to be asked; ``ScoringContext.candidates``). ECTP and EUDTP run f once
on the current bottleneck and twice per candidate; they never evaluate hypotheticals for concepts
that cannot be asked. A sample without candidates is not scored and costs nothing.

CCTP here takes the exact gradient of f by autograd, so it is right for any f; ``CCTP_FIRST_LAYER``
reproduces the authors' code, which multiplies by the first linear layer's weights (exact only for
a linear f). ``c_hat`` is the bottleneck f actually reads under the conceptualization
(``ScoringContext.f_values``): under HARD, CCTP and CCTP_FIRST_LAYER are taken at the thresholded
values, exactly as ECTP/EUDTP look ahead through the thresholded f. SAMP has no single bottleneck:
every look-ahead and gradient criterion then uses the SOFT one.

``q_i`` is the *probability* of concept i as f reads it (``ScoringContext.f_probabilities``: the
value itself on a probability bottleneck, its sigmoid on a logit bottleneck), as in the authors'
code (``tti.py`` multiplies the weights by the sigmoid of the predicted concept). Multiplying by
the logit itself, the literal reading of Table 1 kept as ``CCTP_LOGIT``, ranks the most confident
concepts (largest ``|logit|``) first, and on logit bottlenecks (SEQ, JNT) that is worse than asking
at random. On a probability bottleneck the three coincide.

Most criteria score concepts and the engine turns concept scores into group scores (mean or max over
the group's candidate members). A criterion registered with ``scores_units=True`` scores the ranked
units directly instead (``ScoringContext.membership``): RAND does, so that it is a uniform random
order of groups too -- a mean or max of uniform concept scores is not (the max favours large groups,
the mean pushes small groups to both ends). Add a criterion with :func:`register_criterion`::

    @register_criterion("MARGIN", forward_passes=lambda n_candidates, n_classes: 0)
    def margin(ctx):
        return -(ctx.probs - 0.5).abs()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from shin_common import Registry

LogPredict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ScoringContext:
    """What a criterion may look at, for all N evaluation samples at once.

    ``values`` (N, K): the bottleneck as predicted, interventions applied. ``probs`` (N, K): concept
    probabilities (revealed concepts at their true 0/1). ``intervened`` (N, K): already revealed.
    ``true_concepts`` (N, K). ``low``/``high`` (K,): the values that mean "concept absent/present"
    (0/1 for probabilities, 5th/95th percentiles for logits). ``log_predict(values, intervened)``:
    f's log class probabilities under the chosen conceptualization, for look-ahead.

    ``candidates`` (N, K) bool: the concepts whose scores the engine will use (not yet asked and
    askable); other entries of a criterion's output are ignored, so a costly criterion may leave
    them at 0 instead of computing them. ``None``: every concept. ``membership`` (U, K) bool: the
    units being ranked (concept groups at group levels); ``None``: the concepts themselves.
    ``f_inputs(values, intervened)``: the bottleneck f reads under the conceptualization (HARD:
    thresholded; SOFT and SAMP: as is); ``None``: as is. ``kind``: ``"prob"`` or ``"logit"``, the
    bottleneck f reads (needed by CCTP and CCTP_FIRST_LAYER, which weigh by its probability).
    """

    values: torch.Tensor
    probs: torch.Tensor
    intervened: torch.Tensor
    true_concepts: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    target_model: nn.Module
    log_predict: LogPredict
    generator: torch.Generator
    chunk_rows: int = 65536
    candidates: torch.Tensor | None = None
    membership: torch.Tensor | None = None
    f_inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    kind: str | None = None

    @property
    def candidate_mask(self) -> torch.Tensor:
        if self.candidates is None:
            return torch.ones(self.values.shape, dtype=torch.bool)
        return self.candidates.bool()

    @property
    def n_units(self) -> int:
        return self.values.shape[1] if self.membership is None else self.membership.shape[0]

    @property
    def f_values(self) -> torch.Tensor:
        """The bottleneck f reads (``values`` under SOFT/SAMP, thresholded under HARD)."""
        return self.values if self.f_inputs is None else self.f_inputs(self.values, self.intervened)

    @property
    def f_probabilities(self) -> torch.Tensor:
        """The concept probabilities of :attr:`f_values`: as is on a probability bottleneck, their
        sigmoid on a logit bottleneck."""
        if self.kind not in ("prob", "logit"):
            raise ValueError(f"ScoringContext.kind must be 'prob' or 'logit' for this criterion, got {self.kind!r}")
        values = self.f_values
        return values if self.kind == "prob" else torch.sigmoid(values)


@dataclass(frozen=True)
class Criterion:
    name: str
    score: Callable[[ScoringContext], torch.Tensor]
    #: passes of f (forward or backward) per scored sample needed to score its ``n_candidates``
    #: candidate concepts with an f of ``n_classes`` outputs: the count the cost model charges tau_f
    #: for (samples without candidates are not scored and charged nothing)
    forward_passes: Callable[[int, int], int]
    needs_true_concepts: bool = False
    #: True when scores depend on the random generator (then runs over seeds differ)
    stochastic: bool = False
    #: True when ``score`` returns one score per ranked unit, ``(N, ctx.n_units)``, instead of per concept
    scores_units: bool = False
    #: True when a group's mean is taken over the *squared* member scores (UCP and LCP, as the
    #: authors' ``tti.py`` scores them), unless ``group_score="mean_unsquared"``
    squared_in_group_mean: bool = False


class CriterionRegistry(Registry[Criterion]):
    """The criteria by name, matched case-insensitively (``ucp`` is ``UCP``): names are stored upper-case."""

    def add(self, name: str, entry: Criterion) -> Criterion:
        return super().add(str(name).upper(), entry)

    def get(self, name: str) -> Criterion:
        return super().get(str(name).upper())

    def remove(self, name: str) -> Criterion:
        return super().remove(str(name).upper())

    def __contains__(self, name: object) -> bool:
        return super().__contains__(str(name).upper())

    #: dict-style removal, as ``CRITERIA`` offered when it was a plain dict
    pop = remove


#: Every selection criterion by name; one ``@register_criterion(...)`` line adds one.
CRITERIA = CriterionRegistry("criterion")


def register_criterion(
    name: str,
    *,
    forward_passes: Callable[[int, int], int] = lambda n_candidates, n_classes: 0,
    needs_true_concepts: bool = False,
    stochastic: bool = False,
    scores_units: bool = False,
    squared_in_group_mean: bool = False,
    overwrite: bool = False,
) -> Callable[[Callable[[ScoringContext], torch.Tensor]], Callable[[ScoringContext], torch.Tensor]]:
    """Decorator registering ``fn(ctx) -> (N, K) scores`` in :data:`CRITERIA` under ``name`` (case-insensitive).

    With ``scores_units=True``, ``fn`` returns ``(N, ctx.n_units)`` scores of the ranked units
    (groups at group levels) and no group aggregation is applied. With ``squared_in_group_mean=True``
    a group's mean (``group_score="mean"``) averages the squares of its members' scores.
    """
    key = name.upper()

    def decorator(fn: Callable[[ScoringContext], torch.Tensor]) -> Callable[[ScoringContext], torch.Tensor]:
        if key in CRITERIA:
            if not overwrite:
                raise ValueError(f"criterion {key!r} is already registered (pass overwrite=True to replace it)")
            CRITERIA.remove(key)
        CRITERIA.add(
            key,
            Criterion(key, fn, forward_passes, needs_true_concepts, stochastic, scores_units, squared_in_group_mean),
        )
        return fn

    return decorator


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name`` (case-insensitive); an unknown name lists the registered ones."""
    return CRITERIA.get(name)


def score_concepts(name: str, ctx: ScoringContext) -> torch.Tensor:
    """Raw scores of criterion ``name``, checked to be a NaN-free tensor of the declared shape:
    ``(N, K)``, or ``(N, ctx.n_units)`` for a criterion that scores units directly."""
    criterion = get_criterion(name)
    scores = criterion.score(ctx)
    n, k = ctx.values.shape
    expected = (n, ctx.n_units) if criterion.scores_units else (n, k)
    if tuple(scores.shape) != expected:
        raise ValueError(f"criterion {name!r} returned shape {tuple(scores.shape)}, expected {expected}")
    if torch.isnan(scores).any():
        raise ValueError(f"criterion {name!r} returned NaN scores")
    return scores


#: How a group's score comes from its members': ``mean`` as the authors' code takes it (the squares
#: of UCP's and LCP's scores, the others as they are), ``mean_unsquared`` (every criterion's scores
#: as they are: what this package took before), ``max``.
GROUP_SCORES = ("mean", "mean_unsquared", "max")


def score_units(name: str, ctx: ScoringContext, group_score: str = "mean") -> torch.Tensor:
    """``(N, ctx.n_units)`` scores of the ranked units: a unit-scoring criterion's own scores, else
    the concept scores (individual levels) or, per group, the mean (Shin et al., Sec. 3.2) or max of
    the scores of its candidate members. ``mean`` squares the member scores of a criterion declared
    ``squared_in_group_mean`` (UCP and LCP: the authors' ``tti.py`` squares them before the group
    mean, which weighs a group's most uncertain or most wrong member more); squaring changes no order
    among single concepts, so individual levels are unaffected."""
    if group_score not in GROUP_SCORES:
        raise ValueError(f"unknown group score {group_score!r}; expected one of {list(GROUP_SCORES)}")
    scores = score_concepts(name, ctx)
    criterion = get_criterion(name)
    if criterion.scores_units or ctx.membership is None:
        return scores
    if group_score == "mean" and criterion.squared_in_group_mean:
        scores = scores.square()
    members = ctx.membership.bool()
    needed = ctx.candidate_mask
    # members that will not be asked (already revealed, or skipped as not visible) do not count
    kept = torch.where(needed, scores, torch.zeros_like(scores))
    if group_score != "max":
        counts = needed.float() @ members.T.float()
        return (kept @ members.T.float()) / counts.clamp_min(1.0)
    pairs = members[None] & needed[:, None, :]  # (N, U, K)
    return torch.where(pairs, scores[:, None, :], -torch.inf).amax(-1)


@register_criterion("RAND", stochastic=True, scores_units=True)
def random_scores(ctx: ScoringContext) -> torch.Tensor:
    """Independent U(0, 1) scores per (sample, unit): sorting them gives every sample a uniform random
    permutation of its units (S levels) and the whole set a uniform random permutation of its
    (sample, unit) pairs (B levels), for concepts and groups alike."""
    return torch.rand((ctx.values.shape[0], ctx.n_units), generator=ctx.generator)


@register_criterion("UCP", squared_in_group_mean=True)
def uncertainty_scores(ctx: ScoringContext) -> torch.Tensor:
    # clamp keeps p_i = 0.5 finite (and largest) so that group means stay defined
    return 1.0 / (ctx.probs - 0.5).abs().clamp_min(1e-12)


@register_criterion("LCP", needs_true_concepts=True, squared_in_group_mean=True)
def loss_scores(ctx: ScoringContext) -> torch.Tensor:
    return (ctx.probs - ctx.true_concepts).abs()


def _forward_and_backward_per_class(n_candidates: int, n_classes: int) -> int:
    return 1 + n_classes


def _jacobian_contributions(ctx: ScoringContext, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j |weights_i * df_j/dc_hat_i|`` with the exact Jacobian of f at the bottleneck f reads
    (rows of f are independent, so one backward pass per output class yields every sample's
    gradient at once). Only samples with a candidate concept are evaluated."""
    rows = ctx.candidate_mask.any(1).nonzero().squeeze(1)
    scores = torch.zeros(ctx.values.shape)
    if not len(rows):
        return scores
    weights = weights[rows].detach()
    with torch.enable_grad():
        inputs = ctx.f_values[rows].detach().clone().requires_grad_(True)
        outputs = ctx.target_model(inputs)
        total = torch.zeros_like(inputs)
        for j in range(outputs.shape[1]):
            (grad,) = torch.autograd.grad(outputs[:, j].sum(), inputs, retain_graph=j < outputs.shape[1] - 1)
            total += (weights * grad).abs()
    scores[rows] = total
    return scores


@register_criterion("CCTP", forward_passes=_forward_and_backward_per_class)
def contribution_scores(ctx: ScoringContext) -> torch.Tensor:
    """``sum_j |q_i * df_j/dc_hat_i|`` (Shin et al., Table 1), ``q_i`` the concept's probability as
    the authors' code takes it (the sigmoid of a logit), with the exact Jacobian of f."""
    return _jacobian_contributions(ctx, ctx.f_probabilities)


@register_criterion("CCTP_LOGIT", forward_passes=_forward_and_backward_per_class)
def logit_contribution_scores(ctx: ScoringContext) -> torch.Tensor:
    """``sum_j |c_hat_i * df_j/dc_hat_i|`` with ``c_hat_i`` the value f reads, a logit on SEQ/JNT
    bottlenecks: the literal formula, kept to show why CCTP uses the probability (it asks the most
    confident concepts first there). Equal to CCTP on probability bottlenecks."""
    return _jacobian_contributions(ctx, ctx.f_values)


def first_linear_layer(module: nn.Module) -> nn.Linear:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            return layer
    raise ValueError("CCTP_FIRST_LAYER needs a target model containing an nn.Linear layer")


@register_criterion("CCTP_FIRST_LAYER")
def first_layer_contribution_scores(ctx: ScoringContext) -> torch.Tensor:
    """The authors' CCTP: ``sum_h |q_i * W_hi|`` with W the first linear layer of f and ``q_i`` the
    concept's probability (sigmoid of a logit)."""
    weight = first_linear_layer(ctx.target_model).weight.detach()  # (H, K)
    return ctx.f_probabilities.abs() * weight.abs().sum(0)


def _base_and_two_per_candidate(n_candidates: int, n_classes: int) -> int:
    return 1 + 2 * n_candidates


def lookahead_scores(
    ctx: ScoringContext,
    combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Evaluate f on the hypotheticals ``c_hat|c_i=0`` and ``c_hat|c_i=1`` of every candidate
    (sample, concept) pair in batched passes.

    f runs once on the current bottleneck of each sample with a candidate, then on the two
    hypotheticals of each candidate pair, ``ctx.chunk_rows`` pairs per batch; non-candidates are
    never evaluated and score 0. ``combine(base, logp0, logp1, p)`` receives, per pair, the log class
    probabilities ``(P, M)`` of the current bottleneck, of ``c_i=0`` and of ``c_i=1``, and ``p_i``
    ``(P,)``, and must return ``(P,)`` scores (reduce over the class axis, the last one).

    Changed in the Unreleased version: ``combine`` used to receive per-sample grids, ``base``
    ``(B, M)``, ``logp0``/``logp1`` ``(B, K, M)`` and ``p`` ``(B, K)``. A ``combine`` written for
    that layout that broadcasts ``base[:, None]`` against ``logp0`` would now yield ``(P, P, M)``;
    its result is checked and anything but ``(P,)`` raises a ``ValueError``.
    """
    n, k = ctx.values.shape
    out = torch.zeros(n, k)
    pairs = ctx.candidate_mask.nonzero()  # (P, 2): (sample, concept)
    if not len(pairs):
        return out
    scored = pairs[:, 0].unique()
    step = max(1, ctx.chunk_rows)
    with torch.no_grad():
        base_parts = [
            ctx.log_predict(ctx.values[scored[i : i + step]], ctx.intervened[scored[i : i + step]])
            for i in range(0, len(scored), step)
        ]
        base = torch.zeros(n, base_parts[0].shape[-1])
        base[scored] = torch.cat(base_parts)
        for start in range(0, len(pairs), step):
            sample, concept = pairs[start : start + step].unbind(1)
            rows = torch.arange(len(sample))
            mask = ctx.intervened[sample].clone()
            mask[rows, concept] = True
            logp = []
            for replacement in (ctx.low, ctx.high):
                hyp = ctx.values[sample].clone()
                hyp[rows, concept] = replacement[concept]
                logp.append(ctx.log_predict(hyp, mask))
            scores = combine(base[sample], logp[0], logp[1], ctx.probs[sample, concept])
            if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (len(sample),):
                shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ValueError(
                    f"lookahead_scores: combine returned {shape}, expected ({len(sample)},) -- one score per "
                    "(sample, concept) pair; combine receives per-pair log probabilities (P, M), (P, M), (P, M) "
                    "and p (P,) (it used to receive (B, M), (B, K, M), (B, K, M), (B, K))"
                )
            out[sample, concept] = scores
    return out


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last axis from log probabilities (0 log 0 = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)


@register_criterion("ECTP", forward_passes=_base_and_two_per_candidate)
def expected_change_scores(ctx: ScoringContext) -> torch.Tensor:
    def combine(base: torch.Tensor, logp0: torch.Tensor, logp1: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return (1 - p) * _kl(logp0, base) + p * _kl(logp1, base)

    return lookahead_scores(ctx, combine)


@register_criterion("EUDTP", forward_passes=_base_and_two_per_candidate)
def uncertainty_decrease_scores(ctx: ScoringContext) -> torch.Tensor:
    def combine(base: torch.Tensor, logp0: torch.Tensor, logp1: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return _entropy(base) - ((1 - p) * _entropy(logp0) + p * _entropy(logp1))

    return lookahead_scores(ctx, combine)
