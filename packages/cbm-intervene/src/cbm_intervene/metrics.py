"""Error metrics and summaries of intervention curves (Shin et al., ICML 2023, Sec. 4-5).

Task error is ``1 - accuracy``; for imbalanced tasks (SkinCon) ``1 - balanced accuracy`` (mean
per-class recall over the classes present). Summaries users compare criteria by: error at fixed
budgets, normalised area under the error curve, interventions needed to reach a target error, and
the gap of a practical criterion to an oracle reference (LCP) at equal budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: Task metrics: ``1 - accuracy`` and ``1 - balanced accuracy``.
METRICS = ("error", "balanced_error")


def error_rate(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int, *, balanced: bool = False) -> float:
    """``1 - accuracy`` or, with ``balanced``, ``1 - mean recall over the classes present in labels``."""
    predicted, labels = torch.as_tensor(predicted), torch.as_tensor(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted shape {tuple(predicted.shape)} does not match labels {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("cannot compute an error on zero samples")
    correct = (predicted == labels).float()
    if not balanced:
        return 1.0 - correct.mean().item()
    per_class = torch.zeros(n_classes).index_add_(0, labels, correct)
    counts = torch.bincount(labels, minlength=n_classes).float()
    present = counts > 0
    return 1.0 - (per_class[present] / counts[present]).mean().item()


def mean_std(curves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation across seeds of equally long curves."""
    stacked = np.stack([np.asarray(c, dtype=float) for c in curves])
    return stacked.mean(0), stacked.std(0)


def error_at(x: np.ndarray, error: np.ndarray, budget: float) -> float:
    """The error after the last step whose x (interventions or cost) does not exceed ``budget``."""
    x, error = np.asarray(x, dtype=float), np.asarray(error, dtype=float)
    within = np.flatnonzero(x <= budget + 1e-9)
    if not within.size:
        raise ValueError(f"budget {budget} is below the first point of the curve ({x[0]})")
    return float(error[within[-1]])


def area_under_curve(x: np.ndarray, error: np.ndarray) -> float:
    """Trapezoidal area under error(x) divided by the x range: the mean error over the budget."""
    x, error = np.asarray(x, dtype=float), np.asarray(error, dtype=float)
    span = x[-1] - x[0]
    if span <= 0:
        return float(error[0])
    return float(np.sum((error[1:] + error[:-1]) / 2 * np.diff(x)) / span)


def interventions_to_reach(x: np.ndarray, error: np.ndarray, target: float) -> float | None:
    """The smallest x at which the error is at most ``target`` (None if never reached)."""
    hits = np.flatnonzero(np.asarray(error) <= target + 1e-12)
    return float(np.asarray(x)[hits[0]]) if hits.size else None


def summarize(
    x: np.ndarray,
    error: np.ndarray,
    *,
    budgets: Sequence[float] = (),
    target_error: float | None = None,
    reference_error: np.ndarray | None = None,
) -> dict[str, Any]:
    """Summary numbers of one curve; ``reference_error`` (same x, e.g. the LCP oracle) adds the gap."""
    out: dict[str, Any] = {
        "initial_error": float(np.asarray(error)[0]),
        "final_error": float(np.asarray(error)[-1]),
        "auc": area_under_curve(x, error),
        "error_at": {str(b): error_at(x, error, b) for b in budgets},
    }
    if target_error is not None:
        out["target_error"] = target_error
        out["interventions_to_target"] = interventions_to_reach(x, error, target_error)
    if reference_error is not None:
        gap = np.asarray(error, dtype=float) - np.asarray(reference_error, dtype=float)
        out["gap_to_reference_auc"] = area_under_curve(x, error) - area_under_curve(x, reference_error)
        out["max_gap_to_reference"] = float(gap.max())
    return out
