"""Validated configs of the commands: a training run, a Hessian analysis, the width-sweep demo, a
sharded sweep over a grid of runs and its figures.

Every field can be set from a YAML/JSON file (``--config``) or ``--set key=value``; a bad value
raises ``ValueError`` naming the field and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from sam_overparam.registries import MODELS, OPTIMIZERS


def _check(checks: list[tuple[bool, str, object, str]]) -> None:
    for ok, name, value, expected in checks:
        if not ok:
            raise ValueError(f"{name}={value!r}: expected {expected}")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run. Defaults follow Shin et al.'s MNIST recipe, except 30 epochs.

    ``optimizer`` and ``model`` are names registered in :data:`sam_overparam.OPTIMIZERS` and
    :data:`sam_overparam.MODELS`.
    """

    dataset: Literal["mnist1d", "teacher"] = "mnist1d"
    num_train: int = 4000
    num_test: int = 4000
    data_seed: int = 42
    label_noise: float = 0.0  # fraction of training labels replaced (symmetric)
    teacher_width: int = 4

    model: str = "mlp"  # a name in MODELS: mlp, resnet, relu1d, ...
    widths: list[int] = field(default_factory=lambda: [300, 100])  # MLP hidden widths
    filters: int = 16  # ResNet first-stage channels
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    hidden: int = 100  # ReLUNet1D neurons
    sparsity: float = 0.0
    sparsity_method: Literal["random", "snip", "magnitude"] = "random"

    optimizer: str = "sam"  # a name in OPTIMIZERS: sgd, sam, asam, usam, ...
    rho: float = 0.05
    adaptive: bool = False
    unnormalized: bool = False
    m: int | None = None  # m-sharpness chunk size; None: one perturbation per batch
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_in_ascent: bool = False  # SAM only: decay as part of the loss (google-research/sam)
    batch_size: int = 128
    epochs: int = 30
    milestones: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1
    max_grad_norm: float | None = None
    seed: int = 0
    eval_every: int = 1

    def __post_init__(self) -> None:
        _check(
            [
                (self.num_train >= 1, "num_train", self.num_train, ">= 1"),
                (self.num_test >= 1, "num_test", self.num_test, ">= 1"),
                (0.0 <= self.label_noise <= 1.0, "label_noise", self.label_noise, "in [0, 1]"),
                (self.model in MODELS, "model", self.model, f"one of {', '.join(MODELS.names())}"),
                (0.0 <= self.sparsity < 1.0, "sparsity", self.sparsity, "in [0, 1)"),
                (self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS.names())}"),
                (self.rho >= 0, "rho", self.rho, ">= 0"),
                (self.lr > 0, "lr", self.lr, "> 0"),
                (0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)"),
                (self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0"),
                (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
                (self.epochs >= 1, "epochs", self.epochs, ">= 1"),
                (all(0 < f < 1 for f in self.milestones), "milestones", self.milestones, "fractions in (0, 1)"),
                (self.m is None or self.m >= 1, "m", self.m, ">= 1 or null"),
                (self.eval_every >= 1, "eval_every", self.eval_every, ">= 1"),
                (all(w >= 1 for w in self.widths), "widths", self.widths, "positive widths"),
            ]
        )
        if self.dataset == "teacher" and self.model != "relu1d":
            raise ValueError(f"model={self.model!r}: the teacher regression task needs model='relu1d'")
        if self.dataset == "teacher" and self.label_noise:
            raise ValueError("label_noise applies to classification (dataset='mnist1d') only")


@dataclass(kw_only=True)
class AnalysisConfig:
    """Settings of ``analyze``: how much data and how many probes (what identifies an analysis)."""

    num_examples: int = 512  # training examples used
    batch_size: int = 128  # batch size B of E_B[...]
    probes: int = 20  # Hutchinson probes
    lanczos_steps: int = 30
    density_probes: int = 2  # stochastic Lanczos quadrature probes
    seed: int = 0  # probe seed

    def __post_init__(self) -> None:
        _check(
            [
                (value >= 1, name, value, ">= 1")
                for name, value in (
                    ("num_examples", self.num_examples),
                    ("batch_size", self.batch_size),
                    ("probes", self.probes),
                    ("lanczos_steps", self.lanczos_steps),
                    ("density_probes", self.density_probes),
                )
            ]
        )


@dataclass(kw_only=True)
class DemoConfig:
    """The width sweep of ``demo``: MLPs ``[w, w // 3]``, SGD against SAM, ``seeds`` seeds each."""

    widths: list[int] = field(default_factory=lambda: [16, 64, 256, 1024])  # first hidden widths
    seeds: int = 3  # seeds per width
    epochs: int = 40
    num_train: int = 4000  # generated training examples
    num_test: int = 4000  # generated test examples
    rho: float = 0.05  # SAM radius
    label_noise: float = 0.0  # symmetric label noise

    def __post_init__(self) -> None:
        _check(
            [
                (bool(self.widths) and min(self.widths) >= 1, "widths", self.widths, "a non-empty list of widths >= 1"),
                (self.seeds >= 1, "seeds", self.seeds, ">= 1"),
                (self.epochs >= 1, "epochs", self.epochs, ">= 1"),
                (self.num_train >= 1, "num_train", self.num_train, ">= 1"),
                (self.num_test >= 1, "num_test", self.num_test, ">= 1"),
                (self.rho >= 0, "rho", self.rho, ">= 0"),
                (0 <= self.label_noise <= 1, "label_noise", self.label_noise, "in [0, 1]"),
            ]
        )


@dataclass(kw_only=True)
class SweepConfig:
    """A grid of training runs: every combination of the lists below becomes one :class:`TrainConfig`.

    ``models`` are the families ``mlp`` (hidden widths ``[w, w // 3]``) and ``resnet`` (``w``
    first-stage filters). ``rhos`` apply to SAM-type optimizers; an optimizer that is not a
    :class:`~sam_overparam.optim.SAM` (``sgd``) runs once per cell, with ``rho=0``. With
    ``param_budgets`` the width axis is the budgets instead of ``widths``: for each sparsity the width
    whose effective parameter count is closest to the budget (:func:`~sam_overparam.budget.width_for_budget`).
    ``train`` holds the :class:`TrainConfig` fields shared by every run (``epochs``, ``num_train`` ...).
    """

    models: list[str] = field(default_factory=lambda: ["mlp"])
    widths: list[int] = field(default_factory=lambda: [16, 64, 256])
    param_budgets: list[int] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "sam"])
    rhos: list[float] = field(default_factory=lambda: [0.05])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    label_noise: list[float] = field(default_factory=lambda: [0.0])
    sparsity: list[float] = field(default_factory=lambda: [0.0])
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def listed(values: list[Any]) -> bool:
            return bool(values) and len(set(map(str, values))) == len(values)

        _check(
            [
                (listed(self.models) and all(m in ("mlp", "resnet") for m in self.models), "models", self.models,
                 "a non-empty list of distinct families from mlp, resnet"),
                (listed(self.widths) and min(self.widths) >= 1, "widths", self.widths, "distinct widths >= 1"),
                (not self.param_budgets or (listed(self.param_budgets) and min(self.param_budgets) >= 1),
                 "param_budgets", self.param_budgets, "distinct parameter counts >= 1, or []"),
                (listed(self.optimizers) and all(o in OPTIMIZERS for o in self.optimizers), "optimizers",
                 self.optimizers, f"a non-empty list of distinct names from {', '.join(OPTIMIZERS.names())}"),
                (listed(self.rhos) and min(self.rhos) >= 0, "rhos", self.rhos, "distinct values >= 0"),
                (listed(self.seeds), "seeds", self.seeds, "a non-empty list of distinct seeds"),
                (listed(self.label_noise) and all(0 <= v <= 1 for v in self.label_noise), "label_noise",
                 self.label_noise, "distinct fractions in [0, 1]"),
                (listed(self.sparsity) and all(0 <= v < 1 for v in self.sparsity), "sparsity", self.sparsity,
                 "distinct fractions in [0, 1)"),
            ]
        )  # fmt: skip
        varied = {"model", "widths", "filters", "optimizer", "rho", "seed", "label_noise", "sparsity"}
        clashing = sorted(varied & set(self.train))
        if clashing:
            raise ValueError(f"train sets {', '.join(clashing)}, which the grid varies; use the grid's lists")
        unknown = sorted(set(self.train) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise ValueError(f"train has unknown TrainConfig field(s) {', '.join(unknown)}")


@dataclass(kw_only=True)
class PlotConfig:
    """What ``plot`` draws from a sweep's store: each optimizer's gain over ``baseline``, paired by seed."""

    baseline: str = "sgd"  # the optimizer every other one is compared with
    metric: Literal["best_test", "final_test"] = "best_test"  # best over epochs (the paper) or last epoch

    def __post_init__(self) -> None:
        _check([(bool(self.baseline), "baseline", self.baseline, "an optimizer name")])


# ``demo --quick``: a seconds-long smoke run (applied under --config, the flags and --set)
QUICK_DEMO = {"widths": [8, 64], "seeds": 2, "epochs": 3, "num_train": 500, "num_test": 500}
