"""Containers shared by every data source: concept groups and a concept-annotated data set.

A concept bottleneck data set (Koh et al., ICML 2020; Shin et al., ICML 2023, Sec. 2) holds inputs
``x``, binary concept labels ``c`` and a class label ``y`` per sample. Shin et al. additionally use
concept *groups* (CUB: 28 groups over 112 concepts), per-sample concept *visibility* and, for the
fairness analysis, instance-level concept labels beside the class-level ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SPLITS = ("train", "val", "test")


@dataclass(kw_only=True)
class ConceptGroups:
    """A partition of ``n_concepts`` concepts into named groups.

    ``members[g]`` lists the concept indices of group ``g``. Every concept must belong to exactly
    one group; otherwise group-level intervention would silently never ask about some concepts.
    """

    names: list[str]
    members: list[list[int]]
    n_concepts: int

    def __post_init__(self) -> None:
        if len(self.names) != len(self.members):
            raise ValueError(f"groups: {len(self.names)} names but {len(self.members)} member lists")
        if self.n_concepts <= 0:
            raise ValueError(f"groups: n_concepts must be positive, got {self.n_concepts}")
        self.members = [[int(i) for i in group] for group in self.members]
        owner: dict[int, int] = {}
        for g, group in enumerate(self.members):
            if not group:
                raise ValueError(f"group {self.names[g]!r} has no concepts")
            for i in group:
                if not 0 <= i < self.n_concepts:
                    raise ValueError(f"group {self.names[g]!r} names concept {i}, outside [0, {self.n_concepts})")
                if i in owner:
                    raise ValueError(
                        f"concept {i} appears in groups {self.names[owner[i]]!r} and {self.names[g]!r}; "
                        "groups must partition the concepts"
                    )
                owner[i] = g
        missing = sorted(set(range(self.n_concepts)) - set(owner))
        if missing:
            shown = missing[:10]
            raise ValueError(
                f"groups do not cover the concepts: {len(missing)} of {self.n_concepts} concepts are in no group "
                f"(e.g. {shown})"
            )

    @property
    def n_groups(self) -> int:
        return len(self.members)

    @classmethod
    def from_assignment(cls, group_of_concept: Sequence[int], names: Sequence[str] | None = None) -> ConceptGroups:
        """Build groups from one group id per concept (ids need not be contiguous)."""
        ids = [int(g) for g in group_of_concept]
        unique = sorted(set(ids))
        members = [[i for i, g in enumerate(ids) if g == u] for u in unique]
        group_names = list(names) if names is not None else [f"group_{u}" for u in unique]
        return cls(names=group_names, members=members, n_concepts=len(ids))

    @classmethod
    def contiguous(cls, n_concepts: int, group_size: int) -> ConceptGroups:
        """Consecutive blocks of ``group_size`` concepts (the last block may be shorter)."""
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        return cls.from_assignment([i // group_size for i in range(n_concepts)])

    @classmethod
    def singletons(cls, n_concepts: int) -> ConceptGroups:
        return cls.contiguous(n_concepts, 1)

    def membership(self) -> torch.Tensor:
        """Boolean ``(n_groups, n_concepts)`` matrix, True where a concept belongs to a group."""
        matrix = torch.zeros(self.n_groups, self.n_concepts, dtype=torch.bool)
        for g, group in enumerate(self.members):
            matrix[g, group] = True
        return matrix

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "members": self.members, "n_concepts": self.n_concepts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConceptGroups:
        return cls(names=list(data["names"]), members=[list(m) for m in data["members"]], n_concepts=data["n_concepts"])


def check_binary(name: str, array: np.ndarray | torch.Tensor) -> None:
    values = torch.as_tensor(array)
    if values.numel() and not bool(((values == 0) | (values == 1)).all()):
        bad = values[(values != 0) & (values != 1)].flatten()[:5].tolist()
        raise ValueError(f"{name} must be binary (0/1), found values such as {bad}")


@dataclass(kw_only=True)
class ConceptDataset:
    """Concept-annotated samples with a train/val/test split.

    ``concepts`` are the labels models are trained on and interventions reveal (class-level for CUB,
    as in the paper); ``instance_concepts`` keeps per-image labels when they differ. ``features`` may
    be ``None`` when the inputs are images handled elsewhere (CUB, SkinCon): then ``sources`` names
    them and concept predictions come in through :mod:`cbm_intervene.data.predictions`.
    """

    concepts: np.ndarray
    labels: np.ndarray
    n_classes: int
    splits: dict[str, np.ndarray]
    concept_names: list[str]
    features: np.ndarray | None = None
    groups: ConceptGroups | None = None
    visibility: np.ndarray | None = None
    instance_concepts: np.ndarray | None = None
    sources: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.concepts = np.asarray(self.concepts, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.concepts.ndim != 2:
            raise ValueError(f"concepts must be 2-D (samples, concepts), got shape {self.concepts.shape}")
        n, k = self.concepts.shape
        check_binary("concepts", self.concepts)
        if self.labels.shape != (n,):
            raise ValueError(
                f"labels must have shape ({n},) to match concepts {self.concepts.shape}, got {self.labels.shape}"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= self.n_classes):
            raise ValueError(
                f"labels must lie in [0, {self.n_classes}), got range [{self.labels.min()}, {self.labels.max()}]"
            )
        if len(self.concept_names) != k:
            raise ValueError(f"{len(self.concept_names)} concept names for {k} concepts")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2 or self.features.shape[0] != n:
                raise ValueError(f"features must have shape ({n}, D) to match concepts, got {self.features.shape}")
        for name in ("visibility", "instance_concepts"):
            value = getattr(self, name)
            if value is not None and np.shape(value) != (n, k):
                raise ValueError(f"{name} must have shape ({n}, {k}) to match concepts, got {np.shape(value)}")
        if self.visibility is not None:
            self.visibility = np.asarray(self.visibility, dtype=bool)
        if self.instance_concepts is not None:
            self.instance_concepts = np.asarray(self.instance_concepts, dtype=np.float32)
            check_binary("instance_concepts", self.instance_concepts)
        if self.groups is not None and self.groups.n_concepts != k:
            raise ValueError(f"groups cover {self.groups.n_concepts} concepts but the data set has {k}")
        for split, index in self.splits.items():
            index = np.asarray(index, dtype=np.int64)
            if index.size and (index.min() < 0 or index.max() >= n):
                raise ValueError(f"split {split!r} indexes outside [0, {n})")
            self.splits[split] = index

    @property
    def n_concepts(self) -> int:
        return self.concepts.shape[1]

    def split(self, name: str) -> dict[str, np.ndarray | None]:
        """The arrays of one split: features, concepts, labels, visibility, instance_concepts."""
        if name not in self.splits:
            raise ValueError(f"unknown split {name!r}; this data set has {sorted(self.splits)}")
        index = self.splits[name]

        def take(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[index]

        return {
            "features": take(self.features),
            "concepts": self.concepts[index],
            "labels": self.labels[index],
            "visibility": take(self.visibility),
            "instance_concepts": take(self.instance_concepts),
        }


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator, names: Sequence[str] = SPLITS
) -> dict[str, np.ndarray]:
    """Split indices per class in the given fractions (the paper's 70/15/15 on synthetic data)."""
    if len(fractions) != len(names):
        raise ValueError(f"{len(fractions)} fractions for splits {list(names)}")
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    bounds = np.cumsum(fractions)[:-1]
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(bounds * len(index)).astype(int)
        for name, chunk in zip(names, np.split(index, cuts), strict=True):
            parts[name].append(chunk)
    return {name: np.sort(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()}
