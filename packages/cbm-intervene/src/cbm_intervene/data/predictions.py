"""A file format for concept predictions, so concept predictors trained elsewhere plug in.

The intervention engine only needs, per evaluation sample: the bottleneck values f reads (concept
logits or probabilities), the true concepts an expert would reveal, the label, and optionally
concept groups, visibility and the training-set predictions (for the 5th/95th percentile
replacement values of logit bottlenecks, Shin et al. 2023, Sec. 3.1). Add the concept-to-target
model f (architecture spec plus weights) and a CUB model trained with Inception-v3 on a GPU can be
evaluated here on a CPU.

Files: ``.pt`` (``torch.save`` of plain tensors and JSON-able metadata) or ``.npz`` (NumPy arrays;
metadata as a JSON string). Both are written atomically and load with :func:`load_predictions`,
which builds only tensors and arrays (a file that would need arbitrary unpickling is refused) and
reports an unreadable file as :class:`shin_common.CorruptFileError` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cbm_intervene.data.core import ConceptDataset, ConceptGroups, check_binary
from cbm_intervene.metrics import METRICS
from cbm_intervene.networks import TargetModelSpec
from shin_common import CorruptFileError, load_npz, load_torch, save_torch_atomic
from shin_common.files import write_atomic

KINDS = ("prob", "logit")
_ARRAYS = ("values", "true_concepts", "labels", "visibility", "reference_values", "instance_concepts")


@dataclass(kw_only=True)
class ConceptPredictions:
    """Predicted bottleneck values and ground truth for one evaluation set.

    ``values``: ``(N, K)`` what f reads -- probabilities (``kind='prob'``) or logits (``'logit'``).
    ``true_concepts``: ``(N, K)`` binary concepts revealed by intervention (class-level on CUB).
    ``labels``: ``(N,)`` targets in ``[0, n_classes)``. ``visibility``: ``(N, K)`` bool, optional.
    ``reference_values``: ``(M, K)`` the same predictor's outputs on the training set, optional.
    ``instance_concepts``: ``(N, K)`` per-sample labels where they differ from ``true_concepts``.
    ``metric``: the task metric the data set calls for (``'balanced_error'`` for SkinCon), used by
    ``cbm-intervene intervene`` when no ``--metric`` is given; ``None``: plain error.
    """

    values: torch.Tensor
    kind: str
    true_concepts: torch.Tensor
    labels: torch.Tensor
    n_classes: int
    groups: ConceptGroups | None = None
    visibility: torch.Tensor | None = None
    reference_values: torch.Tensor | None = None
    instance_concepts: torch.Tensor | None = None
    concept_names: list[str] | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {list(METRICS)} or None")
        self.values = torch.as_tensor(self.values, dtype=torch.float32)
        self.true_concepts = torch.as_tensor(self.true_concepts, dtype=torch.float32)
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if self.values.ndim != 2:
            raise ValueError(f"values must be 2-D (samples, concepts), got shape {tuple(self.values.shape)}")
        n, k = self.values.shape
        if tuple(self.true_concepts.shape) != (n, k):
            raise ValueError(
                f"true_concepts shape {tuple(self.true_concepts.shape)} does not match values shape {(n, k)}"
            )
        if tuple(self.labels.shape) != (n,):
            raise ValueError(f"labels shape {tuple(self.labels.shape)} does not match {n} samples in values")
        if not torch.isfinite(self.values).all():
            raise ValueError("values contain NaN or infinite entries")
        check_binary("true_concepts", self.true_concepts)
        if self.kind == "prob":
            _check_probabilities("values", self.values)
        if n and (self.labels.min() < 0 or self.labels.max() >= self.n_classes):
            raise ValueError(
                f"labels must lie in [0, {self.n_classes}), got range [{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        if self.visibility is not None:
            self.visibility = torch.as_tensor(self.visibility).bool()
            if tuple(self.visibility.shape) != (n, k):
                raise ValueError(
                    f"visibility shape {tuple(self.visibility.shape)} does not match values shape {(n, k)}"
                )
        if self.instance_concepts is not None:
            self.instance_concepts = torch.as_tensor(self.instance_concepts, dtype=torch.float32)
            if tuple(self.instance_concepts.shape) != (n, k):
                raise ValueError(
                    f"instance_concepts shape {tuple(self.instance_concepts.shape)} does not match {(n, k)}"
                )
            check_binary("instance_concepts", self.instance_concepts)
        if self.reference_values is not None:
            self.reference_values = torch.as_tensor(self.reference_values, dtype=torch.float32)
            if self.reference_values.ndim != 2 or self.reference_values.shape[1] != k:
                raise ValueError(f"reference_values must have shape (M, {k}), got {tuple(self.reference_values.shape)}")
            if self.kind == "prob":
                _check_probabilities("reference_values", self.reference_values)
        if self.groups is not None and self.groups.n_concepts != k:
            raise ValueError(f"groups cover {self.groups.n_concepts} concepts but values have {k}")
        if self.concept_names is not None and len(self.concept_names) != k:
            raise ValueError(f"{len(self.concept_names)} concept names for {k} concepts")

    @classmethod
    def from_dataset(
        cls,
        data: ConceptDataset,
        split: str,
        *,
        values: np.ndarray | torch.Tensor,
        kind: str,
        reference_values: np.ndarray | torch.Tensor | None = None,
    ) -> ConceptPredictions:
        """Predictions ``values`` for the samples of ``data.split(split)``, with that split's true and
        instance-level concepts, labels, visibility, the data set's groups, concept names and
        metric (``data.metadata['metric']``, e.g. SkinCon's balanced error)."""
        part = data.split(split)
        return cls(
            values=values,
            kind=kind,
            true_concepts=part["concepts"],
            labels=part["labels"],
            n_classes=data.n_classes,
            groups=data.groups,
            visibility=part["visibility"],
            reference_values=reference_values,
            instance_concepts=part["instance_concepts"],
            concept_names=data.concept_names,
            metric=data.metadata.get("metric"),
        )

    @property
    def n_samples(self) -> int:
        return self.values.shape[0]

    @property
    def n_concepts(self) -> int:
        return self.values.shape[1]

    def probabilities(self) -> torch.Tensor:
        return self.values if self.kind == "prob" else torch.sigmoid(self.values)

    def with_true_concepts(self, true_concepts: torch.Tensor) -> ConceptPredictions:
        """A copy revealing other ground truth (e.g. instance-level labels for the fairness study)."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields["true_concepts"] = true_concepts
        return ConceptPredictions(**fields)


def _check_probabilities(name: str, values: torch.Tensor) -> None:
    if values.numel() and (values.min() < 0 or values.max() > 1):
        raise ValueError(
            f"{name} are declared as probabilities (kind='prob') but lie in "
            f"[{float(values.min()):.4g}, {float(values.max()):.4g}], outside [0, 1]; pass kind='logit' for logits"
        )


def save_predictions(
    path: str | Path,
    predictions: ConceptPredictions,
    *,
    target_model: nn.Module | None = None,
    target_spec: TargetModelSpec | None = None,
) -> Path:
    """Save predictions (and optionally f as ``target_spec`` plus its ``state_dict``) to .pt or .npz.

    ``target_model`` must be what ``target_spec`` builds: a linear spec (``hidden=()``) takes a bare
    ``nn.Linear`` or an ``nn.Sequential`` around one; an MLP spec takes the ``nn.Sequential`` of
    :func:`~cbm_intervene.models.mlp`. The weights are checked here, so a file that cannot be
    loaded is never written, and stored in the layout the spec builds.
    """
    path = Path(path)
    if path.suffix not in (".pt", ".npz"):
        raise ValueError(f"predictions file must end in .pt or .npz, got {path.name!r}")
    if (target_model is None) != (target_spec is None):
        raise ValueError("pass target_model and target_spec together (the spec rebuilds the architecture)")
    if target_spec is not None:
        if (target_spec.n_concepts, target_spec.n_classes) != (predictions.n_concepts, predictions.n_classes):
            raise ValueError(
                f"target_spec maps {target_spec.n_concepts} concepts to {target_spec.n_classes} classes, "
                f"but the predictions have {predictions.n_concepts} concepts and {predictions.n_classes} classes"
            )
        target_model = target_spec.load(target_model.state_dict())
    meta: dict[str, Any] = {
        "format": "cbm-intervene-predictions/1",
        "kind": predictions.kind,
        "n_classes": predictions.n_classes,
        "groups": None if predictions.groups is None else predictions.groups.to_dict(),
        "concept_names": predictions.concept_names,
        "metric": predictions.metric,
        "target_spec": None if target_spec is None else {**target_spec.__dict__, "hidden": list(target_spec.hidden)},
    }
    arrays = {name: getattr(predictions, name) for name in _ARRAYS if getattr(predictions, name) is not None}
    if target_model is not None:
        arrays.update({f"target_model.{k}": v for k, v in target_model.state_dict().items()})
    if path.suffix == ".pt":
        save_torch_atomic({"meta": meta, "arrays": {k: v.detach().cpu() for k, v in arrays.items()}}, path)
    else:
        numpy_arrays = {
            "__meta__": np.array(json.dumps(meta)),
            **{k: v.detach().cpu().numpy() for k, v in arrays.items()},
        }
        write_atomic(path, lambda handle: np.savez(handle, **numpy_arrays))
    return path


def load_predictions(path: str | Path) -> tuple[ConceptPredictions, nn.Module | None]:
    """Load a file written by :func:`save_predictions` (or by hand in the same layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    if path.suffix not in (".pt", ".npz"):
        raise ValueError(f"predictions file must end in .pt or .npz, got {path.name!r}")
    try:
        if path.suffix == ".pt":
            blob = load_torch(path, map_location="cpu")
            meta, arrays = blob["meta"], {k: torch.as_tensor(v) for k, v in blob["arrays"].items()}
        else:
            npz = load_npz(path)
            meta = json.loads(str(npz.pop("__meta__")))
            arrays = {k: torch.from_numpy(v) for k, v in npz.items()}
        if not isinstance(meta, dict):
            raise TypeError(f"metadata is a {type(meta).__name__}, expected a mapping")
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        # a file torch or NumPy can read, but not in the layout save_predictions writes
        raise CorruptFileError(path, f"not a predictions file ({type(exc).__name__}: {exc})") from None
    for required in ("values", "true_concepts", "labels"):
        if required not in arrays:
            raise ValueError(f"{path}: missing array {required!r}")
    try:
        predictions = ConceptPredictions(
            kind=meta["kind"],
            n_classes=int(meta["n_classes"]),
            groups=None if meta.get("groups") is None else ConceptGroups.from_dict(meta["groups"]),
            concept_names=meta.get("concept_names"),
            metric=meta.get("metric"),
            **{name: arrays.get(name) for name in _ARRAYS},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    target_model = None
    if meta.get("target_spec") is not None:
        prefix = "target_model."
        try:
            spec = TargetModelSpec(**meta["target_spec"])
            target_model = spec.load({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
    return predictions, target_model
