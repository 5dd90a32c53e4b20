"""Concept selection criteria of Shin et al. (ICML 2023, Sec. 3.1, Table 1) and a registry for more.

Every criterion maps a :class:`ScoringContext` (the current bottleneck of every evaluation sample)
to scores of shape ``(N, K)``: larger means "ask the expert about this concept first". Notation:
``p_i`` is the predicted probability of concept ``i`` (sigmoid of a logit), ``c_hat`` the values f
reads, ``f`` the concept-to-target model, ``c_hat|c_i=v`` the bottleneck with concept ``i`` set to
the replacement value of ``v``.

======== ========================================================================= ============
RAND     a uniform random score (random order)                                      0 passes
UCP      ``1 / |p_i - 0.5|`` (uncertainty of concept prediction)                   0 passes
LCP      ``|p_i - c_i|`` (loss; needs the true concepts -- an oracle reference)     0 passes
CCTP     ``sum_j |c_hat_i * d f_j / d c_hat_i|`` (contribution to the target)       1 + M passes
ECTP     ``(1-p_i) KL(f(c_hat|c_i=0) || f(c_hat)) + p_i KL(f(c_hat|c_i=1) || f(c_hat))``  2K passes
EUDTP    ``H(f(c_hat)) - [(1-p_i) H(f(c_hat|c_i=0)) + p_i H(f(c_hat|c_i=1))]``     2K passes
======== ========================================================================= ============

CCTP here takes the exact gradient of f by autograd, so it is right for any f; ``CCTP_FIRST_LAYER``
reproduces the authors' code, which multiplies by the first linear layer's weights (exact only for
a linear f). Add a criterion with :func:`register_criterion`::

    @register_criterion("MARGIN", forward_passes=lambda n_candidates, n_classes: 0)
    def margin(ctx):
        return -(ctx.probs - 0.5).abs()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LogPredict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ScoringContext:
    """What a criterion may look at, for all N evaluation samples at once.

    ``values`` (N, K): the bottleneck f reads, interventions applied. ``probs`` (N, K): concept
    probabilities (revealed concepts at their true 0/1). ``intervened`` (N, K): already revealed.
    ``true_concepts`` (N, K). ``low``/``high`` (K,): the values that mean "concept absent/present"
    (0/1 for probabilities, 5th/95th percentiles for logits). ``log_predict(values, intervened)``:
    f's log class probabilities under the chosen conceptualization, for look-ahead.
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


@dataclass(frozen=True)
class Criterion:
    name: str
    score: Callable[[ScoringContext], torch.Tensor]
    #: passes of f (forward or backward) per sample needed to score ``n_candidates`` concepts of an f
    #: with ``n_classes`` outputs: the count the cost model charges tau_f for
    forward_passes: Callable[[int, int], int]
    needs_true_concepts: bool = False
    #: True when scores depend on the random generator (then runs over seeds differ)
    stochastic: bool = False


CRITERIA: dict[str, Criterion] = {}


def register_criterion(
    name: str,
    *,
    forward_passes: Callable[[int, int], int] = lambda n_candidates, n_classes: 0,
    needs_true_concepts: bool = False,
    stochastic: bool = False,
    overwrite: bool = False,
) -> Callable[[Callable[[ScoringContext], torch.Tensor]], Callable[[ScoringContext], torch.Tensor]]:
    """Decorator registering ``fn(ctx) -> (N, K) scores`` under ``name`` (case-insensitive)."""
    key = name.upper()

    def decorator(fn: Callable[[ScoringContext], torch.Tensor]) -> Callable[[ScoringContext], torch.Tensor]:
        if key in CRITERIA and not overwrite:
            raise ValueError(f"criterion {key!r} is already registered (pass overwrite=True to replace it)")
        CRITERIA[key] = Criterion(key, fn, forward_passes, needs_true_concepts, stochastic)
        return fn

    return decorator


def get_criterion(name: str) -> Criterion:
    key = str(name).upper()
    if key not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; registered criteria: {sorted(CRITERIA)}")
    return CRITERIA[key]


def score_concepts(name: str, ctx: ScoringContext) -> torch.Tensor:
    """Scores of criterion ``name``, checked to be a finite ``(N, K)`` tensor."""
    scores = get_criterion(name).score(ctx)
    if tuple(scores.shape) != tuple(ctx.values.shape):
        raise ValueError(f"criterion {name!r} returned shape {tuple(scores.shape)}, expected {tuple(ctx.values.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"criterion {name!r} returned NaN scores")
    return scores


@register_criterion("RAND", stochastic=True)
def random_scores(ctx: ScoringContext) -> torch.Tensor:
    return torch.rand(ctx.values.shape, generator=ctx.generator)


@register_criterion("UCP")
def uncertainty_scores(ctx: ScoringContext) -> torch.Tensor:
    # clamp keeps p_i = 0.5 finite (and largest) so that group means stay defined
    return 1.0 / (ctx.probs - 0.5).abs().clamp_min(1e-12)


@register_criterion("LCP", needs_true_concepts=True)
def loss_scores(ctx: ScoringContext) -> torch.Tensor:
    return (ctx.probs - ctx.true_concepts).abs()


def _forward_and_backward_per_class(n_candidates: int, n_classes: int) -> int:
    return 1 + n_classes


@register_criterion("CCTP", forward_passes=_forward_and_backward_per_class)
def contribution_scores(ctx: ScoringContext) -> torch.Tensor:
    """``sum_j |c_hat_i * df_j/dc_hat_i|`` with the exact Jacobian of f (rows of f are independent,
    so one backward pass per output class yields every sample's gradient at once)."""
    with torch.enable_grad():
        inputs = ctx.values.detach().clone().requires_grad_(True)
        outputs = ctx.target_model(inputs)
        scores = torch.zeros_like(inputs)
        for j in range(outputs.shape[1]):
            (grad,) = torch.autograd.grad(outputs[:, j].sum(), inputs, retain_graph=j < outputs.shape[1] - 1)
            scores += (inputs.detach() * grad).abs()
    return scores


def first_linear_layer(module: nn.Module) -> nn.Linear:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            return layer
    raise ValueError("CCTP_FIRST_LAYER needs a target model containing an nn.Linear layer")


@register_criterion("CCTP_FIRST_LAYER")
def first_layer_contribution_scores(ctx: ScoringContext) -> torch.Tensor:
    """The authors' CCTP: ``sum_h |c_hat_i * W_hi|`` with W the first linear layer of f."""
    weight = first_linear_layer(ctx.target_model).weight.detach()  # (H, K)
    return ctx.values.abs() * weight.abs().sum(0)


def _two_per_candidate(n_candidates: int, n_classes: int) -> int:
    return 2 * n_candidates


def lookahead_scores(
    ctx: ScoringContext,
    combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Evaluate f on every hypothetical ``c_hat|c_i=0`` and ``c_hat|c_i=1`` in batched passes.

    For a chunk of B samples the (B, K, K) hypotheticals (row i = the sample with concept i
    replaced) go through f as one (B*K, K) batch. ``combine(base, logp0, logp1, p)`` receives the
    log class probabilities ``(B, M)``, ``(B, K, M)``, ``(B, K, M)`` and ``p`` ``(B, K)``.
    """
    n, k = ctx.values.shape
    eye = torch.eye(k, dtype=torch.bool)
    out = torch.empty(n, k)
    step = max(1, ctx.chunk_rows // max(k, 1))
    with torch.no_grad():
        for start in range(0, n, step):
            rows = slice(start, start + step)
            values, mask, p = ctx.values[rows], ctx.intervened[rows], ctx.probs[rows]
            b = values.shape[0]
            base = ctx.log_predict(values, mask)
            grid = values[:, None, :].expand(b, k, k)
            hyp_mask = (mask[:, None, :] | eye).reshape(b * k, k)
            logp = []
            for replacement in (ctx.low, ctx.high):
                hyp = torch.where(eye, replacement.expand(k, k), grid).reshape(b * k, k)
                logp.append(ctx.log_predict(hyp, hyp_mask).reshape(b, k, -1))
            out[rows] = combine(base, logp[0], logp[1], p)
    return out


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last axis from log probabilities (0 log 0 = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)


@register_criterion("ECTP", forward_passes=_two_per_candidate)
def expected_change_scores(ctx: ScoringContext) -> torch.Tensor:
    def combine(base: torch.Tensor, logp0: torch.Tensor, logp1: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        base = base[:, None, :]
        return (1 - p) * _kl(logp0, base) + p * _kl(logp1, base)

    return lookahead_scores(ctx, combine)


@register_criterion("EUDTP", forward_passes=_two_per_candidate)
def uncertainty_decrease_scores(ctx: ScoringContext) -> torch.Tensor:
    def combine(base: torch.Tensor, logp0: torch.Tensor, logp1: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return _entropy(base)[:, None] - ((1 - p) * _entropy(logp0) + p * _entropy(logp1))

    return lookahead_scores(ctx, combine)
