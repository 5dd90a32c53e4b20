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
authors' code uses the evaluation set: ``replacement_source='eval'``). Conceptualization at test
time: ``soft`` (as predicted), ``hard`` (probabilities thresholded at 0.5, logits at 0, mapped to
the replacement values), ``samp`` (f averaged over Bernoulli samples of the concepts). Concepts
marked not visible are, when revealed, ``nullify``: set to "absent" (the authors' procedure),
``keep``: left as predicted, or ``skip``: never asked.

Cost (Sec. 3.4; the paper's exact formula is not recoverable, so every term is explicit): a
revealed concept costs ``tau_i`` (individual levels), a revealed group ``tau_g`` (group levels),
and each pass of f a criterion needs costs ``tau_f``. Passes are counted per sample for what the
criterion actually evaluates: at every scoring, only the concepts still to be asked are candidates
(static ordering scores once, on every askable concept; adaptive ordering re-scores the remaining
ones before each step), and a sample without candidates is not scored.
"""

from __future__ import annotations

import logging
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
from cbm_intervene.models import check_module_widths

log = logging.getLogger(__name__)

LEVELS = ("I+S", "G+S", "I+B", "G+B")
ORDERINGS = ("static", "adaptive")
CONCEPTUALIZATIONS = ("soft", "hard", "samp")
NOT_VISIBLE = ("nullify", "keep", "skip")
REPLACEMENT_SOURCES = ("train", "eval")


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
    not_visible: str = "nullify"
    replacement_source: str = "train"
    percentiles: tuple[float, float] = (5.0, 95.0)
    max_steps: int | None = None
    metric: str = "error"
    costs: CostModel = field(default_factory=CostModel)
    chunk_rows: int = 65536  # rows of f per look-ahead batch (memory knob)
    seed: int = 0

    def __post_init__(self) -> None:
        self.criterion = get_criterion(self.criterion).name
        self.level = _choice("level", self.level, LEVELS, upper=True)
        self.ordering = _choice("ordering", self.ordering, ORDERINGS)
        self.group_score = _choice("group score", self.group_score, GROUP_SCORES)
        self.conceptualization = _choice("conceptualization", self.conceptualization, CONCEPTUALIZATIONS)
        self.not_visible = _choice("not-visible policy", self.not_visible, NOT_VISIBLE)
        self.replacement_source = _choice("replacement source", self.replacement_source, REPLACEMENT_SOURCES)
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
    predictions: ConceptPredictions, source: str = "train", percentiles: tuple[float, float] = (5.0, 95.0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The values meaning "absent"/"present" per concept: 0/1, or logit percentiles (Sec. 3.1)."""
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


def run_intervention(
    predictions: ConceptPredictions, target_model: nn.Module, config: InterventionConfig
) -> InterventionCurve:
    """Reveal concepts step by step as ``config`` prescribes and record the error after each step."""
    criterion = get_criterion(config.criterion)
    target_model.eval()
    n, k = predictions.values.shape
    if config.is_group_level:
        if predictions.groups is None:
            raise ValueError(f"level {config.level} needs concept groups, but the predictions have none")
        membership = predictions.groups.membership()
    else:
        membership = torch.eye(k, dtype=torch.bool)
    n_units = membership.shape[0]
    low, high = replacement_values(predictions, config.replacement_source, config.percentiles)
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

    visible = predictions.visibility if predictions.visibility is not None else torch.ones(n, k, dtype=torch.bool)
    askable = visible if config.not_visible == "skip" else torch.ones(n, k, dtype=torch.bool)
    unit_eligible = (askable.float() @ membership.T.float()) > 0  # (N, U)
    true = predictions.true_concepts
    revealed_values = torch.where(true > 0.5, high, low)
    revealed_probs = true.clone()
    if config.not_visible == "nullify":
        revealed_values = torch.where(visible, revealed_values, low.expand(n, k))
        revealed_probs = torch.where(visible, revealed_probs, torch.zeros_like(true))
    initial_probs = predictions.probabilities()
    generator = torch.Generator().manual_seed(config.seed)

    def state(selected_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        asked = (selected_units.float() @ membership.float()) > 0
        if config.not_visible == "skip":
            asked &= visible
        changed = asked & visible if config.not_visible == "keep" else asked
        values = torch.where(changed, revealed_values, predictions.values)
        probs = torch.where(changed, revealed_probs, initial_probs)
        return asked, changed, values, probs

    def unit_scores(
        changed: torch.Tensor, values: torch.Tensor, probs: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        ctx = ScoringContext(
            values=values,
            probs=probs,
            intervened=changed,
            true_concepts=true,
            low=low,
            high=high,
            target_model=target_model,
            log_predict=predictor.lookahead_log_proba,
            generator=generator,
            chunk_rows=config.chunk_rows,
            candidates=candidates,
            membership=membership if config.is_group_level else None,
            f_inputs=predictor.lookahead_inputs,
        )
        return score_units(criterion.name, ctx, config.group_score)

    def evaluate(values: torch.Tensor, changed: torch.Tensor) -> float:
        predicted = predictor.log_proba(values, changed).argmax(-1)
        return error_rate(
            predicted, predictions.labels, predictions.n_classes, balanced=config.metric == "balanced_error"
        )

    n_steps = n_units if config.max_steps is None else min(config.max_steps, n_units)
    selected = torch.zeros(n, n_units, dtype=torch.bool)
    asked, changed, values, probs = state(selected)
    errors = [evaluate(values, changed)]
    concept_counts, unit_counts, passes = [asked.sum(1)], [selected.sum(1)], [0.0]
    order = None
    if config.ordering == "static" and n_steps > 0:
        masked = torch.where(unit_eligible, unit_scores(changed, values, probs, askable), -torch.inf)
        order = _stable_descending(masked.flatten() if config.is_batch_level else masked)
        n_eligible = unit_eligible.sum(1)
        static_passes = _passes_per_sample(criterion.forward_passes, askable, predictions.n_classes)
    for t in range(1, n_steps + 1):
        if order is not None:  # static: a prefix of the initial order
            if config.is_batch_level:
                selected.view(-1)[order[: min(t * n, int(unit_eligible.sum()))]] = True
            else:
                take = order[:, :t]
                selected.scatter_(1, take, (torch.arange(t)[None, :] < n_eligible[:, None]))
            spent = float(static_passes)
        else:  # adaptive: re-score on the current bottleneck
            open_units = unit_eligible & ~selected
            if not open_units.any():
                break
            candidates = ~asked & askable  # concepts still to ask about; the rest is not scored
            spent = passes[-1] + _passes_per_sample(criterion.forward_passes, candidates, predictions.n_classes)
            masked = torch.where(open_units, unit_scores(changed, values, probs, candidates), -torch.inf)
            if config.is_batch_level:
                picks = _stable_descending(masked.flatten())[: min(n, int(open_units.sum()))]
                selected.view(-1)[picks] = True
            else:
                best = _stable_descending(masked)[:, 0]
                rows = open_units.any(1)
                selected[rows.nonzero().squeeze(1), best[rows]] = True
        asked, changed, values, probs = state(selected)
        errors.append(evaluate(values, changed))
        concept_counts.append(asked.sum(1))
        unit_counts.append(selected.sum(1))
        passes.append(spent)

    concept_counts_arr = torch.stack(concept_counts).numpy()
    unit_counts_arr = torch.stack(unit_counts).numpy()
    units_mean = unit_counts_arr.mean(1)
    concepts_mean = concept_counts_arr.mean(1)
    passes_arr = np.asarray(passes, dtype=float)
    expert = config.costs.group * units_mean if config.is_group_level else config.costs.concept * concepts_mean
    log.debug("%s %s %s: error %.4f -> %.4f", config.criterion, config.level, config.ordering, errors[0], errors[-1])
    return InterventionCurve(
        criterion=config.criterion,
        level=config.level,
        ordering=config.ordering,
        steps=np.arange(len(errors)),
        error=np.asarray(errors, dtype=float),
        concepts_per_sample=concepts_mean,
        units_per_sample=units_mean,
        forward_passes_per_sample=passes_arr,
        cost_per_sample=expert + config.costs.forward_pass * passes_arr,
        concept_counts=concept_counts_arr,
        unit_counts=unit_counts_arr,
        final_values=values,
    )


def available_criteria() -> list[str]:
    return sorted(CRITERIA)
