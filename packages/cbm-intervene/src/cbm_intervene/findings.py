"""Resumable runner for the findings page (docs/results/cbm-intervene.md): the paper's comparisons on
synthetic data, one CBM per seed trained with the authors' recipe.

  python -m cbm_intervene.findings run --output-dir runs/findings --seeds 0 1 2 3 4 --budget-seconds 300
  python -m cbm_intervene.findings report --output-dir runs/findings --figures docs/results

``run`` does the missing units only: a unit is one trained model (``models/seed<N>/predictions.pt``)
or one intervention curve (criterion x level x ordering x seed), appended to ``curves.jsonl`` as soon
as it finishes, so a killed run loses at most the unit in progress; ``--budget-seconds`` stops
between units, and the same command continues. ``report`` reads ``curves.jsonl`` and writes the
figures and the tables (ratios to RAND at 10/20/40 concepts per sample, cost break-even of the
look-ahead criteria, adaptive vs static).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shin_common import JsonlStore, import_pyplot
from shin_common.files import write_text_atomic

log = logging.getLogger(__name__)

CRITERIA = ("RAND", "UCP", "LCP", "CCTP", "ECTP", "EUDTP")
LEVELS = ("I+S", "G+S", "I+B", "G+B")
BUDGETS = (10, 20, 40)
ADAPTIVE_LEVELS = ("I+S", "G+S")
COST_TARGET = 0.10


@dataclass(kw_only=True)
class FindingsConfig:
    """The experiment: synthetic data at ``noise_std`` (0.75 starts near the paper's 41% error), an IND
    CBM per seed (data and training seed alike) with the authors' recipe capped at ``max_epochs``."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    noise_std: float = 0.75
    strategy: str = "IND"
    max_epochs: int = 150
    lr_step: int = 75
    orderings: list[str] = field(default_factory=lambda: ["static", "adaptive"])
    levels: list[str] = field(default_factory=lambda: list(LEVELS))
    #: replacement values of revealed logits (engine ``replacement``): the authors' "percentile", and
    #: "sign_median" for finding D
    replacements: list[str] = field(default_factory=lambda: ["percentile"])

    #: keys that only choose which units to run (a store may hold units of several such choices)
    UNIT_CHOICES = ("seeds", "orderings", "levels", "replacements")

    def data(self, seed: int) -> Any:
        from cbm_intervene.data.synthetic import SyntheticConfig

        return SyntheticConfig(noise_std=self.noise_std, seed=seed)

    def train(self, seed: int) -> Any:
        from cbm_intervene.models import TrainConfig

        return TrainConfig(
            recipe="authors", strategy=self.strategy, max_epochs=self.max_epochs, lr_step=self.lr_step, seed=seed
        )


def _model(config: FindingsConfig, seed: int, out: Path) -> tuple[Any, Any]:
    """The trained CBM's test predictions and f for ``seed``, trained (and saved) only if missing."""
    from cbm_intervene.data.predictions import load_predictions, save_predictions
    from cbm_intervene.data.synthetic import make_synthetic
    from cbm_intervene.experiments import model_metrics
    from cbm_intervene.models import train_cbm

    path = out / "models" / f"seed{seed}" / "predictions.pt"
    if not path.is_file():
        data = make_synthetic(config.data(seed))
        start = time.perf_counter()
        trained = train_cbm(data, config.train(seed), checkpoint_dir=path.parent, resume=True)
        save_predictions(
            path,
            trained.concept_predictions(data, "test"),
            target_model=trained.model.target_model,
            target_spec=trained.target_spec,
        )
        metrics = model_metrics(trained, data) | {"train_seconds": time.perf_counter() - start}
        write_text_atomic(path.parent / "model.json", json.dumps(metrics, indent=1))
        log.info("seed %d: trained, %s", seed, metrics)
    return load_predictions(path)


def run(config: FindingsConfig, out: Path, budget_seconds: float) -> bool:
    """Compute the missing units until done or out of budget; True when every unit is done."""
    import torch

    from cbm_intervene.intervention import CostModel, InterventionConfig, run_intervention

    torch.set_num_threads(2)
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", json.dumps(asdict(config), indent=1))
    store = JsonlStore(out / "curves.jsonl")
    # static units of every seed first (findings A, B, C), then adaptive ones (F): a short budget
    # finishes the cheap comparisons before the costly re-scoring
    units = [
        (ordering, seed, level, criterion, replacement)
        for ordering in config.orderings
        for replacement in config.replacements
        for seed in config.seeds
        for level in config.levels
        for criterion in CRITERIA
        if ordering == "static" or level in ADAPTIVE_LEVELS
    ]
    for ordering, seed, level, criterion, replacement in units:
        if ordering == "adaptive" and criterion == "RAND":
            continue  # RAND's order does not depend on the state: adaptive is static
        key = {"seed": seed, "ordering": ordering, "level": level, "criterion": criterion}
        if replacement != "percentile":  # the authors' default is left out of the key
            key["replacement"] = replacement
        if store.is_complete(key):
            continue
        if time.perf_counter() - start > budget_seconds:
            return False
        predictions, target = _model(config, seed, out)
        settings = InterventionConfig(
            criterion=criterion,
            level=level,
            ordering=ordering,
            costs=CostModel(concept=1.0, group=1.0, forward_pass=0.0),
            allow_oracle=True,
            replacement=replacement,
            seed=seed,
            # re-scoring costs K passes of f per step: adaptive runs stop at the last budget
            max_steps=None if ordering == "static" else max(BUDGETS),
        )
        curve = run_intervention(predictions, target, settings)
        store.append(key, {"curve": curve.to_dict()})
        log.info("%s: error %.3f -> %.3f", key, curve.error[0], curve.error[-1])
    return True


# ------------------------------------------------------------------------------------------ report


def _curves(out: Path) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for record in JsonlStore(out / "curves.jsonl").records():
        key = record["config"]
        replacement = key.get("replacement", "percentile")
        name = key["criterion"] if replacement == "percentile" else f"{key['criterion']} [{replacement}]"
        grouped.setdefault((key["ordering"], key["level"], name), []).append(record["curve"])
    return grouped


def error_at(curve: dict[str, Any], concepts: float) -> float:
    """Error after ``concepts`` concepts per sample, linearly interpolated along the curve."""
    return float(np.interp(concepts, curve["concepts_per_sample"], curve["error"]))


def concepts_to_reach(curve: dict[str, Any], error: float) -> float:
    """Concepts per sample at which the curve first reaches ``error`` (inf if never)."""
    errors, xs = np.asarray(curve["error"]), np.asarray(curve["concepts_per_sample"])
    hits = np.flatnonzero(errors <= error)
    return float(xs[hits[0]]) if hits.size else float("inf")


def passes_to_reach(curve: dict[str, Any], error: float) -> float:
    """Passes of f per sample spent until the curve first reaches ``error`` (all of them if never)."""
    errors, passes = np.asarray(curve["error"]), np.asarray(curve["forward_passes_per_sample"])
    hits = np.flatnonzero(errors <= error)
    return float(passes[hits[0]] if hits.size else passes[-1])


def _mean_band(curves: list[dict[str, Any]], x: str, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([np.interp(grid, c[x], c["error"]) for c in curves])
    return values.mean(0), values.std(0)


def _figure(panels: list[tuple[str, dict[str, list[dict[str, Any]]]]], x: str, xlabel: str, path: Path, title: str):
    from cbm_intervene.plots import series_styles

    plt = import_pyplot()
    names = list(dict.fromkeys(name for _, series in panels for name in series))
    styles = series_styles(names)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (panel_title, series) in zip(axes[0], panels, strict=True):
        for name, curves in series.items():
            top = min(max(c[x]) for c in curves) if curves else 0
            grid = np.linspace(0, top, 101)
            mean, std = _mean_band(curves, x, grid)
            ax.plot(grid, mean, label=f"{name} (n={len(curves)})", lw=1.4, **styles[name])
            ax.fill_between(grid, mean - std, mean + std, color=styles[name]["color"], alpha=0.15, lw=0)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("task error (mean, band: +/- std over seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _with_cost(curve: dict[str, Any], tau_f: float, group_level: bool, tau_g: float) -> dict[str, Any]:
    """The curve with ``cost`` = expert cost (tau_i = 1 per concept, tau_g per group) + tau_f per pass of f."""
    expert = np.asarray(curve["units_per_sample"]) * tau_g if group_level else np.asarray(curve["concepts_per_sample"])
    return curve | {"cost": (expert + tau_f * np.asarray(curve["forward_passes_per_sample"])).tolist()}


def first_picks(out: Path, top: int) -> list[str]:
    """Why a criterion helps little early: how many of the first ``top`` concepts it asks each sample were
    predicted wrongly (probability on the wrong side of 0.5), and their mean probability, against the
    base rate. Scores are recomputed here from their definitions for a linear f on a probability
    bottleneck (UCP ``1/|p-0.5|``; CCTP ``p * sum_j |W_ji|``), independently of the criteria's code."""
    import torch

    from cbm_intervene.data.predictions import load_predictions

    rows = ["| seed | base rate of wrong concepts | wrong among UCP's first | CCTP's first | mean p of CCTP's first |"]
    rows.append("|---|---|---|---|---|")
    for path in sorted((out / "models").glob("seed*/predictions.pt")):
        predictions, target = load_predictions(path)
        values, c = torch.as_tensor(predictions.values), torch.as_tensor(predictions.true_concepts)
        p = values if predictions.kind == "prob" else torch.sigmoid(values)
        wrong = ((p > 0.5).float() != c).float()
        weight = next(m for m in target.modules() if isinstance(m, torch.nn.Linear)).weight.detach()
        scores = {"UCP": 1 / (p - 0.5).abs().clamp(min=1e-12), "CCTP": p * weight.abs().sum(0)}
        picked = {name: score.topk(top, dim=1).indices for name, score in scores.items()}
        rate = {name: wrong.gather(1, index).mean().item() for name, index in picked.items()}
        mean_p = p.gather(1, picked["CCTP"]).mean().item()
        rows.append(
            f"| {path.parent.name} | {wrong.mean().item():.3f} | {rate['UCP']:.3f} | {rate['CCTP']:.3f} | {mean_p:.3f} |"
        )
    return [f"First {top} concepts asked per sample (I+S, static):", "", *rows]


def report_strategy(out: Path, figures: Path, strategy: str, prefix: str = "cbm-intervene") -> str:
    """Finding D for one training strategy: the criteria at I+S (figure and table of A, first picks)."""
    grouped = _curves(out)
    _figure(
        [("level I+S", {c: grouped.get(("static", "I+S", c), []) for c in CRITERIA})],
        "concepts_per_sample",
        "concepts revealed per sample",
        figures / f"{prefix}-D-{strategy.replace('+', 'P')}.png",
        f"D: {strategy} CBM, authors' recipe, I+S",
    )
    rand = grouped.get(("static", "I+S", "RAND"), [])
    lines = [
        "| criterion | error at 0 | at 10 | at 20 | at 40 | RAND / crit. at 10 | at 20 | at 40 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for criterion in CRITERIA:
        curves = grouped.get(("static", "I+S", criterion), [])
        if not curves or not rand:
            continue
        at = {b: np.mean([error_at(c, b) for c in curves]) for b in BUDGETS}
        rand_at = {b: np.mean([error_at(c, b) for c in rand]) for b in BUDGETS}
        ratios = [f"{rand_at[b] / at[b]:.1f}" if at[b] > 0 else "inf" for b in BUDGETS]
        start = np.mean([c["error"][0] for c in curves])
        cells = [f"{at[b]:.3f}" for b in BUDGETS]
        lines.append(f"| {criterion} (n={len(curves)}) | {start:.3f} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    lines += ["", *first_picks(out, top=10)]
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "report.md", text)
    return text


D_CRITERIA = ("RAND", "UCP", "CCTP", "ECTP", "EUDTP")
E_CRITERIA = ("RAND", "UCP", "ECTP")
E_POLICIES = ("keep", "nullify", "skip")


def hide_concepts(predictions: Any, rate: float, seed: int) -> Any:
    """``predictions`` with each (sample, concept) marked not visible with probability ``rate``, drawn
    with ``seed``: synthetic data has no not-visible concepts, so finding E makes some at a known rate."""
    import dataclasses

    import torch

    # a NumPy stream apart from torch's: RAND draws its order from torch.Generator(seed), and hiding
    # with the same uniforms would make RAND ask every visible concept first
    hidden = torch.as_tensor(np.random.default_rng((seed, 7)).random(tuple(predictions.values.shape)) < rate)
    return dataclasses.replace(predictions, visibility=~hidden)


def run_not_visible(models: Path, out: Path, seeds: Sequence[int], rate: float, budget_seconds: float) -> bool:
    """Finding E (not-visible concepts): the IND models of ``models`` (a finished ``run`` store) with
    concepts hidden at ``rate``, revealed under each not-visible policy; resumable like ``run``."""
    import torch

    from cbm_intervene.data.predictions import load_predictions
    from cbm_intervene.intervention import InterventionConfig, run_intervention

    torch.set_num_threads(2)
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    store = JsonlStore(out / "curves.jsonl")
    for seed in seeds:
        for policy in E_POLICIES:
            for criterion in E_CRITERIA:
                key = {"seed": seed, "rate": rate, "not_visible": policy, "criterion": criterion}
                if store.is_complete(key):
                    continue
                if time.perf_counter() - start > budget_seconds:
                    return False
                predictions, target = load_predictions(models / "models" / f"seed{seed}" / "predictions.pt")
                settings = InterventionConfig(criterion=criterion, not_visible=policy, seed=seed)
                curve = run_intervention(hide_concepts(predictions, rate, seed), target, settings)
                store.append(key, {"curve": curve.to_dict()})
    return True


def report_not_visible(out: Path, figures: Path, prefix: str = "cbm-intervene") -> str:
    """Figure and table of finding E (not-visible concepts): error by policy and criterion."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in JsonlStore(out / "curves.jsonl").records():
        key = record["config"]
        grouped.setdefault((key["not_visible"], key["criterion"]), []).append(record["curve"])
    panels = [(crit, {pol: grouped.get((pol, crit), []) for pol in E_POLICIES}) for crit in E_CRITERIA]
    _figure(
        panels,
        "concepts_per_sample",
        "concepts asked per sample",
        figures / f"{prefix}-E-not-visible.png",
        "E: revealing not-visible concepts (IND, I+S): keep / nullify / skip",
    )
    lines = ["| criterion | policy | error at 0 | at 10 | at 20 | at 40 | end |", "|---|---|---|---|---|---|---|"]
    for crit in E_CRITERIA:
        for pol in E_POLICIES:
            runs = grouped.get((pol, crit), [])
            if not runs:
                continue
            cells = " | ".join(f"{np.mean([error_at(c, b) for c in runs]):.3f}" for b in (0, *BUDGETS))
            end = np.mean([c["error"][-1] for c in runs])
            lines.append(f"| {crit} | {pol} (n={len(runs)}) | {cells} | {end:.3f} |")
    return "\n".join(lines) + "\n"


def report_compare(stores: dict[str, Path], figures: Path, prefix: str = "cbm-intervene") -> str:
    """Finding D over stores (one per training strategy): I+S, static order, the practical criteria
    with the authors' percentile replacement (top row) and, where run, the sign-median one (bottom)."""
    grouped = {name: _curves(out) for name, out in stores.items()}
    panels = []
    for suffix in ("", " [sign_median]"):
        for name, curves in grouped.items():
            series = {c: curves.get(("static", "I+S", c + suffix), []) for c in D_CRITERIA}
            same = suffix and all(
                [r["error"] for r in runs] == [r["error"] for r in curves.get(("static", "I+S", c), [])]
                for c, runs in series.items()
            )
            if any(series.values()) and not same:  # a probability bottleneck has no logits to replace
                panels.append((f"{name}, {'sign median' if suffix else 'percentile'} replacement", series))
    _figure(
        panels,
        "concepts_per_sample",
        "concepts revealed per sample",
        figures / f"{prefix}-D-strategies.png",
        "D: training strategies, I+S, static order",
    )
    lines = [
        "| strategy | replacement | criterion | error at 0 | at 10 | at 20 | at 40 | all revealed | RAND / crit. at 20 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, curves in grouped.items():
        for suffix in ("", " [sign_median]"):
            rand = curves.get(("static", "I+S", "RAND" + suffix), [])
            if not rand:
                continue
            rand20 = np.mean([error_at(c, 20) for c in rand])
            for criterion in D_CRITERIA:
                runs = curves.get(("static", "I+S", criterion + suffix), [])
                if not runs:
                    continue
                at = [np.mean([error_at(c, b) for c in runs]) for b in BUDGETS]
                sd = [np.std([error_at(c, b) for c in runs]) for b in BUDGETS]
                cells = " | ".join(f"{m:.3f} +/- {d:.3f}" for m, d in zip(at, sd, strict=True))
                start, end = np.mean([c["error"][0] for c in runs]), np.mean([c["error"][-1] for c in runs])
                ratio = f"{rand20 / at[1]:.2f}" if at[1] > 0 else "inf"
                replacement = suffix.strip(" []") or "percentile"
                lines.append(
                    f"| {name} | {replacement} | {criterion} (n={len(runs)}) | {start:.3f} | {cells} | {end:.3f} | {ratio} |"
                )
    text = "\n".join(lines) + "\n"
    return text


def report(out: Path, figures: Path, prefix: str = "cbm-intervene") -> str:
    """Figures for findings A, B, C, F and the markdown tables (returned and written to ``report.md``)."""
    grouped = _curves(out)
    lines: list[str] = []
    # A: informed criteria vs RAND per level (static)
    panels = [(f"level {lv}", {c: grouped.get(("static", lv, c), []) for c in CRITERIA}) for lv in LEVELS]
    _figure(
        panels,
        "concepts_per_sample",
        "concepts revealed per sample",
        figures / f"{prefix}-A-criteria.png",
        "A: criteria vs RAND (IND CBM, authors' recipe, static order)",
    )
    lines.append("| level | criterion | error at 0 | at 10 | at 20 | at 40 | RAND / crit. at 10 | at 20 | at 40 |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for level in LEVELS:
        rand = grouped.get(("static", level, "RAND"), [])
        if not rand:
            continue
        rand_at = {b: np.mean([error_at(c, b) for c in rand]) for b in BUDGETS}
        for criterion in CRITERIA:
            curves = grouped.get(("static", level, criterion), [])
            if not curves:
                continue
            at = {b: np.mean([error_at(c, b) for c in curves]) for b in BUDGETS}
            sd = {b: np.std([error_at(c, b) for c in curves]) for b in BUDGETS}
            start = np.mean([c["error"][0] for c in curves])
            ratios = [f"{rand_at[b] / at[b]:.1f}" if at[b] > 0 else "inf" for b in BUDGETS]
            cells = [f"{at[b]:.3f} +/- {sd[b]:.3f}" for b in BUDGETS]
            lines.append(
                f"| {level} | {criterion} (n={len(curves)}) | {start:.3f} | {' | '.join(cells)} | {' | '.join(ratios)} |"
            )
    # B: levels, per criterion
    panels = [(crit, {lv: grouped.get(("static", lv, crit), []) for lv in LEVELS}) for crit in ("RAND", "UCP", "ECTP")]
    _figure(
        panels,
        "concepts_per_sample",
        "concepts revealed per sample",
        figures / f"{prefix}-B-levels.png",
        "B: levels (individual/group x single/batch), static order",
    )
    # C: cost. The look-ahead criteria buy fewer expert answers with passes of f; at a target error the
    # break-even tau_f (tau_i = 1) is (concepts UCP needs - concepts X needs) / passes X ran to get there.
    lines.append("")
    lines.append(f"I+S, target error {COST_TARGET}: concepts per sample needed and passes of f spent (mean over seeds)")
    lines.append("")
    lines.append(
        "| criterion | concepts needed | passes of f per sample | break-even tau_f against UCP | against RAND |"
    )
    lines.append("|---|---|---|---|---|")
    need = {
        crit: [
            (concepts_to_reach(c, COST_TARGET), passes_to_reach(c, COST_TARGET))
            for c in grouped.get(("static", "I+S", crit), [])
        ]
        for crit in CRITERIA
    }
    for crit in ("RAND", "UCP", "CCTP", "ECTP", "EUDTP"):
        if not need[crit]:
            continue
        concepts = np.mean([n for n, _ in need[crit]])
        passes = np.mean([p for _, p in need[crit]])
        even = []
        for ref in ("UCP", "RAND"):
            pairs = list(zip(need[ref], need[crit], strict=False))
            if crit == ref or not pairs or passes == 0:
                even.append("-")
                continue
            values = [(r[0] - x[0]) / x[1] for r, x in pairs if x[1] > 0]
            even.append(f"{np.mean(values):.3g}")
        lines.append(f"| {crit} | {concepts:.1f} | {passes:.0f} | {even[0]} | {even[1]} |")
    for tau_f in (0.0, 0.05):
        panels = []
        for level in ("I+S", "G+S"):
            series = {
                c: [_with_cost(x, tau_f, level.startswith("G"), 2.0) for x in grouped.get(("static", level, c), [])]
                for c in CRITERIA
            }
            panels.append((f"{level}, tau_f={tau_f}", series))
        _figure(
            panels,
            "cost",
            "cost per sample (tau_i=1, tau_g=2)",
            figures / f"{prefix}-C-cost-tau{tau_f:g}.png",
            f"C: error against cost, tau_f={tau_f} per pass of f",
        )
    # F: adaptive vs static
    panels = []
    for level in ("I+S", "G+S"):
        series = {}
        for crit in ("UCP", "CCTP", "ECTP", "EUDTP"):
            for ordering in ("static", "adaptive"):
                series[f"{crit} {ordering}"] = grouped.get((ordering, level, crit), [])
        panels.append((f"level {level}", series))
    _figure(
        panels,
        "concepts_per_sample",
        "concepts revealed per sample",
        figures / f"{prefix}-F-adaptive.png",
        "F: adaptive re-scoring vs static order",
    )
    lines.append("")
    lines.append("| level | criterion | static at 10 | adaptive at 10 | static at 20 | adaptive at 20 |")
    lines.append("|---|---|---|---|---|---|")
    for level in LEVELS:
        for crit in ("UCP", "CCTP", "ECTP", "EUDTP"):
            s, a = grouped.get(("static", level, crit), []), grouped.get(("adaptive", level, crit), [])
            if not s or not a:
                continue
            cells = [f"{np.mean([error_at(c, b) for c in x]):.3f}" for b in (10, 20) for x in (s, a)]
            lines.append(f"| {level} | {crit} (n={len(s)}/{len(a)}) | {' | '.join(cells)} |")
    lines.append("")
    lines.extend(first_picks(out, top=10))
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "report.md", text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbm_intervene.findings", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="compute the missing units (resumable)")
    run_p.add_argument("--output-dir", required=True)
    run_p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    run_p.add_argument("--noise-std", type=float, default=0.75)
    run_p.add_argument("--max-epochs", type=int, default=150)
    run_p.add_argument("--strategy", default="IND", help="training strategy of the CBMs (default: IND)")
    run_p.add_argument("--levels", nargs="+", default=list(LEVELS), help="levels to run (default: all)")
    run_p.add_argument("--orderings", nargs="+", default=["static", "adaptive"], help="orderings to run")
    run_p.add_argument(
        "--replacements",
        nargs="+",
        default=["percentile"],
        help="replacement values of revealed logits to run: percentile (the authors') and/or sign_median",
    )
    run_p.add_argument("--budget-seconds", type=float, default=float("inf"), help="stop between units after this")
    nv = sub.add_parser("not-visible", help="finding E: hide concepts of a finished store's models (resumable)")
    nv.add_argument("--models", required=True, help="a finished run store (its models/seed<N>/ are used)")
    nv.add_argument("--output-dir", required=True)
    nv.add_argument("--figures", help="also write the figure and print the table")
    nv.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    nv.add_argument("--rate", type=float, default=0.2, help="probability a concept is not visible (default 0.2)")
    nv.add_argument("--budget-seconds", type=float, default=float("inf"))
    rep = sub.add_parser("report", help="figures and tables from the finished units")
    rep.add_argument("--output-dir", required=True)
    rep.add_argument("--figures", required=True)
    rep.add_argument("--strategy", help="finding D: the I+S report of a store run with this --strategy")
    rep.add_argument(
        "--compare",
        nargs="+",
        metavar="NAME=DIR",
        help="finding D: one figure and table over stores (e.g. IND=runs/findings SEQ=runs/findings-SEQ)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.output_dir)
    if args.command == "run":
        config = FindingsConfig(
            seeds=args.seeds,
            noise_std=args.noise_std,
            max_epochs=args.max_epochs,
            strategy=args.strategy.upper(),
            levels=[lv.upper() for lv in args.levels],
            orderings=[o.lower() for o in args.orderings],
            replacements=[r.lower() for r in args.replacements],
        )
        saved = out / "config.json"
        fixed = {k: v for k, v in asdict(config).items() if k not in FindingsConfig.UNIT_CHOICES}
        if saved.is_file() and {
            k: v for k, v in json.loads(saved.read_text()).items() if k not in FindingsConfig.UNIT_CHOICES
        } != {k: v for k, v in fixed.items()}:
            raise SystemExit(f"{out} holds units of another config ({saved}); use another --output-dir")
        done = run(config, out, args.budget_seconds)
        print("all units done" if done else "budget spent; run the same command again to continue")
        return 0
    if args.command == "not-visible":
        if not 0 <= args.rate < 1:
            raise SystemExit(f"--rate {args.rate}: expected a probability in [0, 1)")
        done = run_not_visible(Path(args.models), out, args.seeds, args.rate, args.budget_seconds)
        if args.figures:
            print(report_not_visible(out, Path(args.figures)))
        print("all units done" if done else "budget spent; run the same command again to continue")
        return 0
    if args.compare:
        stores = dict(item.split("=", 1) for item in args.compare)
        print(report_compare({name: Path(path) for name, path in stores.items()}, Path(args.figures)))
    elif args.strategy:
        print(report_strategy(out, Path(args.figures), args.strategy.upper()))
    else:
        print(report(out, Path(args.figures)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
