"""Grids of intervention runs (criteria x levels, over models and seeds) and their summaries.

One *run* is :func:`~cbm_intervene.intervention.run_intervention` for one trained model (one
predictions set) and one seed. Curves are averaged over models x seeds (mean and std), and
summarised against the number of concepts revealed per sample -- the paper's fair x-axis for
comparing group and individual levels -- and against cost. Runs that stop early (adaptive
ordering with nothing left to ask) hold their last values: :func:`aligned_curves`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from cbm_intervene.data.predictions import ConceptPredictions
from cbm_intervene.intervention import InterventionConfig, InterventionCurve, get_criterion, run_intervention
from cbm_intervene.metrics import mean_std, summarize
from shin_common import JsonlStore, provenance, to_jsonable

log = logging.getLogger(__name__)

ORACLE = "LCP"

#: The per-step arrays of an :class:`InterventionCurve` that are averaged over runs.
CURVE_FIELDS = ("error", "concepts_per_sample", "units_per_sample", "forward_passes_per_sample", "cost_per_sample")


def aligned_curves(runs: Sequence[InterventionCurve]) -> dict[str, np.ndarray]:
    """Each per-step array of ``runs`` stacked to ``(n_runs, T+1)``, T the longest run's steps.

    Adaptive ordering stops a run once nothing is left to ask, so runs on predictions of different
    visibility (``not_visible="skip"``) or groups end at different steps. A run that stopped has
    revealed everything it can: its error, concepts, units, passes and cost stay as they are, so
    its last values are held until the longest run ends (the static ordering's curves do the same
    by construction). The mean at a step then averages every run, finished or not.
    """
    length = max(len(run.error) for run in runs)

    def held(values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        return np.concatenate([values, np.repeat(values[-1:], length - len(values))])

    return {name: np.stack([held(getattr(run, name)) for run in runs]) for name in CURVE_FIELDS}


def evaluate_grid(
    models: Sequence[tuple[ConceptPredictions, nn.Module]],
    *,
    criteria: Sequence[str],
    levels: Sequence[str],
    base: InterventionConfig,
    seeds: Sequence[int] = (0,),
    budgets: Sequence[float] = (),
    target_error: float | None = None,
    store: JsonlStore | None = None,
    run_tag: Any = None,
) -> dict[str, Any]:
    """Run every (criterion, level) on every model, over ``seeds`` where the run is random.

    Deterministic runs (no random criterion, no sampled conceptualization) are done once per
    model. Returns ``{"curves": {level: {criterion: ...}}, "summary": {...}}`` ready for JSON.

    With ``store``, each finished (level, criterion) cell is appended to the JSON-lines store under
    a key made of the cell, the intervention config, the seeds and ``run_tag``; a rerun after an
    interruption reuses finished cells instead of redoing them. ``run_tag`` must identify the
    inputs' *content* (the CLI passes the predictions files' paths and sha256 digests): a key with
    paths only would serve stale cells after a file is rewritten. Every stored line carries the
    provenance of the code that computed it (cbm-intervene's version and git revision).
    """
    if not models:
        raise ValueError("evaluate_grid needs at least one (predictions, target model) pair")
    for name in criteria:
        get_criterion(name)
    curves: dict[str, dict[str, Any]] = {}
    summary: dict[str, dict[str, Any]] = {}
    cell_provenance: dict[str, Any] | None = None  # taken once: it runs git
    for level in levels:
        curves[level], summary[level] = {}, {}
        for name in criteria:
            config = replace(base, criterion=name, level=level)
            key = {
                "cell": [level, config.criterion],
                "config": to_jsonable(config),
                "seeds": list(seeds),
                "tag": run_tag,
            }
            if store is not None and (done := store.get(key)) is not None:
                curves[level][config.criterion] = done["curve"]
                log.info("%s %s: reused from %s", level, config.criterion, store.path)
                continue
            random_run = get_criterion(name).stochastic or config.conceptualization == "samp"
            runs = [
                run_intervention(predictions, target, replace(config, seed=seed))
                for predictions, target in models
                for seed in (seeds if random_run else seeds[:1])
            ]
            aligned = aligned_curves(runs)
            error_mean, error_std = mean_std(list(aligned["error"]))
            curves[level][config.criterion] = {
                "n_runs": len(runs),
                "error_mean": error_mean.tolist(),
                "error_std": error_std.tolist(),
                **{name: aligned[name].mean(axis=0).tolist() for name in CURVE_FIELDS[1:]},
            }
            log.info(
                "%s %s: error %.4f -> %.4f (%d runs)", level, config.criterion, error_mean[0], error_mean[-1], len(runs)
            )
            if store is not None:
                if cell_provenance is None:
                    cell_provenance = provenance(package="cbm-intervene")
                store.append(key, {"curve": curves[level][config.criterion], "provenance": cell_provenance})
        reference = curves[level].get(ORACLE)
        for name, curve in curves[level].items():
            x = np.asarray(curve["concepts_per_sample"])
            usable = [b for b in budgets if b >= x[0]]
            ref = None
            if reference is not None and name != ORACLE and len(reference["error_mean"]) == len(curve["error_mean"]):
                ref = np.asarray(reference["error_mean"])
            summary[level][name] = summarize(
                x, np.asarray(curve["error_mean"]), budgets=usable, target_error=target_error, reference_error=ref
            ) | {"auc_vs_cost": summarize(np.asarray(curve["cost_per_sample"]), np.asarray(curve["error_mean"]))["auc"]}
    return {"curves": curves, "summary": summary}
