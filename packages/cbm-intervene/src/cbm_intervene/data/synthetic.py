"""The synthetic causal-graph data of Shin et al. (ICML 2023, Sec. 5.1 and Appendix), fully seeded.

Generative process (paper defaults in parentheses): ``n_classes`` (100) classes come in
``n_groups`` (50) groups of similar classes. Per concept, ``alpha_k ~ N(alpha_mean, alpha_std)``
(0.8, 0.1) clipped to [0, 1]; per group, ``beta ~ U(0, 1)^K`` and the group's base vector is
``1[beta >= alpha]`` (about 20% ones). Each class of a group flips one concept of the base vector,
a different one per class, so similar classes differ in two concepts. A sample's concepts are its
class vector; its input is ``x = W c + z`` with ``W ~ N(0, weight_std)`` (0.1) and
``z ~ N(0, noise_std)`` (2.0). The split is stratified 70/15/15.

Variants of the paper's ablations: *Hidden* (``exposed_fraction`` < 1: only a random subset of the
concepts is exposed as labels, while x depends on all), *Diversity* (``flip_probability`` > 0: each
sample's concepts are flipped independently and x is generated from the flipped vector),
*Sparsity* (another ``alpha_mean``), *Similarity* (another ``n_groups``). Unlike the authors'
script, every draw comes from one ``numpy.random.Generator`` seeded by ``seed``.

``concept_group_size`` is our addition: the paper's synthetic data have no concept groups, so
group-level intervention on them uses contiguous blocks of this size.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from cbm_intervene.data.core import ConceptDataset, ConceptGroups, stratified_split

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SyntheticConfig:
    """Parameters of the generator. (Default: the paper's values.)"""

    n_concepts: int = 100
    n_features: int = 100
    n_classes: int = 100
    n_groups: int = 50
    samples_per_class: int = 100
    alpha_mean: float = 0.8
    alpha_std: float = 0.1
    weight_std: float = 0.1
    noise_std: float = 2.0
    exposed_fraction: float = 1.0
    flip_probability: float = 0.0
    concept_group_size: int = 4
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_concepts", "n_features", "n_classes", "n_groups", "samples_per_class", "concept_group_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_classes % self.n_groups:
            raise ValueError(f"n_classes={self.n_classes} must be a multiple of n_groups={self.n_groups}")
        if self.n_classes // self.n_groups > self.n_concepts:
            raise ValueError(
                f"{self.n_classes // self.n_groups} classes per group need as many distinct concepts to flip, "
                f"but n_concepts={self.n_concepts}"
            )
        for name in ("alpha_std", "weight_std", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0 < self.exposed_fraction <= 1:
            raise ValueError(f"exposed_fraction must lie in (0, 1], got {self.exposed_fraction}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must lie in [0, 1], got {self.flip_probability}")
        self.split_fractions = tuple(float(f) for f in self.split_fractions)  # type: ignore[assignment]
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions):
            raise ValueError(f"split_fractions must be three non-negative numbers, got {self.split_fractions}")
        if not np.isclose(sum(self.split_fractions), 1.0):
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")


def class_concept_vectors(config: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The ``(n_classes, n_concepts)`` class vectors and the ``(n_groups, n_concepts)`` base vectors."""
    k = config.n_concepts
    alpha = np.clip(rng.normal(config.alpha_mean, config.alpha_std, size=k), 0.0, 1.0)
    beta = rng.uniform(0.0, 1.0, size=(config.n_groups, k))
    base = (beta >= alpha).astype(np.float32)
    per_group = config.n_classes // config.n_groups
    classes = np.repeat(base, per_group, axis=0)
    for g in range(config.n_groups):
        flipped = rng.choice(k, size=per_group, replace=False)  # a different concept for each class
        for j, concept in enumerate(flipped):
            row = g * per_group + j
            classes[row, concept] = 1.0 - classes[row, concept]
    return classes, base


def make_synthetic(config: SyntheticConfig | None = None) -> ConceptDataset:
    """Generate the synthetic data set; the same config (seed included) gives identical arrays."""
    config = config or SyntheticConfig()
    rng = np.random.default_rng(config.seed)
    classes, base = class_concept_vectors(config, rng)
    labels = np.repeat(np.arange(config.n_classes), config.samples_per_class)
    concepts = classes[labels].copy()
    if config.flip_probability > 0:
        flips = rng.random(concepts.shape) < config.flip_probability
        concepts = np.where(flips, 1.0 - concepts, concepts).astype(np.float32)
    weights = rng.normal(0.0, config.weight_std, size=(config.n_features, config.n_concepts))
    noise = rng.normal(0.0, config.noise_std, size=(len(labels), config.n_features))
    features = (concepts @ weights.T + noise).astype(np.float32)
    exposed = np.arange(config.n_concepts)
    if config.exposed_fraction < 1:
        n_exposed = max(1, round(config.exposed_fraction * config.n_concepts))
        exposed = np.sort(rng.choice(config.n_concepts, size=n_exposed, replace=False))
    splits = stratified_split(labels, config.split_fractions, rng)
    k = len(exposed)
    log.info(
        "synthetic data: %d samples, %d features, %d exposed concepts, %d classes",
        len(labels),
        config.n_features,
        k,
        config.n_classes,
    )
    return ConceptDataset(
        features=features,
        concepts=concepts[:, exposed],
        labels=labels,
        n_classes=config.n_classes,
        splits=splits,
        concept_names=[f"concept_{i}" for i in exposed],
        groups=ConceptGroups.contiguous(k, config.concept_group_size),
        metadata={
            "source": "synthetic",
            "config": asdict(config),
            "exposed_concepts": exposed.tolist(),
            "base_vectors": base,
            "class_vectors": classes,
        },
    )
