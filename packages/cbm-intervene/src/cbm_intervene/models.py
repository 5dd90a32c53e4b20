"""Concept bottleneck models and the four training strategies of Koh et al. (ICML 2020).

A CBM predicts concepts ``c_hat = g(x)`` and the target ``y = f(c_hat)``. Strategies, as compared
by Shin et al. (ICML 2023, Sec. 4.3):

- IND: g and f trained independently; f on the *true* concepts, fed predicted probabilities at test.
- SEQ: g first, then f on g's predicted (frozen) logits.
- JNT: end to end with ``CE(f(logits), y) + lambda * sum_k BCE(logit_k, c_k)``.
- JNT+P: joint, but f reads the sigmoid probabilities (a probability bottleneck).

Each stage stops early on its validation loss and keeps the best weights; with ``checkpoint_dir``
the best state of every stage is saved to disk, and about every second a progress file
(``<stage>.progress.pt``: weights, optimizer and random generator states, early-stopping counters)
from which ``train_cbm(..., resume=True)`` continues an interrupted run exactly where it stopped.

g is an MLP by default; pass any ``nn.Module`` mapping ``(B, D)`` features to ``(B, K)`` concept
logits as ``concept_model`` (and any module mapping ``(B, K)`` to ``(B, M)`` class logits as
``target_model``) to train your own. Checkpoints hold state_dicts only: the package rebuilds the
modules it built itself, and :func:`load_cbm` fills the instances you pass for custom ones.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cbm_intervene.data.core import ConceptDataset
from cbm_intervene.data.predictions import ConceptPredictions
from cbm_intervene.networks import TargetModelSpec, check_module_widths, mlp, mlp_sizes
from shin_common import CorruptFileError, Registry, load_torch, save_torch_atomic

# mlp, TargetModelSpec, check_module_widths and mlp_sizes live in cbm_intervene.networks; they are
# re-exported here, where they were first published
__all__ = [
    "BOTTLENECK_KIND",
    "STRATEGIES",
    "TRAINING_STRATEGIES",
    "ConceptBottleneckModel",
    "TargetModelSpec",
    "TrainConfig",
    "TrainedCBM",
    "TrainingRun",
    "TrainingStrategy",
    "check_module_widths",
    "checkpoint_files",
    "fit",
    "load_cbm",
    "mlp",
    "mlp_sizes",
    "save_cbm",
    "stage_names",
    "train_cbm",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingStrategy:
    """How a strategy trains g and f: the bottleneck f reads (``"prob"`` or ``"logit"``), its stages in
    the order it fits them (named as in checkpoint files), and ``train(run) -> {history name: validation
    losses}``, which fits ``run.concept_model`` / ``run.target_model`` / ``run.model`` through
    :meth:`TrainingRun.fit_stage`."""

    bottleneck_kind: str
    stages: tuple[str, ...]
    train: Callable[[TrainingRun], dict[str, list[float]]]


#: The training strategies by name; one ``TRAINING_STRATEGIES.add(name, TrainingStrategy(...))`` line adds one.
TRAINING_STRATEGIES: Registry[TrainingStrategy] = Registry("training strategy")
#: The names of the registered strategies (the registry itself, so strategies added later count too).
STRATEGIES = TRAINING_STRATEGIES


@dataclass(kw_only=True)
class TrainConfig:
    """Training of a CBM on a :class:`ConceptDataset` with features."""

    strategy: str = "IND"
    concept_hidden: tuple[int, ...] = (100, 100)
    target_hidden: tuple[int, ...] = ()
    concept_loss_weight: float = 1.0  # lambda of the joint objective (JNT, JNT+P)
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown training strategy {self.strategy!r}; expected one of {list(STRATEGIES)}")
        self.concept_hidden = tuple(int(h) for h in self.concept_hidden)
        self.target_hidden = tuple(int(h) for h in self.target_hidden)
        for name in ("learning_rate", "batch_size", "max_epochs", "patience"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.concept_loss_weight < 0 or self.weight_decay < 0:
            raise ValueError("concept_loss_weight and weight_decay must be non-negative")


class ConceptBottleneckModel(nn.Module):
    """``x -> concept logits (g) -> bottleneck (logits or sigmoid) -> class logits (f)``."""

    def __init__(self, concept_model: nn.Module, target_model: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in ("prob", "logit"):
            raise ValueError(f"bottleneck kind must be 'prob' or 'logit', got {kind!r}")
        self.concept_model = concept_model
        self.target_model = target_model
        self.kind = kind

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.concept_model(x)
        return torch.sigmoid(logits) if self.kind == "prob" else logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(concept_logits, class_logits)``."""
        logits = self.concept_model(x)
        values = torch.sigmoid(logits) if self.kind == "prob" else logits
        return logits, self.target_model(values)


@dataclass
class TrainedCBM:
    """A trained CBM. ``target_spec`` is ``None`` when f is a custom module, ``concept_sizes`` (the
    layer sizes of the default MLP g) is ``None`` when g is; :func:`save_cbm` then derives the sizes
    when g is an MLP as :func:`mlp` builds it."""

    model: ConceptBottleneckModel
    config: TrainConfig
    target_spec: TargetModelSpec | None
    history: dict[str, list[float]] = field(default_factory=dict)
    concept_sizes: list[int] | None = None

    @torch.no_grad()
    def bottleneck(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model.bottleneck(torch.as_tensor(features, dtype=torch.float32))

    def concept_predictions(self, data: ConceptDataset, split: str = "test") -> ConceptPredictions:
        """The bottleneck on ``split`` as :class:`ConceptPredictions`, ready for intervention, with
        the training split's bottleneck as reference for the logit percentile replacement values."""
        return ConceptPredictions.from_dataset(
            data,
            split,
            values=self.bottleneck(data.split(split)["features"]),
            kind=self.model.kind,
            reference_values=self.bottleneck(data.split("train")["features"]),
        )


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


PROGRESS_SUFFIX = ".progress.pt"
#: Seconds between saves of a stage's progress file (and best checkpoint) during training.
PROGRESS_SECONDS = 1.0


def stage_names(strategy: str) -> tuple[str, ...]:
    """The training stages of ``strategy``, as named in checkpoint files (``<stage>.pt``)."""
    return TRAINING_STRATEGIES.get(strategy).stages


def checkpoint_files(strategy: str) -> list[str]:
    """Every file ``train_cbm(..., checkpoint_dir=)`` writes there for ``strategy`` (relative names)."""
    stages = stage_names(strategy)
    return [*(f"{s}.pt" for s in stages), *(f"{s}{PROGRESS_SUFFIX}" for s in stages), "cbm.pt"]


def _config_fingerprint(config: TrainConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


def fit(
    module: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    val_loss_fn: Callable[[], float],
    n_train: int,
    config: TrainConfig,
    *,
    name: str,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> list[float]:
    """Adam on mini-batches of ``range(n_train)``; stop after ``patience`` epochs without a better
    validation loss and restore the best weights. Returns the validation losses per epoch.

    With ``checkpoint_dir``, the best weights so far go to ``<name>.pt`` and the whole training
    state to ``<name>.progress.pt`` (both written atomically) after the first epoch, then at most
    every :data:`PROGRESS_SECONDS` and when the stage ends. With ``resume`` too, a progress file
    left there by an interrupted run of the same ``config`` is continued: the result is the one an
    uninterrupted run gives.
    """
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    best, best_state, since_best, history = float("inf"), copy.deepcopy(module.state_dict()), 0, []
    best_epoch: int | None = None
    start = 0
    progress = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{name}{PROGRESS_SUFFIX}"
    if resume and progress is not None and progress.is_file():
        state = _read_progress(progress, config)
        try:
            module.load_state_dict(state["module"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            best, best_state, best_epoch = float(state["best"]), state["best_state"], state["best_epoch"]
            since_best, history = int(state["since_best"]), [float(v) for v in state["history"]]
            start, done = int(state["epoch"]) + 1, bool(state["done"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CorruptFileError(progress, f"not a training state of this {name} ({exc})") from None
        log.info("%s: resuming after epoch %d from %s", name, start, progress)
        if done:
            module.load_state_dict(best_state)
            module.eval()
            return history
    saved_at, best_saved = -math.inf, best_epoch
    for epoch in range(start, config.max_epochs):
        module.train()
        for index in _batches(n_train, config.batch_size, generator):
            optimizer.zero_grad()
            loss_fn(index).backward()
            optimizer.step()
        module.eval()
        with torch.no_grad():
            val = float(val_loss_fn())
        history.append(val)
        stop = False
        if val < best - 1e-6:
            best, best_state, best_epoch, since_best = val, copy.deepcopy(module.state_dict()), epoch, 0
        else:
            since_best += 1
            stop = since_best >= config.patience
        done = stop or epoch == config.max_epochs - 1
        # Saving every epoch (two fsynced files) would cost more than a small epoch itself; an
        # interrupted run loses at most PROGRESS_SECONDS of training.
        if progress is not None and (done or time.monotonic() - saved_at >= PROGRESS_SECONDS):
            if best_epoch is not None and best_epoch != best_saved:
                save_torch_atomic(
                    {"state_dict": best_state, "epoch": best_epoch, "val_loss": best}, progress.with_name(f"{name}.pt")
                )
                best_saved = best_epoch
            # after the best checkpoint: a run killed in between redoes these epochs, identically
            save_torch_atomic(
                {
                    "format": "cbm-intervene-progress/1",
                    "config": _config_fingerprint(config),
                    "epoch": epoch,
                    "done": done,
                    "module": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "best": best,
                    "best_state": best_state,
                    "best_epoch": best_epoch,
                    "since_best": since_best,
                    "history": history,
                },
                progress,
            )
            saved_at = time.monotonic()
        if stop:
            break
    module.load_state_dict(best_state)
    log.info("%s: %d epochs, best validation loss %.4f", name, len(history), best)
    return history


@dataclass
class TrainingRun:
    """What a :class:`TrainingStrategy` trains: the CBM, its config, the splits as tensors
    ``(features, concepts, labels)``, and where stages keep their checkpoints."""

    model: ConceptBottleneckModel
    config: TrainConfig
    train_split: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    val_split: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    checkpoint_dir: str | Path | None = None
    resume: bool = False

    @property
    def concept_model(self) -> nn.Module:
        return self.model.concept_model

    @property
    def target_model(self) -> nn.Module:
        return self.model.target_model

    def fit_stage(
        self,
        module: nn.Module,
        loss: Callable[[torch.Tensor], torch.Tensor],
        val_loss: Callable[[], float],
        name: str,
    ) -> list[float]:
        """:func:`fit` ``module`` on ``loss(batch indices)`` with early stopping on ``val_loss()``;
        ``name`` is the stage's checkpoint name. Returns the validation losses per epoch."""
        n_train = len(self.train_split[2])
        return fit(
            module,
            loss,
            val_loss,
            n_train,
            self.config,
            name=name,
            checkpoint_dir=self.checkpoint_dir,
            resume=self.resume,
        )


def _train_concepts_then_target(run: TrainingRun, *, target_reads_true_concepts: bool) -> dict[str, list[float]]:
    """IND and SEQ: fit g on the concepts, then f on the true concepts (IND) or g's frozen logits (SEQ)."""
    (x_tr, c_tr, y_tr), (x_va, c_va, y_va) = run.train_split, run.val_split
    g, f = run.concept_model, run.target_model
    history = {
        "concept": run.fit_stage(
            g,
            lambda i: F.binary_cross_entropy_with_logits(g(x_tr[i]), c_tr[i]),
            lambda: F.binary_cross_entropy_with_logits(g(x_va), c_va).item(),
            "concept_model",
        )
    }
    g.eval()
    if target_reads_true_concepts:
        inputs_tr, inputs_va = c_tr, c_va
    else:
        with torch.no_grad():
            inputs_tr, inputs_va = g(x_tr), g(x_va)
    history["target"] = run.fit_stage(
        f,
        lambda i: F.cross_entropy(f(inputs_tr[i]), y_tr[i]),
        lambda: F.cross_entropy(f(inputs_va), y_va).item(),
        "target_model",
    )
    return history


def _train_independent(run: TrainingRun) -> dict[str, list[float]]:
    return _train_concepts_then_target(run, target_reads_true_concepts=True)


def _train_sequential(run: TrainingRun) -> dict[str, list[float]]:
    return _train_concepts_then_target(run, target_reads_true_concepts=False)


def _train_jointly(run: TrainingRun) -> dict[str, list[float]]:
    """JNT and JNT+P: g and f end to end on ``CE(f(bottleneck), y) + lambda * sum_k BCE(logit_k, c_k)``."""
    (x_tr, c_tr, y_tr), (x_va, c_va, y_va) = run.train_split, run.val_split
    lam = run.config.concept_loss_weight

    def joint_loss(x: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, out = run.model(x)
        # sum over concepts, mean over samples (Koh et al.'s lambda * sum_k L_Ck)
        concept_loss = F.binary_cross_entropy_with_logits(logits, c, reduction="none").sum(1).mean()
        return F.cross_entropy(out, y) + lam * concept_loss

    return {
        "joint": run.fit_stage(
            run.model,
            lambda i: joint_loss(x_tr[i], c_tr[i], y_tr[i]),
            lambda: joint_loss(x_va, c_va, y_va).item(),
            "joint_model",
        )
    }


_STAGED = ("concept_model", "target_model")
TRAINING_STRATEGIES.add("IND", TrainingStrategy("prob", _STAGED, _train_independent))
TRAINING_STRATEGIES.add("SEQ", TrainingStrategy("logit", _STAGED, _train_sequential))
TRAINING_STRATEGIES.add("JNT", TrainingStrategy("logit", ("joint_model",), _train_jointly))
TRAINING_STRATEGIES.add("JNT+P", TrainingStrategy("prob", ("joint_model",), _train_jointly))
#: Which bottleneck each built-in strategy feeds to f (any registered one: ``TRAINING_STRATEGIES.get(name).bottleneck_kind``).
BOTTLENECK_KIND = {name: TRAINING_STRATEGIES.get(name).bottleneck_kind for name in TRAINING_STRATEGIES}


def _read_progress(path: Path, config: TrainConfig) -> dict[str, Any]:
    state = load_torch(path, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != "cbm-intervene-progress/1":
        raise CorruptFileError(path, "not a cbm-intervene training progress file")
    if state.get("config") != _config_fingerprint(config):
        raise ValueError(
            f"training progress file {str(path)!r} belongs to another training config; "
            "delete it or train without resume"
        )
    return state


def train_cbm(
    data: ConceptDataset,
    config: TrainConfig,
    *,
    concept_model: nn.Module | None = None,
    target_model: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> TrainedCBM:
    """Train g and f on ``data`` (which needs features and train/val splits) with ``config.strategy``.

    ``checkpoint_dir``: where each stage's best weights, its progress file and the final
    ``cbm.pt`` go (see :func:`checkpoint_files`). ``resume``: continue from the progress files a
    run of the same data and ``config`` left there when it was interrupted (stages it finished are
    not trained again).

    ``concept_model``: your own g, any module mapping ``(B, D)`` features to ``(B, K)`` concept logits
    (default: an MLP with ``config.concept_hidden``). ``target_model``: your own f, any module mapping
    ``(B, K)`` bottlenecks to ``(B, M)`` class logits (default: linear or an MLP with
    ``config.target_hidden``). The modules passed in are trained in place and returned inside the
    :class:`TrainedCBM`.
    """
    if data.features is None:
        raise ValueError("train_cbm needs a data set with features; for image data sets plug in predictions instead")
    for split in ("train", "val"):
        if split not in data.splits or not len(data.splits[split]):
            raise ValueError(f"train_cbm needs a non-empty {split!r} split")
    torch.manual_seed(config.seed)
    train, val = data.split("train"), data.split("val")
    x_tr, c_tr, y_tr = (torch.as_tensor(train[k]) for k in ("features", "concepts", "labels"))
    x_va, c_va, y_va = (torch.as_tensor(val[k]) for k in ("features", "concepts", "labels"))
    n_features = data.features.shape[1]
    concept_sizes: list[int] | None = None
    if concept_model is None:
        concept_sizes = [n_features, *config.concept_hidden, data.n_concepts]
        g = mlp(concept_sizes)
    else:
        check_module_widths(
            concept_model,
            "concept_model",
            n_features,
            data.n_concepts,
            source=f"the data set has {n_features} features",
            outputs=f"{data.n_concepts} concept logits",
        )
        g = concept_model
    spec: TargetModelSpec | None = None
    if target_model is None:
        spec = TargetModelSpec(n_concepts=data.n_concepts, n_classes=data.n_classes, hidden=config.target_hidden)
        f = spec.build()
    else:
        check_module_widths(
            target_model,
            "target_model",
            data.n_concepts,
            data.n_classes,
            source=f"the data set has {data.n_concepts} concepts",
            outputs=f"{data.n_classes} class logits",
        )
        f = target_model
    strategy = TRAINING_STRATEGIES.get(config.strategy)
    model = ConceptBottleneckModel(g, f, strategy.bottleneck_kind)
    run = TrainingRun(
        model=model,
        config=config,
        train_split=(x_tr, c_tr, y_tr),
        val_split=(x_va, c_va, y_va),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    history = strategy.train(run)
    model.eval()
    trained = TrainedCBM(model=model, config=config, target_spec=spec, history=history, concept_sizes=concept_sizes)
    if checkpoint_dir is not None:
        save_cbm(trained, Path(checkpoint_dir) / "cbm.pt")
    return trained


def save_cbm(trained: TrainedCBM, path: str | Path) -> Path:
    """Save a trained CBM as state_dicts plus what rebuilds the package's own modules.

    A module the package built (the default MLP g, an f from a :class:`TargetModelSpec`) is rebuilt
    by :func:`load_cbm`; for a custom module only its weights and class name are stored, and
    :func:`load_cbm` needs an instance of the same architecture to fill.
    """
    path = Path(path)
    concept_sizes = trained.concept_sizes
    if concept_sizes is None:  # a TrainedCBM built by hand around the package's MLP g is rebuildable too
        concept_sizes = mlp_sizes(trained.model.concept_model)
    save_torch_atomic(
        {
            "format": "cbm-intervene-cbm/2",
            "config": asdict(trained.config),
            "target_spec": None if trained.target_spec is None else asdict(trained.target_spec),
            "concept_sizes": concept_sizes,
            "concept_model_class": type(trained.model.concept_model).__qualname__,
            "target_model_class": type(trained.model.target_model).__qualname__,
            "kind": trained.model.kind,
            "concept_state_dict": trained.model.concept_model.state_dict(),
            "target_state_dict": trained.model.target_model.state_dict(),
            "history": trained.history,
        },
        path,
    )
    return path


def _fill(module: nn.Module, state: dict[str, torch.Tensor], role: str, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the {role} passed does not match the saved weights: {exc}") from None


def load_cbm(
    path: str | Path, *, concept_model: nn.Module | None = None, target_model: nn.Module | None = None
) -> TrainedCBM:
    """Load a checkpoint written by :func:`save_cbm`.

    Modules the package built are rebuilt from the checkpoint. A custom g or f cannot be rebuilt
    from weights alone: pass a freshly constructed instance of the same class as ``concept_model``
    / ``target_model`` and it is filled with the saved weights (passing one for a package-built
    module works too, if its weights fit).
    """
    path = Path(path)
    # both formats hold only tensors, state_dicts and plain containers: no arbitrary unpickling needed
    blob = load_torch(path, map_location="cpu")
    try:
        spec = None if blob.get("target_spec") is None else TargetModelSpec(**blob["target_spec"])
        sizes = blob.get("concept_sizes")
        if "concept_state_dict" not in blob:  # first format: one state_dict of the whole CBM
            prefixes: dict[str, dict[str, torch.Tensor]] = {"concept_model.": {}, "target_model.": {}}
            for key, value in blob["state_dict"].items():
                for prefix, part in prefixes.items():
                    if key.startswith(prefix):
                        part[key[len(prefix) :]] = value
            concept_state, target_state = prefixes["concept_model."], prefixes["target_model."]
        else:
            concept_state, target_state = blob["concept_state_dict"], blob["target_state_dict"]
        kind, config, history = blob["kind"], TrainConfig(**blob["config"]), blob["history"]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # a file torch can read that is not a CBM checkpoint (another tool's, or edited by hand)
        raise CorruptFileError(path, f"not a cbm-intervene CBM checkpoint ({type(exc).__name__}: {exc})") from None
    if concept_model is None:
        if sizes is None:
            raise ValueError(
                f"{path} holds a custom concept model ({blob.get('concept_model_class')}); pass "
                "load_cbm(path, concept_model=<a new instance of that class>) to fill it with the saved weights"
            )
        concept_model = mlp(sizes)
    if target_model is None:
        if spec is None:
            raise ValueError(
                f"{path} holds a custom target model ({blob.get('target_model_class')}); pass "
                "load_cbm(path, target_model=<a new instance of that class>) to fill it with the saved weights"
            )
        target_model = spec.build()
    _fill(concept_model, concept_state, "concept_model", path)
    _fill(target_model, target_state, "target_model", path)
    model = ConceptBottleneckModel(concept_model, target_model, kind)
    model.eval()
    return TrainedCBM(
        model=model,
        config=config,
        target_spec=spec,
        history=history,
        concept_sizes=None if sizes is None else list(sizes),
    )
