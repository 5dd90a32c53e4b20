"""Training runs in output directories (the toolkit's run contract) and reading them back.

``train_in_directory`` is what ``sam-overparam train`` does: check the directory before any work,
report a finished run of the same config, resume an unfinished one from its per-epoch checkpoint,
and write ``config.json``, ``model.pt`` and ``results.json``. ``finished_train_run`` opens such a
directory for ``analyze``, trusting only what the run's manifest recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sam_overparam.config import TrainConfig
from sam_overparam.train import TOOL, train
from shin_common import (
    CorruptFileError,
    RunDirectory,
    config_differences,
    config_to_dict,
    load_config,
    load_json,
    load_torch,
    save_torch_atomic,
    write_json_atomic,
)
from shin_common.rundir import MANIFEST_NAME

__all__ = [
    "CHECKPOINT_NAME",
    "CONFIG_NAME",
    "MODEL_NAME",
    "Outcome",
    "finished_results",
    "finished_train_run",
    "load_model_weights",
    "train_in_directory",
]

CONFIG_NAME = "config.json"
MODEL_NAME = "model.pt"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class Outcome:
    """What a command produced: its metrics, where they are, and whether they were only reported."""

    metrics: dict[str, Any]
    path: Path  # the output directory, or the results file where a command names it
    reported: bool = False  # a finished run was found: nothing was recomputed


def finished_results(run: RunDirectory) -> dict[str, Any]:
    """The results record of a run its manifest marks finished (a corrupt-file error if it has none)."""
    record = run.results()
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise CorruptFileError(
            run.manifest_path, "it marks the run finished but its results file is missing or has no metrics"
        )
    return record


def train_in_directory(config: TrainConfig, output_dir: str | Path, *, overwrite: bool = False) -> Outcome:
    """Train ``config`` into ``output_dir`` under the run contract; see the module docstring."""
    # every check (output path, an existing run's config) comes before the first write
    run = RunDirectory(output_dir, tool=TOOL, config=config_to_dict(config), overwrite=overwrite, command="train")
    if run.finished:
        return Outcome(finished_results(run)["metrics"], run.path, reported=True)
    resuming = run.resuming
    run.begin()
    if not resuming or not (run.path / CONFIG_NAME).is_file():
        write_json_atomic(run.file(CONFIG_NAME), config_to_dict(config))
    model, metrics = train(config, checkpoint=run.file(CHECKPOINT_NAME))
    save_torch_atomic(model.state_dict(), run.file(MODEL_NAME))
    run.finish(metrics=metrics, config=config, seed=config.seed)
    return Outcome(metrics, run.path)


def finished_train_run(run_dir: Path) -> tuple[RunDirectory, TrainConfig]:
    """The finished ``train`` run in ``run_dir`` and its TrainConfig, read from what train wrote.

    The config comes from the run's manifest (written before training started, never changed by
    a refused rerun), and ``config.json`` must agree with it: a run whose files disagree is
    refused rather than analysed at the wrong lr or rho. The RunDirectory is opened with the run's
    own config, so adding analysis files to it goes through the same manifest (attach).
    """
    given = str(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {given!r} does not exist; expected an output directory of `{TOOL} train`"
        )
    manifest_path = run_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(f"run directory {given!r} holds no {TOOL} train run ({MANIFEST_NAME} is missing)")
    manifest = load_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise CorruptFileError(manifest_path, "expected a mapping with the run's config")
    if manifest.get("tool") != TOOL or manifest.get("command") != "train":
        raise ValueError(
            f"run directory {given!r} holds a {manifest.get('tool')} {manifest.get('command')} run; "
            f"expected one of `{TOOL} train`"
        )
    if not manifest.get("finished"):
        raise ValueError(
            f"run directory {given!r} holds an unfinished train run; rerun the same `{TOOL} train` command to finish it"
        )
    stored = manifest["config"]
    try:
        config = load_config(TrainConfig, defaults=stored)
    except ValueError as exc:
        raise CorruptFileError(manifest_path, f"its config is not a valid TrainConfig ({exc})") from exc
    config_path = run_dir / CONFIG_NAME
    if config_path.is_file():
        differing = config_differences(stored, load_json(config_path))
        if differing:
            raise CorruptFileError(
                config_path, f"differs from the config the run was trained with (differing: {', '.join(differing)})"
            )
    run = RunDirectory(run_dir, tool=TOOL, config=stored, command="train")
    return run, config


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """A saved model state dict, loaded without running code; anything else is a corrupt file."""
    state = load_torch(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFileError(path, "expected a model state dict (names to tensors)")
    return state
