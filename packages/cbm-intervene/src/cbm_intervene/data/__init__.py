"""Data sources: the paper's synthetic generator, CUB-200-2011, SkinCon, and a predictions format."""

from cbm_intervene.data.core import ConceptDataset, ConceptGroups, stratified_split
from cbm_intervene.data.predictions import ConceptPredictions, load_predictions, save_predictions
from cbm_intervene.data.synthetic import SyntheticConfig, make_synthetic

__all__ = [
    "ConceptDataset",
    "ConceptGroups",
    "ConceptPredictions",
    "SyntheticConfig",
    "load_predictions",
    "make_synthetic",
    "save_predictions",
    "stratified_split",
]
