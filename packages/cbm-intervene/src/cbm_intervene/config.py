"""The settings of the three commands, as validated dataclasses: ``--config FILE`` and ``--set key=value``
address their fields (see ``cbm-intervene COMMAND --help`` for every key and its default).

The library configs they are made of live beside their code: :class:`~cbm_intervene.data.SyntheticConfig`,
:class:`~cbm_intervene.models.TrainConfig`, :class:`~cbm_intervene.intervention.InterventionConfig`.
Range errors name the command-line flag of the key (``--n-samples 0 is out of range ...``), the
spelling most users type; the key itself is the flag without dashes, with ``_`` for ``-``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cbm_intervene.data.synthetic import SyntheticConfig
from cbm_intervene.intervention import LEVELS, CostModel, InterventionConfig, get_criterion
from cbm_intervene.models import STRATEGIES, TrainConfig

#: The criteria of Shin et al. (2023, Table 1) that ``intervene`` and ``demo`` evaluate by default
#: (``intervene`` leaves the oracle LCP out unless ``allow_oracle`` is set).
PAPER_CRITERIA = ("RAND", "UCP", "LCP", "CCTP", "ECTP", "EUDTP")


def oracle_criteria(names: Any) -> list[str]:
    """The criteria among ``names`` that read the true concepts (``needs_true_concepts``)."""
    return [name for name in names if get_criterion(name).needs_true_concepts]


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
TRUE_CONCEPTS = ("class", "instance")


def check_range(flag: str, values: Any, ok: Callable[[float], bool], expected: str) -> None:
    """Refuse a number outside its range in one line naming the flag, the value and the range.

    NaN and infinities are refused everywhere: no setting of this tool means anything with them.
    """
    for value in values if isinstance(values, list | tuple) else [values]:
        if value is None:
            continue
        if not (math.isfinite(value) and ok(value)):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise ValueError(f"{flag} {shown} is out of range; expected {expected}")


def check_seeds(flag: str, seeds: Any) -> None:
    check_range(flag, seeds, lambda s: 0 <= s <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")


def check_target_error(target_error: float | None) -> None:
    check_range("--target-error", target_error, lambda e: 0.0 <= e <= 1.0, "an error rate in [0, 1]")


@dataclass(kw_only=True)
class TrainRunConfig:
    """``train`` command: synthetic data (``data.*``) and CBM training (``train.*``)."""

    data: SyntheticConfig = field(default_factory=SyntheticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(kw_only=True)
class InterveneRunConfig:
    """``intervene`` command: criteria x levels on saved predictions, averaged over files and seeds.

    ``predictions``: .pt/.npz files with a target model (one per model seed). ``true_concepts``:
    which labels intervention reveals (``class`` or ``instance``). ``levels``: empty for every level
    the predictions support. ``metric``: ``None`` for the metric the predictions declare (else
    ``error``). ``tau_i``/``tau_g``/``tau_f``: costs per revealed concept, revealed group and pass of
    f. ``budgets``: concepts per sample to report the error at; ``target_error``: report the
    concepts needed to reach it. ``criteria``: ``None`` for the paper's (Table 1), the oracle LCP
    among them only with ``allow_oracle``; a criterion that reads the true concepts is refused
    without ``allow_oracle``. The other keys are those of :class:`InterventionConfig`.
    """

    predictions: list[str] = field(default_factory=list)
    true_concepts: str = "class"
    criteria: list[str] | None = None
    allow_oracle: bool = False
    levels: list[str] = field(default_factory=list)
    ordering: str = "static"
    group_score: str = "mean"
    conceptualization: str = "soft"
    n_samples: int = 16
    not_visible: str = "keep"
    replacement_source: str = "train"
    replacement: str = "percentile"
    metric: str | None = None
    max_steps: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tau_i: float = 1.0
    tau_g: float = 1.0
    tau_f: float = 0.0
    budgets: list[float] = field(default_factory=lambda: [5.0, 10.0, 20.0])
    target_error: float | None = None
    plot: bool = True

    def __post_init__(self) -> None:
        if not self.predictions:
            raise ValueError("no predictions files: pass --predictions FILE ... (or the key predictions)")
        if self.true_concepts not in TRUE_CONCEPTS:
            raise ValueError(f"--true-concepts {self.true_concepts!r}: expected one of {list(TRUE_CONCEPTS)}")
        check_range("--n-samples", self.n_samples, lambda n: n >= 1, "an integer >= 1")
        check_range("--max-steps", self.max_steps, lambda n: n >= 0, "an integer >= 0 (or leave it out for all steps)")
        check_seeds("--seeds", self.seeds)
        for flag, value in (("--tau-i", self.tau_i), ("--tau-g", self.tau_g), ("--tau-f", self.tau_f)):
            check_range(flag, value, lambda c: c >= 0, "a cost >= 0")
        check_range("--budgets", self.budgets, lambda b: b >= 0, "numbers of concepts per sample >= 0")
        check_target_error(self.target_error)
        if self.criteria is None:
            self.criteria = [c for c in PAPER_CRITERIA if self.allow_oracle or c not in oracle_criteria(PAPER_CRITERIA)]
        self.criteria = [get_criterion(name).name for name in self.criteria]
        if not self.allow_oracle and (oracles := oracle_criteria(self.criteria)):
            raise ValueError(
                f"--criteria {' '.join(oracles)} reads the true concepts (an oracle reference, not a practical "
                "criterion); pass --allow-oracle (key allow_oracle) to run it"
            )
        self.levels = [level.upper() for level in self.levels]
        for level in self.levels:
            if level not in LEVELS:
                raise ValueError(f"--levels {level!r}: expected some of {list(LEVELS)}")
        self.budgets = [float(b) for b in self.budgets]
        # every choice (ordering, group score, ...) checked and normalised as the engine will see it
        settings = self.intervention(self.metric or "error")
        for name in (
            "ordering",
            "group_score",
            "conceptualization",
            "not_visible",
            "replacement_source",
            "replacement",
        ):
            setattr(self, name, getattr(settings, name))
        if self.metric is not None:
            self.metric = settings.metric

    def intervention(self, metric: str) -> InterventionConfig:
        """The intervention settings shared by every cell of the grid; ``metric`` already resolved
        (the key, the predictions' metadata or the default). Criterion and level vary per cell."""
        return InterventionConfig(
            criterion="RAND",
            ordering=self.ordering,
            group_score=self.group_score,
            conceptualization=self.conceptualization,
            n_samples=self.n_samples,
            not_visible=self.not_visible,
            replacement_source=self.replacement_source,
            replacement=self.replacement,
            metric=metric,
            max_steps=self.max_steps,
            costs=CostModel(concept=self.tau_i, group=self.tau_g, forward_pass=self.tau_f),
            allow_oracle=self.allow_oracle,
        )


@dataclass(kw_only=True)
class DemoConfig:
    """``demo`` command: synthetic data, one CBM per training strategy, every paper criterion at every level.

    ``noise_std``: input noise (the paper generator's default 2.0 is much harder). ``seeds``: seeds
    of the random criteria; ``seed``: data and training seed. ``quick``: a tiny configuration that
    runs in seconds (for smoke tests).
    """

    strategies: list[str] = field(default_factory=lambda: ["IND", "SEQ", "JNT"])
    noise_std: float = 1.0
    ordering: str = "static"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed: int = 0
    target_error: float | None = 0.05
    quick: bool = False
    plot: bool = True

    def __post_init__(self) -> None:
        check_range("--noise-std", self.noise_std, lambda s: s >= 0, "a standard deviation >= 0")
        check_seeds("--seeds", self.seeds)
        check_seeds("--seed", self.seed)
        check_target_error(self.target_error)
        self.strategies = list(dict.fromkeys(s.upper() for s in self.strategies))
        for strategy in self.strategies:
            if strategy not in STRATEGIES:
                raise ValueError(f"--strategies {strategy!r}: expected some of {list(STRATEGIES)}")
        self.ordering = self.intervention().ordering

    def intervention(self) -> InterventionConfig:
        """The demo's intervention settings: a group costs twice a concept, a pass of f 1% of one. The
        demo reproduces the paper's table, whose LCP column is the oracle reference: it is allowed
        here and labelled as the oracle in the summary (``gap_to_reference``)."""
        return InterventionConfig(
            criterion="RAND",
            ordering=self.ordering,
            costs=CostModel(concept=1.0, group=2.0, forward_pass=0.01),
            allow_oracle=True,
        )

    def data_config(self) -> SyntheticConfig:
        if self.quick:
            return SyntheticConfig(
                n_concepts=24,
                n_features=24,
                n_classes=20,
                n_groups=10,
                samples_per_class=30,
                noise_std=self.noise_std,
                seed=self.seed,
            )
        return SyntheticConfig(noise_std=self.noise_std, seed=self.seed)

    def train_configs(self) -> dict[str, TrainConfig]:
        settings: dict[str, Any] = (
            {"concept_hidden": (32,), "max_epochs": 15, "patience": 3}
            if self.quick
            else {"max_epochs": 200, "patience": 10}
        )
        return {s: TrainConfig(strategy=s, seed=self.seed, **settings) for s in self.strategies}
