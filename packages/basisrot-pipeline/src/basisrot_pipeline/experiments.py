"""Demos and paper experiments built on :func:`basisrot_pipeline.train.run_emulated`.

``demo``: an 8-stage asynchronous 1F1B pipeline (emulated) trained once with AdamW and once with
basis rotation on the offline standard-library bytes, with the two loss curves plotted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from basisrot_pipeline.model import ModelConfig
from basisrot_pipeline.optim.factory import OptimConfig
from basisrot_pipeline.plots import plot_loss_curves
from basisrot_pipeline.resume import open_run
from basisrot_pipeline.train import RECORD, TrainConfig, resume_config, run_emulated
from shin_common import CorruptFileError, import_pyplot, load_json

DEMO_OPTIMIZERS = ("adamw", "basis-rotation")
DEMO_STEPS = 1000


@dataclass(kw_only=True)
class DemoConfig:
    """The demo's settings (``demo --set key=value``), applied to both trainings' TrainConfig.

    ``n_layer``, ``n_embd``, ``n_head``, ``block_size`` set ``model.*``, ``lr`` sets ``optim.lr`` (warm-up:
    the first 5% of the steps); the others set the TrainConfig key of the same name.

    The defaults are the demo's P = 8 pipeline, one layer per stage, d = 64, on stdlib bytes;
    ``TrainConfig`` validates every value (for both trainings) when the config is made.
    """

    steps: int = DEMO_STEPS
    stages: int = 8
    # the model's keys the demo varies, flat (the rest of ModelConfig keeps its defaults)
    n_layer: int = 8
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    threads: int = 1
    eval_batches: int = 8
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        # TrainConfig validates every key (steps >= 1, stages <= model.n_layer, threads, ...) for both runs
        for optimizer in DEMO_OPTIMIZERS:
            demo_config(optimizer, self)


def demo_config(optimizer: str, config: DemoConfig) -> TrainConfig:
    """The demo's run of ``optimizer`` under ``config``; warm-up over the first 5% of the steps."""
    return TrainConfig(
        stages=config.stages,
        model=ModelConfig(
            n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, block_size=config.block_size
        ),
        batch_size=config.batch_size,
        steps=config.steps,
        seed=config.seed,
        threads=config.threads,
        optim=OptimConfig(name=optimizer, lr=config.lr, warmup_steps=max(1, config.steps // 20)),
        checkpoint_every=config.checkpoint_every,
        eval_batches=config.eval_batches,
    )


def demo_title(config: TrainConfig) -> str:
    """What the demo's plot shows: model, data, pipeline schedule and number of stages."""
    model = config.model
    return (
        f"GPT {model.n_layer} layers, d={model.n_embd}, on {config.data} bytes\n"
        f"{config.schedule} pipeline, P={config.stages} stages ({config.runtime}), {config.steps} minibatches"
    )


def _report(name: str, metrics: dict[str, Any]) -> None:
    print(
        f"{name:>15}: final train loss {metrics['final_train_loss']:.3f}  "
        f"val loss {metrics['val_loss']:.3f}  ({metrics['seconds']:.0f} s)"
    )


def run_demo(
    output_dir: str | Path, config: DemoConfig | None = None, *, steps: int | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Train AdamW and basis rotation (P=8, emulated) in ``output_dir``; returns the summary in results.json.

    ``config`` defaults to ``DemoConfig()``; ``steps``, when given, replaces its ``steps``. The
    recorded config is the two trainings' TrainConfigs (as before the demo had a config of its own),
    so a demo directory of the default settings resumes and reports as it did.

    One run directory: ``adamw/`` and ``basis-rotation/`` hold the two trainings (each resumes from
    its checkpoint, and a finished one is kept), ``results.json`` finishes it. A rerun of a finished
    demo prints its summary without training.
    """
    config = DemoConfig() if config is None else config
    if steps is not None:
        config = replace(config, steps=steps)  # validated again by __post_init__
    configs = {name: demo_config(name, config) for name in DEMO_OPTIMIZERS}  # refuses bad values before any file
    run = open_run(
        output_dir,
        config={name: resume_config(config) for name, config in configs.items()},
        command="demo",
        overwrite=overwrite,
    )
    if run.finished:
        record = run.results()
        if record is None or not isinstance(record.get("metrics"), dict):
            raise CorruptFileError(run.path / RECORD, "the demo is marked finished but its summary is missing")
        print(f"{run.path} holds a finished demo with these settings (pass --overwrite to run it again):")
        for name in DEMO_OPTIMIZERS:
            _report(name, record["metrics"][name])
        return record["metrics"]
    plt = import_pyplot()  # checked before the training: the plot is the last step
    if plt is None:
        print("matplotlib not installed (pip install 'basisrot-pipeline[plot]'): no plot will be written")
    run.begin()
    results = {}
    start = time.perf_counter()
    for optimizer, config in configs.items():
        finished = run.path / optimizer / RECORD  # an interrupted demo keeps the training it finished
        metrics = load_json(finished)["metrics"] if finished.is_file() else run_emulated(config, run, f"{optimizer}/")
        results[optimizer] = metrics
        _report(optimizer, metrics)
    summary: dict[str, Any] = {
        name: {k: m[k] for k in ("final_train_loss", "val_loss", "seconds", "delays")} for name, m in results.items()
    }
    summary["wall_seconds"] = time.perf_counter() - start
    if plt is not None:
        plot = run.file("loss_curves.png")
        plot_loss_curves(plt, results, plot, title=demo_title(configs[DEMO_OPTIMIZERS[0]]))
        print(f"plot: {plot}")
    run.finish(metrics=summary, config=run.config, seed=config.seed)
    return summary
