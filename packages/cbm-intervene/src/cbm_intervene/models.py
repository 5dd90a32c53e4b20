"""Concept bottleneck models and the four training strategies of Koh et al. (ICML 2020).

A CBM predicts concepts ``c_hat = g(x)`` and the target ``y = f(c_hat)``. Strategies, as compared
by Shin et al. (ICML 2023, Sec. 4.3):

- IND: g and f trained independently; f on the *true* concepts, fed predicted probabilities at test.
- SEQ: g first, then f on g's predicted (frozen) logits.
- JNT: end to end with ``CE(f(logits), y) + lambda * sum_k BCE(logit_k, c_k)``.
- JNT+P: joint, but f reads the sigmoid probabilities (a probability bottleneck).

Each stage stops early on its validation loss (or accuracy: ``TrainConfig.select_best_by``, set by the
authors' recipe, ``TrainConfig(recipe="authors")``) and keeps the best weights; with ``checkpoint_dir``
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
    "RECIPES",
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
    "concept_imbalance_weights",
    "concept_loss",
    "fit",
    "joint_loss",
    "learning_rate_at",
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


#: Training recipes by name: the value each gives to the keys of :class:`TrainConfig` left unset (None).
#: ``package``: Adam, unweighted BCE, early stopping on the validation loss (small and fast on CPUs).
#: ``authors``: the recipe of the authors' training script (``ssbin4/Closer-Intervention-CBM``,
#: ``SYNTHETIC/train.py``, on Koh et al.'s CBM code): SGD with momentum 0.9 and weight decay 5e-5,
#: StepLR (x0.1 every ``lr_step`` epochs, no further decay below 1e-4), each concept's BCE weighted by
#: its imbalance (negatives / positives on the training split), the joint loss divided by
#: ``1 + lambda * K``, batches of 64, the checkpoint best by validation *accuracy* kept, training stopped
#: 100 epochs after the last improvement. Their README leaves the learning rate and the StepLR step
#: as variables; 0.01 and 1000 epochs here are Koh et al.'s CUB values (so no decay within 1000 epochs).
RECIPES: dict[str, dict[str, Any]] = {
    "package": {
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "batch_size": 256,
        "max_epochs": 100,
        "patience": 10,
        "lr_step": 0,
        "lr_gamma": 0.1,
        "min_learning_rate": 0.0,
        "weighted_concept_loss": False,
        "normalize_joint_loss": False,
        "select_best_by": "val_loss",
    },
    "authors": {
        "optimizer": "sgd",
        "learning_rate": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-5,
        "batch_size": 64,
        "max_epochs": 1000,
        "patience": 100,
        "lr_step": 1000,
        "lr_gamma": 0.1,
        "min_learning_rate": 1e-4,
        "weighted_concept_loss": True,
        "normalize_joint_loss": True,
        "select_best_by": "val_accuracy",
    },
}
OPTIMIZERS = ("adam", "sgd")
SELECTIONS = ("val_loss", "val_accuracy")


@dataclass(kw_only=True)
class TrainConfig:
    """Training of a CBM on a :class:`ConceptDataset` with features.

    ``recipe`` (``package`` or ``authors``, see :data:`RECIPES`) gives every key left at None its value;
    a key you set wins over the recipe (``TrainConfig(recipe="authors", max_epochs=200)``). ``optimizer``:
    ``adam`` or ``sgd`` (with ``momentum``). ``lr_step``: epochs between x``lr_gamma`` decays of the
    learning rate (0: constant), never below ``min_learning_rate``. ``weighted_concept_loss``: weigh each
    concept's BCE by negatives / positives on the training split. ``normalize_joint_loss``: divide the
    joint loss by ``1 + concept_loss_weight * K``. ``select_best_by``: ``val_loss`` (lowest) or
    ``val_accuracy`` (highest; concept accuracy for g alone, class accuracy otherwise) picks the epoch
    whose weights are kept, and ``patience`` counts epochs without improving it.
    """

    strategy: str = "IND"
    recipe: str = "package"
    concept_hidden: tuple[int, ...] = (100, 100)
    target_hidden: tuple[int, ...] = ()
    concept_loss_weight: float = 1.0  # lambda of the joint objective (JNT, JNT+P)
    optimizer: str | None = None
    learning_rate: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    max_epochs: int | None = None
    patience: int | None = None
    lr_step: int | None = None
    lr_gamma: float | None = None
    min_learning_rate: float | None = None
    weighted_concept_loss: bool | None = None
    normalize_joint_loss: bool | None = None
    select_best_by: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown training strategy {self.strategy!r}; expected one of {list(STRATEGIES)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe {self.recipe!r} is not known; expected one of {list(RECIPES)}")
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.concept_hidden = tuple(int(h) for h in self.concept_hidden)
        self.target_hidden = tuple(int(h) for h in self.target_hidden)
        for name in ("learning_rate", "batch_size", "max_epochs", "patience"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.concept_loss_weight < 0 or self.weight_decay < 0:
            raise ValueError("concept_loss_weight and weight_decay must be non-negative")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not offered; expected one of {list(OPTIMIZERS)}")
        if self.select_best_by not in SELECTIONS:
            raise ValueError(f"select_best_by {self.select_best_by!r}: expected one of {list(SELECTIONS)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum {self.momentum} is out of range; expected a value in [0, 1)")
        if self.lr_step < 0:
            raise ValueError(f"lr_step {self.lr_step} is out of range; expected epochs >= 0 (0: constant rate)")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma {self.lr_gamma} is out of range; expected a factor in (0, 1]")
        if self.min_learning_rate < 0:
            raise ValueError(f"min_learning_rate {self.min_learning_rate} is out of range; expected a rate >= 0")


def learning_rate_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based): StepLR's ``lr * gamma ** (epoch // lr_step)``, held once
    it would fall below ``min_learning_rate`` (the authors stop stepping StepLR at ``MIN_LR``)."""
    if config.lr_step == 0 or config.lr_gamma == 1:
        return config.learning_rate
    decays = epoch // config.lr_step
    if config.min_learning_rate > 0:
        # decays before the floor; the small tolerance keeps log(1e-4 / 1e-2) / log(0.1) at 2, not 1.999...
        floor = math.log(config.min_learning_rate / config.learning_rate) / math.log(config.lr_gamma)
        decays = min(decays, max(0, math.floor(floor + 1e-9)))
    return config.learning_rate * config.lr_gamma**decays


def concept_imbalance_weights(concepts: torch.Tensor) -> torch.Tensor:
    """Per concept, negatives / positives among ``concepts`` (N, K): the weight of its BCE in the authors'
    recipe (Koh et al.'s ``find_class_imbalance``); a concept never present gets 1, as theirs does."""
    positives = concepts.sum(0)
    negatives = concepts.shape[0] - positives
    return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))


def concept_loss(logits: torch.Tensor, concepts: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """g's training loss: the mean over concepts of each concept's BCE (mean over samples), weighted by
    ``weights`` (K,) when given (the authors' X->C stage divides the weighted sum by K)."""
    per_concept = F.binary_cross_entropy_with_logits(logits, concepts, reduction="none").mean(0)
    return (per_concept if weights is None else weights * per_concept).mean()


def joint_loss(
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    concept_logits: torch.Tensor,
    concepts: torch.Tensor,
    concept_loss_weight: float,
    *,
    weights: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """``CE + lambda * sum_k w_k BCE_k`` (Koh et al.'s joint objective; mean over samples), divided by
    ``1 + lambda * K`` when ``normalize`` (the authors' ``-normalize_loss``)."""
    per_concept = F.binary_cross_entropy_with_logits(concept_logits, concepts, reduction="none").mean(0)
    if weights is not None:
        per_concept = weights * per_concept
    total = F.cross_entropy(class_logits, labels) + concept_loss_weight * per_concept.sum()
    return total / (1 + concept_loss_weight * concepts.shape[1]) if normalize else total


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
    val_accuracy: Callable[[], float] | None = None,
) -> list[float]:
    """``config.optimizer`` on mini-batches of ``range(n_train)`` at :func:`learning_rate_at` each epoch;
    stop after ``patience`` epochs without a better validation loss (or, with ``select_best_by=
    "val_accuracy"``, a higher ``val_accuracy()``; ties keep the earlier epoch, as the authors' strict
    comparison) and restore the best weights. Returns the validation losses per epoch.

    With ``checkpoint_dir``, the best weights so far go to ``<name>.pt`` and the whole training
    state to ``<name>.progress.pt`` (both written atomically) after the first epoch, then at most
    every :data:`PROGRESS_SECONDS` and when the stage ends. With ``resume`` too, a progress file
    left there by an interrupted run of the same ``config`` is continued: the result is the one an
    uninterrupted run gives.
    """
    by_accuracy = config.select_best_by == "val_accuracy"
    if by_accuracy and val_accuracy is None:
        raise ValueError(f"select_best_by 'val_accuracy' needs a val_accuracy function for stage {name!r}")
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _optimizer(module, config)
    # the best value is kept as a loss: the negated accuracy when selecting by accuracy
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
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(config, epoch)
        module.train()
        for index in _batches(n_train, config.batch_size, generator):
            optimizer.zero_grad()
            loss_fn(index).backward()
            optimizer.step()
        module.eval()
        with torch.no_grad():
            val = float(val_loss_fn())
            monitored = -float(val_accuracy()) if by_accuracy else val
        history.append(val)
        stop = False
        if monitored < best - (0.0 if by_accuracy else 1e-6):
            best, best_state, best_epoch, since_best = monitored, copy.deepcopy(module.state_dict()), epoch, 0
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
    log.info(
        "%s: %d epochs, best validation %s %.4f (epoch %s)",
        name,
        len(history),
        "accuracy" if by_accuracy else "loss",
        -best if by_accuracy else best,
        best_epoch,
    )
    return history


def _optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            module.parameters(), lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


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
    #: per-concept BCE weights (negatives / positives on the training split) when the config asks for them
    concept_weights: torch.Tensor | None = None

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
        val_accuracy: Callable[[], float] | None = None,
    ) -> list[float]:
        """:func:`fit` ``module`` on ``loss(batch indices)`` with early stopping on ``val_loss()`` (or on
        ``val_accuracy()`` when the config selects by accuracy); ``name`` is the stage's checkpoint name.
        Returns the validation losses per epoch."""
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
            val_accuracy=val_accuracy,
        )


def _class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def _concept_accuracy(logits: torch.Tensor, concepts: torch.Tensor) -> float:
    return ((logits > 0).float() == concepts).float().mean().item()


def _train_concepts_then_target(run: TrainingRun, *, target_reads_true_concepts: bool) -> dict[str, list[float]]:
    """IND and SEQ: fit g on the concepts, then f on the true concepts (IND) or g's frozen logits (SEQ)."""
    (x_tr, c_tr, y_tr), (x_va, c_va, y_va) = run.train_split, run.val_split
    g, f, weights = run.concept_model, run.target_model, run.concept_weights
    history = {
        "concept": run.fit_stage(
            g,
            lambda i: concept_loss(g(x_tr[i]), c_tr[i], weights),
            lambda: concept_loss(g(x_va), c_va, weights).item(),
            "concept_model",
            val_accuracy=lambda: _concept_accuracy(g(x_va), c_va),
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
        val_accuracy=lambda: _class_accuracy(f(inputs_va), y_va),
    )
    return history


def _train_independent(run: TrainingRun) -> dict[str, list[float]]:
    return _train_concepts_then_target(run, target_reads_true_concepts=True)


def _train_sequential(run: TrainingRun) -> dict[str, list[float]]:
    return _train_concepts_then_target(run, target_reads_true_concepts=False)


def _train_jointly(run: TrainingRun) -> dict[str, list[float]]:
    """JNT and JNT+P: g and f end to end on ``CE(f(bottleneck), y) + lambda * sum_k BCE(logit_k, c_k)``
    (each BCE weighted and the sum normalised by ``1 + lambda * K`` as the config says)."""
    (x_tr, c_tr, y_tr), (x_va, c_va, y_va) = run.train_split, run.val_split
    config = run.config

    def loss(x: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, out = run.model(x)
        return joint_loss(
            out,
            y,
            logits,
            c,
            config.concept_loss_weight,
            weights=run.concept_weights,
            normalize=config.normalize_joint_loss,
        )

    return {
        "joint": run.fit_stage(
            run.model,
            lambda i: loss(x_tr[i], c_tr[i], y_tr[i]),
            lambda: loss(x_va, c_va, y_va).item(),
            "joint_model",
            val_accuracy=lambda: _class_accuracy(run.model(x_va)[1], y_va),
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
        concept_weights=concept_imbalance_weights(c_tr) if config.weighted_concept_loss else None,
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
