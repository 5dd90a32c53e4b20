"""Two small findings of Shin et al. (arXiv 2311.17539) at CPU scale, resumable run by run.

* ``toy``: the 1-D toy of their Sec. 4 (claim 2 of the spec): a one-hidden-layer ReLU net with 10
  and with 100 neurons fitted to a few points by full-batch GD and by full-batch SAM; the learned
  functions, their top Hessian eigenvalue and the total variation of their slope (how many and how
  sharp the kinks are).
* ``convergence``: their Sec. 5 linear-convergence result for stochastic unnormalised SAM (USAM)
  under interpolation: teacher-student regression (a student at least as wide as the teacher can
  fit exactly), log training loss against steps for several student widths.

Each finished run is one JSON file under ``OUT/runs/``; a rerun trains only the missing ones and
then draws the figure. Entry point: ``python -m sam_overparam.findings {toy,convergence} OUT --plot PNG``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from sam_overparam.data import batches, teacher_student_regression
from sam_overparam.hessian import HessianOperator, top_eigenvalue_lanczos
from sam_overparam.models import ReLUNet1D
from sam_overparam.optim import SAM
from shin_common import import_pyplot, load_json
from shin_common.files import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["convergence_run", "main", "toy_run"]

TOY_WIDTHS = (10, 100)
TOY_STEPS = 10000
TOY_LR = 0.05
TOY_RHO = 0.05
TOY_POINTS = 8
CONV_WIDTHS = (8, 32, 128, 512)
CONV_STEPS = 4000
CONV_LR = 0.1
CONV_RHO = 0.05
CONV_BATCH = 16
CONV_TRAIN = 128
CONV_EVERY = 50
SEEDS = (0, 1, 2, 3, 4)


def _mse(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _optimizer(model: torch.nn.Module, method: str, lr: float, rho: float, *, unnormalized: bool = False):
    if method in ("gd", "sgd"):
        return torch.optim.SGD(model.parameters(), lr=lr)
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, unnormalized=unnormalized, model=model)


def _train_step(model, opt, batch) -> None:
    def closure():
        loss = _mse(model, batch)
        loss.backward()
        return loss

    if isinstance(opt, SAM):
        opt.step(closure)
    else:
        opt.zero_grad()
        closure()
        opt.step()


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    """``TOY_POINTS`` evenly spaced inputs on [-1, 1], targets of a fixed 4-neuron ReLU teacher."""
    _, teacher = teacher_student_regression(num_train=1, num_test=1, teacher_width=4, seed=0, dtype=torch.float64)
    x = torch.linspace(-1, 1, TOY_POINTS, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        return x, teacher(x)


def toy_run(width: int, method: str, seed: int) -> dict[str, Any]:
    """Full-batch GD or SAM (rho ``TOY_RHO``) on the toy points; the function on a grid and its sharpness."""
    x, y = toy_data()
    torch.manual_seed(seed)
    model = ReLUNet1D(width).double()
    opt = _optimizer(model, method, TOY_LR, TOY_RHO)
    for _ in range(TOY_STEPS):
        _train_step(model, opt, (x, y))
    grid = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        values = model(grid)
        train_loss = float(_mse(model, (x, y)))
    slope = torch.diff(values) / torch.diff(grid.squeeze(-1))
    operator = HessianOperator(model, _mse, [(x, y)])
    top = top_eigenvalue_lanczos(operator.matvec, operator.dim, steps=min(operator.dim, 60), seed=seed)
    return {
        "width": width, "method": method, "seed": seed, "train_loss": train_loss,
        "lambda_max": float(top[0]), "slope_total_variation": float(torch.diff(slope).abs().sum()),
        "grid": grid.squeeze(-1).tolist(), "values": values.tolist(),
    }  # fmt: skip


def convergence_run(width: int, method: str, seed: int) -> dict[str, Any]:
    """Minibatch SGD or USAM on teacher-student regression; full training loss every ``CONV_EVERY`` steps."""
    split, _ = teacher_student_regression(
        num_train=CONV_TRAIN, num_test=1, teacher_width=4, in_features=2, seed=0, dtype=torch.float64
    )
    torch.manual_seed(seed)
    model = ReLUNet1D(width, in_features=2).double()
    opt = _optimizer(model, method, CONV_LR, CONV_RHO, unnormalized=True)
    generator = torch.Generator().manual_seed(seed)
    steps, losses, step = [], [], 0
    while step <= CONV_STEPS:
        for batch in batches(split.x_train, split.y_train, CONV_BATCH, shuffle=True, generator=generator):
            if step % CONV_EVERY == 0:
                with torch.no_grad():
                    steps.append(step)
                    losses.append(float(_mse(model, (split.x_train, split.y_train))))
            if step == CONV_STEPS:
                break
            _train_step(model, opt, batch)
            step += 1
        else:
            continue
        break
    return {"width": width, "method": method, "seed": seed, "steps": steps, "losses": losses}


def _runs(out: Path, kind: str, widths: Sequence[int], methods: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    run = toy_run if kind == "toy" else convergence_run
    records = []
    for width in widths:
        for method in methods:
            for seed in seeds:
                path = out / "runs" / f"{kind}-w{width}-{method}-s{seed}.json"
                if not path.exists():  # resumable: each finished run is one file
                    log.info("training %s width %d %s seed %d", kind, width, method, seed)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_text_atomic(path, json.dumps(run(width, method, seed)))
                records.append(load_json(path))
    return records


def _style(method: str) -> dict[str, Any]:
    return {"gd": {"color": "tab:blue", "linestyle": "-"}, "sgd": {"color": "tab:blue", "linestyle": "-"}}.get(
        method, {"color": "tab:orange", "linestyle": "--"}
    )


def plot_toy(plt: Any, records: list[dict], path: Path) -> None:
    x, y = toy_data()
    fig, axes = plt.subplots(1, len(TOY_WIDTHS), figsize=(9, 3.4), sharey=True)
    for ax, width in zip(axes, TOY_WIDTHS, strict=True):
        for method in ("gd", "sam"):
            rows = [r for r in records if r["width"] == width and r["method"] == method]
            for i, r in enumerate(rows):
                label = f"{method.upper()} (lambda_max {sum(q['lambda_max'] for q in rows) / len(rows):.2f})"
                ax.plot(r["grid"], r["values"], lw=1.2, alpha=0.8, label=label if i == 0 else None, **_style(method))
        ax.scatter(x.squeeze(-1), y, color="black", zorder=3, s=18, label="training points")
        ax.set_title(f"{width} hidden ReLU neurons", fontsize=9)
        ax.set_xlabel("x")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("f(x)")
    fig.suptitle(f"1-D toy: full-batch GD vs SAM (rho {TOY_RHO:g}, lr {TOY_LR:g}, {TOY_STEPS} steps), "
                 f"one line per seed {list(SEEDS)}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(plt: Any, records: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    styles = ["-", "--", "-.", ":", "-"]
    for ax, method in zip(axes, ("sgd", "sam"), strict=True):
        for i, width in enumerate(CONV_WIDTHS):
            rows = [r for r in records if r["width"] == width and r["method"] == method]
            if not rows:
                continue
            steps = rows[0]["steps"]
            logs = torch.tensor([[math.log10(max(v, 1e-300)) for v in r["losses"]] for r in rows])
            ax.fill_between(steps, logs.min(0).values, logs.max(0).values, color=colours[i], alpha=0.2)
            ax.plot(steps, logs.mean(0), color=colours[i], linestyle=styles[i], label=f"width {width}")
        ax.set_title("SGD" if method == "sgd" else f"USAM (rho {CONV_RHO:g})", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("log10 training MSE")
    fig.suptitle(f"Teacher-student regression ({CONV_TRAIN} points, teacher width 4), batch {CONV_BATCH}, "
                 f"lr {CONV_LR:g}; mean and min-max over seeds {list(SEEDS)}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(kind: str, records: list[dict]) -> list[dict]:
    """Per width and method: the numbers the findings page quotes (means over seeds)."""
    rows = []
    widths = TOY_WIDTHS if kind == "toy" else CONV_WIDTHS
    methods = ("gd", "sam") if kind == "toy" else ("sgd", "sam")
    for width in widths:
        for method in methods:
            rs = [r for r in records if r["width"] == width and r["method"] == method]
            if not rs:
                continue
            if kind == "toy":
                keys = ("train_loss", "lambda_max", "slope_total_variation")
                row = {k: [round(r[k], 6) for r in rs] for k in keys}
            else:
                row = {"final_loss": [r["losses"][-1] for r in rs], "loss_at_2000": [r["losses"][40] for r in rs]}
            rows.append({"width": width, "method": method, "seeds": [r["seed"] for r in rs], **row})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam_overparam.findings", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("toy", "convergence"))
    parser.add_argument("out", type=Path, help="directory of the per-run JSON files (reused on a rerun)")
    parser.add_argument("--plot", type=Path, help="PNG to draw once every run is there")
    parser.add_argument("--widths", type=int, nargs="*", help="only these widths (a partial, resumable chunk)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    all_widths = TOY_WIDTHS if args.kind == "toy" else CONV_WIDTHS
    widths = args.widths or all_widths
    methods = ("gd", "sam") if args.kind == "toy" else ("sgd", "sam")
    records = _runs(args.out, args.kind, widths, methods, SEEDS)
    print(json.dumps(summary(args.kind, records), indent=1))
    if args.plot is not None and set(widths) >= set(all_widths):
        plt = import_pyplot()
        if plt is None:
            raise SystemExit("matplotlib is not installed (extra 'plot'); cannot draw --plot")
        (plot_toy if args.kind == "toy" else plot_convergence)(plt, records, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
