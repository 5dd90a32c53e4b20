"""Selection criteria and the intervention engine."""

from cbm_intervene.intervention.criteria import (
    CRITERIA,
    Criterion,
    ScoringContext,
    get_criterion,
    register_criterion,
    score_concepts,
    score_units,
)
from cbm_intervene.intervention.engine import (
    LEVELS,
    CostModel,
    InterventionConfig,
    InterventionCurve,
    TargetPredictor,
    available_criteria,
    replacement_values,
    run_intervention,
)

__all__ = [
    "CRITERIA",
    "LEVELS",
    "CostModel",
    "Criterion",
    "InterventionConfig",
    "InterventionCurve",
    "ScoringContext",
    "TargetPredictor",
    "available_criteria",
    "get_criterion",
    "register_criterion",
    "replacement_values",
    "run_intervention",
    "score_concepts",
    "score_units",
]
