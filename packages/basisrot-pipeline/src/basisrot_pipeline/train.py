"""Training runs: one config, the emulated or the distributed pipeline, resumable, with a run record."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from basisrot_pipeline.data import TokenBatches, random_batches, stdlib_batches
from basisrot_pipeline.emulator import build_emulator
from basisrot_pipeline.model import GPT, ModelConfig, lm_loss, partition_model
from basisrot_pipeline.optim.factory import OptimConfig
from basisrot_pipeline.resume import check_same_config
from basisrot_pipeline.staleness import SCHEDULES, staleness_schedule
from shin_common import config_to_dict, progress, read_json, seed_everything, write_run_record

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

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; expected one of {RUNTIMES}")
        if self.data not in DATASETS:
            raise ValueError(f"unknown data {self.data!r}; expected one of {DATASETS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown staleness schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.stages > self.model.n_layer:
            raise ValueError(f"stages ({self.stages}) is larger than the number of layers ({self.model.n_layer})")
        if self.runtime == "distributed" and self.schedule != "async-1f1b":
            raise ValueError(f"the distributed runtime runs schedule 'async-1f1b', got {self.schedule!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
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


def finished_run(out: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The metrics of the finished run in ``out`` if there is one with this config; a different one is refused.

    Both runtimes write ``run.json`` only when a run is complete, so a rerun of a finished run reports
    it instead of training again (from scratch or from a stale checkpoint).
    """
    record_path = out / "run.json"
    if not record_path.exists():
        return None
    record = read_json(record_path)
    saved = dict(record.get("config") or {})
    saved.pop("checkpoint_every", None)
    check_same_config(saved, resume_config(config), where=f"the finished run {str(record_path)!r}")
    logger.info("%s holds a finished run with this config; reporting it (use a new output dir to train again)", out)
    return {**record["metrics"], "already_finished": True}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: TokenBatches, max_batches: int) -> float:
    losses = [float(lm_loss(model(x), y)) for x, y in batches.sequential(max_batches)]
    return sum(losses) / max(1, len(losses))


def train_emulated(config: TrainConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train with the exact staleness emulator; resumes from ``output_dir/checkpoint.pt`` if present."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (finished := finished_run(out, config)) is not None:
        return finished
    seed_everything(config.seed)
    train_batches, val_batches, data_info = make_batches(config)
    delays = config.delays()
    model, emulator = build_emulator(
        config.model,
        config.optim,
        delays,
        total_steps=config.steps,
        weight_stashing=config.weight_stashing,
        seed=config.seed,
    )
    checkpoint = out / "checkpoint.pt"
    losses: list[float] = []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        check_same_config(state.get("config"), resume_config(config), where=f"checkpoint {str(checkpoint)!r}")
        emulator.load_state_dict(state["emulator"])
        losses = state["losses"]
        logger.info("resumed from %s after %d steps", checkpoint, emulator.updates)
    start = time.perf_counter()
    for m in progress(range(emulator.updates, config.steps), desc=f"{config.optim.name} P={config.stages}"):
        losses.append(emulator.step(*train_batches.batch(m)))
        done = m + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"emulator": emulator.state_dict(), "losses": losses, "config": resume_config(config)}, tmp)
            tmp.replace(checkpoint)
    elapsed = time.perf_counter() - start
    model.eval()
    metrics = {
        "train_losses": losses,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "val_loss": evaluate(model, val_batches, config.eval_batches),
        "delays": list(delays),
        "seconds": elapsed,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    write_run_record(
        out / "run.json",
        config=config_to_dict(config),
        metrics=metrics,
        seed=config.seed,
        extra={"data": data_info, "runtime": "emulated"},
    )
    checkpoint.unlink(missing_ok=True)
    return metrics


def latest_complete_checkpoint(directory: Path, num_stages: int) -> int | None:
    """The largest step whose checkpoint has a file for every stage."""
    steps = []
    for step_dir in directory.glob("step_*"):
        if all((step_dir / f"stage_{s}.pt").exists() for s in range(num_stages)):
            steps.append(int(step_dir.name.split("_")[1]))
    return max(steps) if steps else None


def train_distributed(config: TrainConfig, output_dir: str | Path, device: str = "cpu") -> dict[str, Any]:
    """Train with one process per stage (spawned here, or joined under torchrun / accelerate launch)."""
    from basisrot_pipeline.runtime import (
        PipelineJob,
        checkpoint_settings_path,
        final_weights_path,
        launch_mode,
        run_from_environment,
        run_local,
    )

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mode = launch_mode()
    reporting_rank = mode == "local" or int(os.environ["RANK"]) == config.stages - 1
    if (finished := finished_run(out, config)) is not None:
        return finished if reporting_rank else {}
    seed_everything(config.seed)
    train_batches, val_batches, data_info = make_batches(config)
    checkpoints = out / "checkpoints"
    job = PipelineJob(
        model=config.model,
        optim=config.optim,
        num_stages=config.stages,
        steps=config.steps,
        batches=train_batches,
        seed=config.seed,
        weight_stashing=config.weight_stashing,
        checkpoint_dir=str(checkpoints),
        checkpoint_every=config.checkpoint_every,
        resume_step=latest_complete_checkpoint(checkpoints, config.stages),
        device=device,
        run_config=resume_config(config),
    )
    if job.resume_step is not None:  # refuse here, before any worker starts, with the differing keys
        settings_file = checkpoint_settings_path(checkpoints, job.resume_step)
        saved = read_json(settings_file) if settings_file.exists() else None
        where = f"the checkpoint at step {job.resume_step} ({str(settings_file.parent)!r})"
        check_same_config(saved, job.settings(), where=where)  # each worker checks its own file again
    start = time.perf_counter()
    if mode == "process-group":
        losses = run_from_environment(job, out)
        if not reporting_rank:
            return {}
    else:
        losses = run_local(job, out)
    seconds = time.perf_counter() - start
    # the validation loss of the assembled model, from the stages' final weights (all on disk by now)
    torch.manual_seed(config.seed)
    model = GPT(config.model)
    for s, stage in enumerate(partition_model(model, config.stages)):
        stage.load_state_dict(torch.load(final_weights_path(out, s), map_location="cpu", weights_only=True))
    model.eval()
    ordered = [losses[m] for m in sorted(losses)]
    metrics = {
        "train_losses": ordered,
        "final_train_loss": sum(ordered[-10:]) / len(ordered[-10:]),
        "val_loss": evaluate(model, val_batches, config.eval_batches),
        "delays": list(config.delays()),
        "seconds": seconds,
        "num_params": sum(p.numel() for p in model.parameters()),
        "resumed_from_step": job.resume_step,
    }
    write_run_record(
        out / "run.json",
        config=config_to_dict(config),
        metrics=metrics,
        seed=config.seed,
        extra={"data": data_info, "runtime": "distributed"},
    )
    return metrics


def train(config: TrainConfig, output_dir: str | Path) -> dict[str, Any]:
    if config.runtime == "emulated":
        return train_emulated(config, output_dir)
    return train_distributed(config, output_dir)
