"""Test-time intervention: levels, ordering, conceptualization, visibility and cost.

Shin et al. (ICML 2023, Sec. 3.2-3.4) decompose an intervention procedure into a *selection
criterion* (:mod:`.criteria`), a *level* and a *cost*:

- ``I+S`` individual + single: each sample orders its own K concepts; step t reveals its top t.
- ``G+S`` group + single: the same over concept groups (a group's score is the mean -- the paper --
  or the max of the scores of its members that can still be asked; RAND, which scores units
  directly, is a uniform random order of the groups).
- ``I+B`` individual + batch: all (sample, concept) pairs of the evaluation set are ranked
  together; step t reveals the top ``t * N`` pairs.
- ``G+B`` group + batch: the same over (sample, group) pairs.

``ordering='static'`` scores once on the initial predictions (the paper); ``'adaptive'`` re-scores
after each step on the partially intervened bottleneck (our extension).

A revealed concept takes its *replacement value*: 0/1 for a probability bottleneck, the concept's
5th/95th percentile predicted logit for a logit bottleneck (from the training set by default; the
authors' code uses the evaluation set: ``replacement_source='eval'``; ``replacement='sign_median'``
takes the median logit on each side of 0 instead, see :func:`replacement_values`). Conceptualization at test
time: ``soft`` (as predicted), ``hard`` (probabilities thresholded at 0.5, logits at 0, mapped to
the replacement values), ``samp`` (f averaged over Bernoulli samples of the concepts). Concepts
marked not visible are, when revealed, ``keep``: left as predicted (the default: every command in
the authors' README passes ``-no_intervention_when_invisible``, which does this), ``nullify``: set
to "absent" (the pitfall Shin et al. report, Sec. 4.4: an expert who cannot see a part does not
know it is absent, and forcing it so raises the error), or ``skip``: never asked.

Cost (Sec. 3.4; the paper's exact formula is not recoverable, so every term is explicit): a
revealed concept costs ``tau_i`` (individual levels), a revealed group ``tau_g`` (group levels),
and each pass of f a criterion needs costs ``tau_f``. Passes are counted per sample for what the
criterion actually evaluates: at every scoring, only the concepts still to be asked are candidates
(static ordering scores once, on every askable concept; adaptive ordering re-scores the remaining
ones before each step), and a sample without candidates is not scored.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cbm_intervene.data.predictions import ConceptPredictions
from cbm_intervene.intervention.criteria import (
    CRITERIA,
    GROUP_SCORES,
    ScoringContext,
    get_criterion,
    score_units,
)
from cbm_intervene.metrics import METRICS, error_rate
from cbm_intervene.networks import check_module_widths

log = logging.getLogger(__name__)

LEVELS = ("I+S", "G+S", "I+B", "G+B")
ORDERINGS = ("static", "adaptive")
CONCEPTUALIZATIONS = ("soft", "hard", "samp")
NOT_VISIBLE = ("nullify", "keep", "skip")
REPLACEMENT_SOURCES = ("train", "eval")
#: what a revealed concept's logit becomes: the authors' 5th/95th percentiles, or the median of the
#: reference logits on each side of 0 (always of the right sign; see :func:`replacement_values`)
REPLACEMENTS = ("percentile", "sign_median")


def _choice(name: str, value: str, options: tuple[str, ...], *, upper: bool = False) -> str:
    normalized = str(value).upper() if upper else str(value).lower()
    if normalized not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(options)}")
    return normalized


@dataclass(kw_only=True)
class CostModel:
    """Named costs: ``concept`` = tau_i, ``group`` = tau_g, ``forward_pass`` = tau_f. (Default: 1, 1, 0.)"""

    concept: float = 1.0
    group: float = 1.0
    forward_pass: float = 0.0

    def __post_init__(self) -> None:
        for name in ("concept", "group", "forward_pass"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost {name} must be non-negative, got {getattr(self, name)}")


@dataclass(kw_only=True)
class InterventionConfig:
    criterion: str = "UCP"
    level: str = "I+S"
    ordering: str = "static"
    group_score: str = "mean"
    conceptualization: str = "soft"
    n_samples: int = 16  # Bernoulli samples for conceptualization='samp'
    not_visible: str = "keep"
    replacement_source: str = "train"
    replacement: str = "percentile"
    percentiles: tuple[float, float] = (5.0, 95.0)
    max_steps: int | None = None
    metric: str = "error"
    costs: CostModel = field(default_factory=CostModel)
    chunk_rows: int = 65536  # rows of f per look-ahead batch (memory knob)
    seed: int = 0
    #: run a criterion that reads the true concepts (LCP): an oracle reference, never a practical
    #: criterion, so it must be asked for by name
    allow_oracle: bool = False

    def __post_init__(self) -> None:
        criterion = get_criterion(self.criterion)
        self.criterion = criterion.name
        if criterion.needs_true_concepts and not self.allow_oracle:
            raise ValueError(
                f"criterion {self.criterion!r} reads the true concepts (an oracle reference, not a practical "
                "criterion); set allow_oracle=True (command line: --allow-oracle) to run it"
            )
        self.level = _choice("level", self.level, LEVELS, upper=True)
        self.ordering = _choice("ordering", self.ordering, ORDERINGS)
        self.group_score = _choice("group score", self.group_score, GROUP_SCORES)
        self.conceptualization = _choice("conceptualization", self.conceptualization, CONCEPTUALIZATIONS)
        self.not_visible = _choice("not-visible policy", self.not_visible, NOT_VISIBLE)
        self.replacement_source = _choice("replacement source", self.replacement_source, REPLACEMENT_SOURCES)
        self.replacement = _choice("replacement", self.replacement, REPLACEMENTS)
        self.metric = _choice("metric", self.metric, METRICS)
        low, high = (float(q) for q in self.percentiles)
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        self.percentiles = (low, high)
        if self.n_samples <= 0 or self.chunk_rows <= 0:
            raise ValueError(f"n_samples and chunk_rows must be positive, got {self.n_samples}, {self.chunk_rows}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be non-negative or None, got {self.max_steps}")
        if isinstance(self.costs, dict):
            self.costs = CostModel(**self.costs)

    @property
    def is_group_level(self) -> bool:
        return self.level.startswith("G")

    @property
    def is_batch_level(self) -> bool:
        return self.level.endswith("B")


@dataclass
class InterventionCurve:
    """Error after each step, with the bookkeeping needed for every x-axis of the paper.

    Arrays have one entry per step ``0..T``. ``concept_counts``/``unit_counts`` are ``(T+1, N)``:
    concepts asked and units (concepts or groups) selected per sample.
    """

    criterion: str
    level: str
    ordering: str
    steps: np.ndarray
    error: np.ndarray
    concepts_per_sample: np.ndarray
    units_per_sample: np.ndarray
    forward_passes_per_sample: np.ndarray
    cost_per_sample: np.ndarray
    concept_counts: np.ndarray
    unit_counts: np.ndarray
    final_values: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "level": self.level,
            "ordering": self.ordering,
            "steps": self.steps.tolist(),
            "error": self.error.tolist(),
            "concepts_per_sample": self.concepts_per_sample.tolist(),
            "units_per_sample": self.units_per_sample.tolist(),
            "forward_passes_per_sample": self.forward_passes_per_sample.tolist(),
            "cost_per_sample": self.cost_per_sample.tolist(),
        }


def replacement_values(
    predictions: ConceptPredictions,
    source: str = "train",
    percentiles: tuple[float, float] = (5.0, 95.0),
    method: str = "percentile",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The values meaning "absent"/"present" per concept: 0/1, or for logits (``method``):

    - ``"percentile"`` (default; Shin et al. Sec. 3.1 and the authors' code): the ``percentiles``
      (5th/95th) of the concept's reference logits. For a concept predicted present in fewer than 5%
      of the reference samples the "present" value is not positive, so f reads a revealed "present"
      as absent (measured on the synthetic SEQ/JNT CBMs: docs/results/cbm-intervene.md, finding D).
    - ``"sign_median"`` (this package's option): the median of the reference logits above 0
      ("present") and below 0 ("absent"): a value f saw for the concept on that side, of the right
      sign whatever the concept's frequency. A side with no reference logit falls back to the
      magnitude of the percentile value, with the side's sign.
    """
    k = predictions.n_concepts
    if predictions.kind == "prob":
        return torch.zeros(k), torch.ones(k)
    if source == "train":
        if predictions.reference_values is None:
            raise ValueError(
                "replacement_source='train' needs reference_values (the predictor's logits on the training set); "
                "provide them or use replacement_source='eval' (the authors' choice)"
            )
        reference = predictions.reference_values
    else:
        reference = predictions.values
    low, high = np.percentile(reference.numpy(), list(percentiles), axis=0)
    if method == "sign_median":
        logits = reference.numpy().astype(np.float64)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a side without logits: filled below
            present = np.nanmedian(np.where(logits > 0, logits, np.nan), axis=0)
            absent = np.nanmedian(np.where(logits < 0, logits, np.nan), axis=0)
        high = np.where(np.isnan(present), np.abs(high), present)
        low = np.where(np.isnan(absent), -np.abs(low), absent)
    elif method != "percentile":
        raise ValueError(f"unknown replacement {method!r}; expected one of {list(REPLACEMENTS)}")
    return torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)


class TargetPredictor:
    """f under a conceptualization: ``log_proba(values, intervened) -> (B, M)`` log class probabilities.

    Revealed concepts already hold replacement values and are never re-thresholded or re-sampled.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        mode: str,
        low: torch.Tensor,
        high: torch.Tensor,
        n_samples: int = 16,
        seed: int = 0,
    ) -> None:
        self.model, self.kind, self.mode = model, kind, mode
        self.low, self.high, self.n_samples, self.seed = low, high, n_samples, seed

    def _probs(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.kind == "prob" else torch.sigmoid(values)

    def _from_binary(self, binary: torch.Tensor) -> torch.Tensor:
        return binary.float() if self.kind == "prob" else torch.where(binary, self.high, self.low)

    def _hard_inputs(self, values: torch.Tensor, intervened: torch.Tensor) -> torch.Tensor:
        """HARD: unrevealed probabilities thresholded at 0.5 and logits at 0 (probability 0.5), mapped
        to the replacement values; the authors' code thresholds logits at 0.5 too, a bug (Shin et al.
        2023, Sec. 3.3). Revealed concepts keep their values."""
        threshold = 0.5 if self.kind == "prob" else 0.0
        return torch.where(intervened, values, self._from_binary(values >= threshold))

    @torch.no_grad()
    def log_proba(self, values: torch.Tensor, intervened: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        mode = mode or self.mode
        if mode == "soft":
            return torch.log_softmax(self.model(values), dim=-1)
        if mode == "hard":
            return torch.log_softmax(self.model(self._hard_inputs(values, intervened)), dim=-1)
        # samp: average f's class probabilities over Bernoulli draws of the unrevealed concepts; a fixed
        # seed per call gives every step the same draws (common random numbers, smoother curves)
        generator = torch.Generator().manual_seed(self.seed)
        probs = self._probs(values)
        total = None
        for _ in range(self.n_samples):
            draw = self._from_binary(torch.bernoulli(probs, generator=generator).bool())
            out = torch.softmax(self.model(torch.where(intervened, values, draw)), dim=-1)
            total = out if total is None else total + out
        return torch.log(total / self.n_samples)

    @property
    def lookahead_mode(self) -> str:
        """Look-ahead and gradient criteria need a deterministic f: SAMP falls back to SOFT."""
        return "soft" if self.mode == "samp" else self.mode

    def lookahead_log_proba(self, values: torch.Tensor, intervened: torch.Tensor) -> torch.Tensor:
        return self.log_proba(values, intervened, mode=self.lookahead_mode)

    def lookahead_inputs(self, values: torch.Tensor, intervened: torch.Tensor) -> torch.Tensor:
        """The bottleneck f reads in :meth:`lookahead_log_proba` (thresholded under HARD)."""
        if self.lookahead_mode == "soft":
            return values
        return self._hard_inputs(values, intervened)


def _stable_descending(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.argsort(-scores, dim=dim, stable=True)


def _passes_per_sample(criterion_passes: Callable[[int, int], int], candidates: torch.Tensor, n_classes: int) -> float:
    """Mean over samples of the passes of f a scoring costs (0 for samples without candidates)."""
    counts = candidates.sum(1)
    total = 0.0
    for count, samples in zip(*counts.unique(return_counts=True), strict=True):
        if count > 0:
            total += float(criterion_passes(int(count), n_classes)) * int(samples)
    return total / max(len(counts), 1)


@dataclass
class _Bottleneck:
    """The bottleneck after some units were revealed: ``asked`` (N, K) the concepts asked about,
    ``changed`` (N, K) those whose values changed, ``values`` what f reads, ``probs`` the concept
    probabilities criteria see."""

    asked: torch.Tensor
    changed: torch.Tensor
    values: torch.Tensor
    probs: torch.Tensor


@dataclass
class _Revealer:
    """What revealing units does to the predictions of one run: fixed for the run, so each step only
    says which units are selected. ``membership`` (U, K): the concepts of each unit (the identity at
    individual levels); ``askable`` (N, K): concepts that may be asked (not visible ones are not under
    ``skip``); ``unit_eligible`` (N, U): units with an askable concept."""

    predictions: ConceptPredictions
    membership: torch.Tensor
    not_visible: str
    visible: torch.Tensor
    askable: torch.Tensor
    unit_eligible: torch.Tensor
    revealed_values: torch.Tensor
    revealed_probs: torch.Tensor
    initial_probs: torch.Tensor

    @classmethod
    def build(
        cls,
        predictions: ConceptPredictions,
        membership: torch.Tensor,
        low: torch.Tensor,
        high: torch.Tensor,
        not_visible: str,
    ) -> _Revealer:
        n, k = predictions.values.shape
        visible = predictions.visibility if predictions.visibility is not None else torch.ones(n, k, dtype=torch.bool)
        askable = visible if not_visible == "skip" else torch.ones(n, k, dtype=torch.bool)
        true = predictions.true_concepts
        revealed_values = torch.where(true > 0.5, high, low)
        revealed_probs = true.clone()
        if not_visible == "nullify":  # a revealed concept the expert cannot see is set to "absent"
            revealed_values = torch.where(visible, revealed_values, low.expand(n, k))
            revealed_probs = torch.where(visible, revealed_probs, torch.zeros_like(true))
        return cls(
            predictions=predictions,
            membership=membership,
            not_visible=not_visible,
            visible=visible,
            askable=askable,
            unit_eligible=(askable.float() @ membership.T.float()) > 0,
            revealed_values=revealed_values,
            revealed_probs=revealed_probs,
            initial_probs=predictions.probabilities(),
        )

    def reveal(self, selected_units: torch.Tensor) -> _Bottleneck:
        """The bottleneck with the concepts of ``selected_units`` (N, U) revealed."""
        asked = (selected_units.float() @ self.membership.float()) > 0
        if self.not_visible == "skip":
            asked &= self.visible
        changed = asked & self.visible if self.not_visible == "keep" else asked
        values = torch.where(changed, self.revealed_values, self.predictions.values)
        probs = torch.where(changed, self.revealed_probs, self.initial_probs)
        return _Bottleneck(asked=asked, changed=changed, values=values, probs=probs)


def _unit_membership(predictions: ConceptPredictions, config: InterventionConfig) -> torch.Tensor:
    """(U, K) concepts of each ranked unit: the concept groups at group levels, else each concept alone."""
    if not config.is_group_level:
        return torch.eye(predictions.n_concepts, dtype=torch.bool)
    if predictions.groups is None:
        raise ValueError(f"level {config.level} needs concept groups, but the predictions have none")
    return predictions.groups.membership()


@dataclass
class _UnitScorer:
    """The criterion's (N, U) unit scores of a bottleneck, for the given candidate concepts."""

    criterion: str
    group_score: str
    revealer: _Revealer
    predictor: TargetPredictor
    target_model: nn.Module
    low: torch.Tensor
    high: torch.Tensor
    generator: torch.Generator
    chunk_rows: int
    group_level: bool

    def __call__(self, bottleneck: _Bottleneck, candidates: torch.Tensor) -> torch.Tensor:
        ctx = ScoringContext(
            values=bottleneck.values,
            probs=bottleneck.probs,
            intervened=bottleneck.changed,
            true_concepts=self.revealer.predictions.true_concepts,
            low=self.low,
            high=self.high,
            target_model=self.target_model,
            log_predict=self.predictor.lookahead_log_proba,
            generator=self.generator,
            chunk_rows=self.chunk_rows,
            candidates=candidates,
            membership=self.revealer.membership if self.group_level else None,
            f_inputs=self.predictor.lookahead_inputs,
            kind=self.revealer.predictions.kind,
        )
        return score_units(self.criterion, ctx, self.group_score)


@dataclass
class _StaticPlan:
    """Static ordering: every unit ranked once on the initial bottleneck; step t takes a prefix."""

    order: torch.Tensor  # (N, U) per sample, or (N * U,) over the whole set at batch levels
    n_eligible: torch.Tensor  # (N,) units each sample may reveal
    passes: float  # passes of f per sample the one scoring cost

    @classmethod
    def rank(
        cls, scorer: _UnitScorer, bottleneck: _Bottleneck, batch_level: bool, forward_passes: Callable[[int, int], int]
    ) -> _StaticPlan:
        revealer = scorer.revealer
        masked = torch.where(revealer.unit_eligible, scorer(bottleneck, revealer.askable), -torch.inf)
        return cls(
            order=_stable_descending(masked.flatten() if batch_level else masked),
            n_eligible=revealer.unit_eligible.sum(1),
            passes=_passes_per_sample(forward_passes, revealer.askable, revealer.predictions.n_classes),
        )

    def select(self, selected: torch.Tensor, t: int, batch_level: bool) -> None:
        """Mark the units of the first ``t`` steps in ``selected`` (N, U)."""
        if batch_level:  # the top t * N (sample, unit) pairs of the whole set
            n_samples = selected.shape[0]
            selected.view(-1)[self.order[: min(t * n_samples, int(self.n_eligible.sum()))]] = True
        else:  # each sample's top t units, but never past its eligible ones
            selected.scatter_(1, self.order[:, :t], torch.arange(t)[None, :] < self.n_eligible[:, None])


def _select_adaptively(
    selected: torch.Tensor,
    scorer: _UnitScorer,
    bottleneck: _Bottleneck,
    batch_level: bool,
    forward_passes: Callable[[int, int], int],
) -> float | None:
    """Adaptive ordering: re-score the units still open on the current bottleneck and mark the best
    (one per sample, or the top N pairs of the set at batch levels) in ``selected``. Returns the
    passes of f per sample this scoring cost, or None when no unit is left to reveal."""
    revealer = scorer.revealer
    open_units = revealer.unit_eligible & ~selected
    if not open_units.any():
        return None
    candidates = ~bottleneck.asked & revealer.askable  # concepts still to ask about; the rest is not scored
    spent = _passes_per_sample(forward_passes, candidates, revealer.predictions.n_classes)
    masked = torch.where(open_units, scorer(bottleneck, candidates), -torch.inf)
    if batch_level:
        n_samples = selected.shape[0]
        picks = _stable_descending(masked.flatten())[: min(n_samples, int(open_units.sum()))]
        selected.view(-1)[picks] = True
    else:
        best = _stable_descending(masked)[:, 0]
        rows = open_units.any(1)
        selected[rows.nonzero().squeeze(1), best[rows]] = True
    return spent


def _task_error(
    predictor: TargetPredictor, predictions: ConceptPredictions, bottleneck: _Bottleneck, metric: str
) -> float:
    predicted = predictor.log_proba(bottleneck.values, bottleneck.changed).argmax(-1)
    return error_rate(predicted, predictions.labels, predictions.n_classes, balanced=metric == "balanced_error")


@dataclass
class _Trace:
    """Per-step records of a run, turned into an :class:`InterventionCurve` at the end."""

    errors: list[float] = field(default_factory=list)
    concept_counts: list[torch.Tensor] = field(default_factory=list)
    unit_counts: list[torch.Tensor] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)

    def add(self, error: float, bottleneck: _Bottleneck, selected: torch.Tensor, passes: float) -> None:
        self.errors.append(error)
        self.concept_counts.append(bottleneck.asked.sum(1))
        self.unit_counts.append(selected.sum(1))
        self.passes.append(passes)

    def curve(self, config: InterventionConfig, final_values: torch.Tensor) -> InterventionCurve:
        concept_counts = torch.stack(self.concept_counts).numpy()
        unit_counts = torch.stack(self.unit_counts).numpy()
        units_mean, concepts_mean = unit_counts.mean(1), concept_counts.mean(1)
        passes = np.asarray(self.passes, dtype=float)
        expert = config.costs.group * units_mean if config.is_group_level else config.costs.concept * concepts_mean
        return InterventionCurve(
            criterion=config.criterion,
            level=config.level,
            ordering=config.ordering,
            steps=np.arange(len(self.errors)),
            error=np.asarray(self.errors, dtype=float),
            concepts_per_sample=concepts_mean,
            units_per_sample=units_mean,
            forward_passes_per_sample=passes,
            cost_per_sample=expert + config.costs.forward_pass * passes,
            concept_counts=concept_counts,
            unit_counts=unit_counts,
            final_values=final_values,
        )


def run_intervention(
    predictions: ConceptPredictions, target_model: nn.Module, config: InterventionConfig
) -> InterventionCurve:
    """Reveal concepts step by step as ``config`` prescribes and record the error after each step."""
    criterion = get_criterion(config.criterion)
    target_model.eval()
    n, k = predictions.values.shape
    membership = _unit_membership(predictions, config)
    low, high = replacement_values(predictions, config.replacement_source, config.percentiles, config.replacement)
    predictor = TargetPredictor(
        target_model, predictions.kind, config.conceptualization, low, high, config.n_samples, config.seed
    )
    check_module_widths(
        target_model,
        "target model",
        k,
        predictions.n_classes,
        source=f"the predictions have {k} concepts",
        outputs=f"{predictions.n_classes} class logits",
        probe=predictions.values[:2],
    )
    revealer = _Revealer.build(predictions, membership, low, high, config.not_visible)
    scorer = _UnitScorer(
        criterion=criterion.name,
        group_score=config.group_score,
        revealer=revealer,
        predictor=predictor,
        target_model=target_model,
        low=low,
        high=high,
        generator=torch.Generator().manual_seed(config.seed),
        chunk_rows=config.chunk_rows,
        group_level=config.is_group_level,
    )
    n_units = membership.shape[0]
    n_steps = n_units if config.max_steps is None else min(config.max_steps, n_units)
    selected = torch.zeros(n, n_units, dtype=torch.bool)
    bottleneck = revealer.reveal(selected)
    trace = _Trace()
    trace.add(_task_error(predictor, predictions, bottleneck, config.metric), bottleneck, selected, 0.0)
    static = None
    if config.ordering == "static" and n_steps > 0:
        static = _StaticPlan.rank(scorer, bottleneck, config.is_batch_level, criterion.forward_passes)
    for t in range(1, n_steps + 1):
        if static is not None:
            static.select(selected, t, config.is_batch_level)
            spent = static.passes
        else:
            step_passes = _select_adaptively(
                selected, scorer, bottleneck, config.is_batch_level, criterion.forward_passes
            )
            if step_passes is None:
                break
            spent = trace.passes[-1] + step_passes
        bottleneck = revealer.reveal(selected)
        trace.add(_task_error(predictor, predictions, bottleneck, config.metric), bottleneck, selected, spent)
    curve = trace.curve(config, bottleneck.values)
    log.debug(
        "%s %s %s: error %.4f -> %.4f", config.criterion, config.level, config.ordering, curve.error[0], curve.error[-1]
    )
    return curve


def available_criteria() -> list[str]:
    return sorted(CRITERIA)
