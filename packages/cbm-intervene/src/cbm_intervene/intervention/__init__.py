"""Selection criteria and the intervention engine."""

from cbm_intervene.intervention.criteria import (
    CRITERIA,
    GROUP_SCORES,
    Criterion,
    ScoringContext,
    get_criterion,
    register_criterion,
    score_concepts,
    score_units,
)
from cbm_intervene.intervention.engine import (
    CONCEPTUALIZATIONS,
    LEVELS,
    NOT_VISIBLE,
    ORDERINGS,
    REPLACEMENT_SOURCES,
    CostModel,
    InterventionConfig,
    InterventionCurve,
    TargetPredictor,
    available_criteria,
    replacement_values,
    run_intervention,
)

__all__ = [
    "CONCEPTUALIZATIONS",
    "CRITERIA",
    "GROUP_SCORES",
    "LEVELS",
    "NOT_VISIBLE",
    "ORDERINGS",
    "REPLACEMENT_SOURCES",
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
