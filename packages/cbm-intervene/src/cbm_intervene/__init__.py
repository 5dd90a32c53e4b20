"""Concept bottleneck models and test-time intervention: selection criteria, levels, costs, and synthetic data from causal graphs.

Implements Shin, Jo, Ahn, Lee, "A Closer Look at the Intervention Procedure of Concept Bottleneck
Models", ICML 2023 (arXiv 2302.14260), on top of the concept bottleneck models of Koh et al.,
ICML 2020.
"""

__version__ = "0.1.0"

from cbm_intervene.data import (
    ConceptDataset,
    ConceptGroups,
    ConceptPredictions,
    SyntheticConfig,
    load_predictions,
    make_synthetic,
    save_predictions,
)
from cbm_intervene.grid import evaluate_grid
from cbm_intervene.intervention import (
    CRITERIA,
    LEVELS,
    CostModel,
    Criterion,
    InterventionConfig,
    InterventionCurve,
    ScoringContext,
    get_criterion,
    register_criterion,
    run_intervention,
)
from cbm_intervene.models import (
    TRAINING_STRATEGIES,
    TrainConfig,
    TrainedCBM,
    TrainingRun,
    TrainingStrategy,
    load_cbm,
    save_cbm,
    train_cbm,
)
from cbm_intervene.networks import TargetModelSpec, mlp

__all__ = [
    "CRITERIA",
    "LEVELS",
    "TRAINING_STRATEGIES",
    "ConceptDataset",
    "ConceptGroups",
    "ConceptPredictions",
    "CostModel",
    "Criterion",
    "InterventionConfig",
    "InterventionCurve",
    "ScoringContext",
    "SyntheticConfig",
    "TargetModelSpec",
    "TrainConfig",
    "TrainedCBM",
    "TrainingRun",
    "TrainingStrategy",
    "__version__",
    "evaluate_grid",
    "get_criterion",
    "load_cbm",
    "load_predictions",
    "make_synthetic",
    "mlp",
    "register_criterion",
    "run_intervention",
    "save_cbm",
    "save_predictions",
    "train_cbm",
]
