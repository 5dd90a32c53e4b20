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
from cbm_intervene.intervention import (
    CostModel,
    InterventionConfig,
    InterventionCurve,
    register_criterion,
    run_intervention,
)
from cbm_intervene.models import TrainConfig, train_cbm

__all__ = [
    "ConceptDataset",
    "ConceptGroups",
    "ConceptPredictions",
    "CostModel",
    "InterventionConfig",
    "InterventionCurve",
    "SyntheticConfig",
    "TrainConfig",
    "__version__",
    "load_predictions",
    "make_synthetic",
    "register_criterion",
    "run_intervention",
    "save_predictions",
    "train_cbm",
]
