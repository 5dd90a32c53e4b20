"""Training runs: one config, the emulated or the distributed pipeline, resumable, with a run record.

The output directory follows the toolkit's run contract (docs/run-contract.md): checked before any
work, a finished run of the same config reported without training, a partial one resumed, another
config refused naming the differing keys; every checkpoint is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from basisrot_pipeline.data import TokenBatches, random_batches, stdlib_batches
from basisrot_pipeline.emulator import build_emulator
from basisrot_pipeline.model import GPT, ModelConfig, lm_loss, partition_model
from basisrot_pipeline.optim.factory import OptimConfig
from basisrot_pipeline.resume import TOOL, check_same_config, open_run
from basisrot_pipeline.staleness import SCHEDULES, staleness_schedule
from shin_common import (
    CorruptFileError,
    RunDirectory,
    config_to_dict,
    load_torch,
    progress,
    read_json,
    save_torch_atomic,
    seed_everything,
    write_run_record,
)
from shin_common.rundir import RESULTS_NAME

logger = logging.getLogger(__name__)

RUNTIMES = ("emulated", "distributed")
DATASETS = ("stdlib", "random")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run. Nested fields are set as ``model.n_layer=8`` or ``optim.lr=3e-4``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: int = 4
    schedule: str = "async-1f1b"
    uniform_delay: int = 1
    custom_delays: list[int] | None = None
    runtime: str = "emulated"
    weight_stashing: bool = True
    steps: int = 200
    batch_size: int = 16
    seed: int = 0
    data: str = "stdlib"
    max_train_blocks: int | None = None
    eval_batches: int = 8
    checkpoint_every: int = 50
    # BLAS threads for the training arithmetic, in both runtimes (each stage process of the distributed
    # one): round-off, and with it the bases of rank-deficient statistics, depends on the thread count,
    # so the runtimes agree exactly, and a resumed run continues exactly, only at one count.
    threads: int = 1

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; expected one of {RUNTIMES}")
        if self.data not in DATASETS:
            raise ValueError(f"unknown data {self.data!r}; expected one of {DATASETS}")
        SCHEDULES.get(self.schedule)  # an unknown name: one line listing the registered ones
        if self.stages > self.model.n_layer:
            raise ValueError(f"stages ({self.stages}) is larger than the number of layers ({self.model.n_layer})")
        if self.runtime == "distributed" and self.schedule != "async-1f1b":
            raise ValueError(f"the distributed runtime runs schedule 'async-1f1b', got {self.schedule!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 disables), got {self.checkpoint_every!r}")
        self.delays()  # validates stages and the schedule's parameters

    def delays(self) -> tuple[int, ...]:
        return staleness_schedule(self.schedule, self.stages, delay=self.uniform_delay, delays=self.custom_delays)


def make_batches(config: TrainConfig) -> tuple[TokenBatches, TokenBatches, dict[str, Any]]:
    """Training and validation batches, and a description of the data for the record."""
    block, batch = config.model.block_size, config.batch_size
    if config.data == "random":
        train = random_batches(vocab_size=config.model.vocab_size, block_size=block, batch_size=batch, seed=config.seed)
        val = random_batches(
            vocab_size=config.model.vocab_size, block_size=block, batch_size=batch, seed=config.seed + 1
        )
        return train, val, {"name": "random", "vocab_size": config.model.vocab_size}
    if config.model.vocab_size < 256:
        raise ValueError(f"byte-level data needs model.vocab_size >= 256, got {config.model.vocab_size}")
    train, described = stdlib_batches(
        split="train", block_size=block, batch_size=batch, seed=config.seed, max_blocks=config.max_train_blocks
    )
    max_val = config.eval_batches * batch
    val, _ = stdlib_batches(
        split="validation", block_size=block, batch_size=batch, seed=config.seed, max_blocks=max_val
    )
    return train, val, described


def resume_config(config: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint or a finished record must match: all but ``checkpoint_every``,
    which changes nothing that is trained or measured."""
    settings = config_to_dict(config)
    settings.pop("checkpoint_every")
    return settings


RECORD = RESULTS_NAME  # the results file of a finished training run (results.json)


def open_training_run(
    config: TrainConfig, output_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> RunDirectory:
    """The checked output directory of a training run: its config is :func:`resume_config`."""
    return open_run(output_dir, config=resume_config(config), command="train", overwrite=overwrite)


def finished_metrics(run: RunDirectory) -> dict[str, Any]:
    """The metrics of the finished run in ``run``, marked ``already_finished`` (nothing is trained again)."""
    record = run.results()
    if record is None or not isinstance(record.get("metrics"), dict):
        raise CorruptFileError(
            run.path / RECORD,
            "the run is marked finished but its record is missing or has no metrics; pass --overwrite to train again",
        )
    logger.info(
        "%s holds a finished run with this config; reporting it (use a new output dir to train again)", run.path
    )
    return {**record["metrics"], "already_finished": True}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: TokenBatches, max_batches: int) -> float:
    losses = [float(lm_loss(model(x), y)) for x, y in batches.sequential(max_batches)]
    return sum(losses) / max(1, len(losses))


def train_emulated(config: TrainConfig, output_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Train with the exact staleness emulator; resumes from ``output_dir/checkpoint.pt`` if present."""
    run = open_training_run(config, output_dir, overwrite=overwrite)
    if run.finished:
        return finished_metrics(run)
    return run_emulated(config, run)


def _load_emulated_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    """An emulated run's ``checkpoint.pt`` (tensors and plain containers only), checked against ``config``."""
    state = load_torch(path)
    if not isinstance(state, dict) or not state.keys() >= {"emulator", "losses"}:
        raise CorruptFileError(path, "expected a mapping with 'emulator' and 'losses' (an emulated-run checkpoint)")
    check_same_config(state.get("config"), resume_config(config), where=f"checkpoint {str(path)!r}")
    return state


def _restore_emulated(path: Path, state: dict[str, Any], emulator: Any) -> list[float]:
    """Put a checkpoint's state into ``emulator``; returns the losses so far."""
    try:
        emulator.load_state_dict(state["emulator"])
        losses = [float(loss) for loss in state["losses"]]
    except ValueError:  # a settings mismatch, already one line naming the keys
        raise
    except (KeyError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(path, f"its state does not fit this run ({reason})") from exc
    if len(losses) != emulator.updates:
        raise CorruptFileError(path, f"it holds {len(losses)} losses for {emulator.updates} updates")
    return losses


def run_emulated(config: TrainConfig, run: RunDirectory, prefix: str = "") -> dict[str, Any]:
    """Train in ``run`` and write the record; returns the metrics.

    With a ``prefix`` (the demo's ``adamw/``) the files are named ``prefix`` + name and the record is
    one file of a larger run; without, the record finishes ``run``.

    Everything that can refuse the config (data, checkpoint, model, emulator) is read or built before
    ``run.begin()``, so a bad value leaves no directory behind.
    """
    seed_everything(config.seed)
    train_batches, val_batches, data_info = make_batches(config)
    checkpoint_name = f"{prefix}checkpoint.pt"
    checkpoint = run.path / checkpoint_name
    # read before the model is built: a corrupt checkpoint is reported in seconds (not when
    # resuming: a fresh run has none, and begin() deletes an --overwrite'd one)
    state = _load_emulated_checkpoint(checkpoint, config) if run.resuming and checkpoint.exists() else None
    delays = config.delays()
    model, emulator = build_emulator(
        config.model,
        config.optim,
        delays,
        total_steps=config.steps,
        weight_stashing=config.weight_stashing,
        seed=config.seed,
    )
    losses: list[float] = []
    if state is not None:
        losses = _restore_emulated(checkpoint, state, emulator)
        logger.info("resumed from %s after %d steps", checkpoint, emulator.updates)
    run.begin()
    resumed_from = emulator.updates or None
    start = time.perf_counter()
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # as every stage process of the distributed runtime does
    try:
        threads = torch.get_num_threads()
        for m in progress(range(emulator.updates, config.steps), desc=f"{config.optim.name} P={config.stages}"):
            losses.append(emulator.step(*train_batches.batch(m)))
            done = m + 1
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                state = {"emulator": emulator.state_dict(), "losses": losses, "config": resume_config(config)}
                save_torch_atomic(state, run.file(checkpoint_name))
    finally:
        torch.set_num_threads(caller_threads)
    elapsed = time.perf_counter() - start
    model.eval()
    metrics = {
        "train_losses": losses,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "val_loss": evaluate(model, val_batches, config.eval_batches),
        "delays": list(delays),
        "seconds": elapsed,
        "num_params": sum(p.numel() for p in model.parameters()),
        "resumed_from_step": resumed_from,
        "threads": threads,
    }
    record = dict(metrics=metrics, config=config_to_dict(config), seed=config.seed)
    extra = {"data": data_info, "runtime": "emulated"}
    if prefix:
        write_run_record(run.file(f"{prefix}{RECORD}"), extra=extra, package=TOOL, **record)
    else:
        run.finish(extra=extra, **record)
    checkpoint.unlink(missing_ok=True)  # after the record: a run killed in between is reported, not retrained
    return metrics


CHECKPOINT_STEP_DIR = re.compile(r"step_(\d+)")  # as runtime.checkpoint_path names them


def latest_complete_checkpoint(directory: Path, num_stages: int) -> int | None:
    """The largest step whose checkpoint has a file for every stage."""
    steps = []
    for step_dir in directory.glob("step_*"):
        match = CHECKPOINT_STEP_DIR.fullmatch(step_dir.name)
        if match and all((step_dir / f"stage_{s}.pt").is_file() for s in range(num_stages)):
            steps.append(int(match[1]))
    return max(steps) if steps else None


def distributed_files(config: TrainConfig) -> list[str]:
    """Every file the stage processes of a run can write, relative to the output directory.

    The coordinator claims them all in the manifest before any stage process starts: the stage
    processes write checkpoints and final weights, but only one process may write the manifest.
    """
    from basisrot_pipeline.runtime import LOSSES_NAME, checkpoint_path, checkpoint_settings_path, final_weights_path

    root = Path("checkpoints")
    names = []
    if config.checkpoint_every:
        for step in range(config.checkpoint_every, config.steps, config.checkpoint_every):
            names.append(checkpoint_settings_path(root, step).as_posix())
            names += [checkpoint_path(root, step, s).as_posix() for s in range(config.stages)]
    names += [final_weights_path(Path(), s).as_posix() for s in range(config.stages)]
    names.append(LOSSES_NAME)
    return names


def completed_stages(out: Path, config: TrainConfig) -> dict[int, float] | None:
    """The losses of a run whose stage processes all finished (only the evaluation was left), or None.

    The last stage writes ``losses.json`` only after every stage saved its final weights (a barrier
    lies between), so a complete ``losses.json`` means the weights are all there.
    """
    from basisrot_pipeline.runtime import LOSSES_NAME, final_weights_path, read_losses

    if not (out / LOSSES_NAME).is_file():
        return None
    losses, next_backward = read_losses(out / LOSSES_NAME)
    if next_backward != config.steps or not all(final_weights_path(out, s).is_file() for s in range(config.stages)):
        return None
    return losses


def assembled_model(config: TrainConfig, out: Path) -> GPT:
    """The whole decoder, each stage loaded from ``final_weights/stage_{s}.pt``."""
    from basisrot_pipeline.runtime import final_weights_path

    torch.manual_seed(config.seed)
    model = GPT(config.model)
    for s, stage in enumerate(partition_model(model, config.stages)):
        path = final_weights_path(out, s)
        weights = load_torch(path, map_location="cpu")
        try:
            stage.load_state_dict(weights)
        except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CorruptFileError(path, f"not the weights of stage {s} of this model ({reason})") from exc
    model.eval()
    return model


def pipeline_job(
    config: TrainConfig,
    batches: TokenBatches,
    checkpoint_dir: str | os.PathLike[str],
    *,
    resume_step: int | None = None,
    device: str = "cpu",
) -> Any:
    """The :class:`~basisrot_pipeline.runtime.PipelineJob` of a distributed training run."""
    from basisrot_pipeline.runtime import PipelineJob

    return PipelineJob(
        model=config.model,
        optim=config.optim,
        num_stages=config.stages,
        steps=config.steps,
        batches=batches,
        seed=config.seed,
        weight_stashing=config.weight_stashing,
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_every=config.checkpoint_every,
        resume_step=resume_step,
        threads=config.threads,
        device=device,
        run_config=resume_config(config),
    )


def train_distributed(
    config: TrainConfig, output_dir: str | Path, device: str = "cpu", *, overwrite: bool = False
) -> dict[str, Any]:
    """Train with one process per stage (spawned here, or joined under torchrun / accelerate launch).

    Only the coordinator (this process when it spawns the stages, rank 0 under a launcher) creates
    the output directory, claims its files and writes the record; the other ranks only check it.
    """
    from basisrot_pipeline.runtime import (
        LOSSES_NAME,
        checkpoint_settings_path,
        launch_mode,
        read_losses,
        run_from_environment,
        run_local,
    )

    mode = launch_mode()
    coordinator = mode == "local" or int(os.environ["RANK"]) == 0
    run = open_training_run(config, output_dir, overwrite=overwrite)
    if run.finished:
        return finished_metrics(run) if coordinator else {}
    seed_everything(config.seed)
    train_batches, val_batches, data_info = make_batches(config)
    checkpoints = run.path / "checkpoints"
    # decided from the directory as it is before the coordinator's begin() (which deletes an
    # --overwrite'd run), so every rank of a launcher's group makes the same decision
    finished_stages = completed_stages(run.path, config) if run.resuming else None
    resume_step = None
    if run.resuming and finished_stages is None:
        resume_step = latest_complete_checkpoint(checkpoints, config.stages)
    job = pipeline_job(config, train_batches, checkpoints, resume_step=resume_step, device=device)
    if job.resume_step is not None:  # refuse here, before any worker starts, with the differing keys
        settings_file = checkpoint_settings_path(checkpoints, job.resume_step)
        saved = read_json(settings_file) if settings_file.exists() else None
        where = f"the checkpoint at step {job.resume_step} ({str(settings_file.parent)!r})"
        check_same_config(saved, job.settings(), where=where)  # each worker checks its own file again
    if coordinator:
        run.begin()
        run.claim(distributed_files(config))
    start = time.perf_counter()
    if finished_stages is not None:
        losses = finished_stages
    elif mode == "process-group":
        run_from_environment(job, run.path)
        if coordinator:
            losses, _ = read_losses(run.path / LOSSES_NAME)
    else:
        losses = run_local(job, run.path)
    if not coordinator:
        return {}
    seconds = time.perf_counter() - start
    # the validation loss of the assembled model, from the stages' final weights (all on disk by now)
    model = assembled_model(config, run.path)
    if finished_stages is not None:  # logged once the weights loaded: a refused file is the only line
        logger.info("the stages of %s had all finished; evaluating the assembled model", run.path)
    ordered = [losses[m] for m in sorted(losses)]
    metrics = {
        "train_losses": ordered,
        "final_train_loss": sum(ordered[-10:]) / len(ordered[-10:]),
        "val_loss": evaluate(model, val_batches, config.eval_batches),
        "delays": list(config.delays()),
        "seconds": seconds,
        "num_params": sum(p.numel() for p in model.parameters()),
        "resumed_from_step": config.steps if finished_stages is not None else job.resume_step,
        # as the last stage process read it back (the stages set it from the job)
        "threads": read_json(run.path / LOSSES_NAME).get("threads"),
    }
    run.finish(
        metrics=metrics,
        config=config_to_dict(config),
        seed=config.seed,
        extra={"data": data_info, "runtime": "distributed"},
    )
    return metrics


def train(config: TrainConfig, output_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Train ``config`` in ``output_dir`` (a rerun resumes it, or reports it once finished)."""
    if config.runtime == "emulated":
        return train_emulated(config, output_dir, overwrite=overwrite)
    return train_distributed(config, output_dir, overwrite=overwrite)
