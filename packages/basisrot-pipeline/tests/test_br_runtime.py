"""The real multi-process pipeline (gloo on 127.0.0.1, one thread per worker) against the emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from basisrot_pipeline.data import random_batches
from basisrot_pipeline.emulator import build_emulator
from basisrot_pipeline.model import ModelConfig
from basisrot_pipeline.runtime import (
    AsyncPipelineWorker,
    PipelineJob,
    checkpoint_path,
    checkpoint_settings_path,
    launch_mode,
    run_local,
)
from basisrot_pipeline.staleness import staleness_schedule
from basisrot_pipeline.train import (
    TrainConfig,
    distributed_files,
    open_training_run,
    resume_config,
    train_distributed,
)
from shin_common import config_changes, load_torch

STEPS = 8


def _emulated(tiny_config, optim, batches, stages, stashing, steps=STEPS):
    delays = staleness_schedule("async-1f1b", stages)
    _, emulator = build_emulator(tiny_config, optim, delays, total_steps=steps, weight_stashing=stashing)
    return [emulator.step(*batches.batch(m)) for m in range(steps)]


@pytest.mark.parametrize(
    ("stages", "stashing", "optimizer"),
    [(2, True, "basis-rotation"), (3, True, "basis-rotation"), (4, True, "adamw"), (3, False, "basis-rotation")],
)
def test_runtime_losses_equal_emulator(
    tiny_config, tiny_batches, fast_optim, single_thread, stages, stashing, optimizer
):
    optim = fast_optim(optimizer)
    expected = _emulated(tiny_config, optim, tiny_batches, stages, stashing)
    job = PipelineJob(
        model=tiny_config, optim=optim, num_stages=stages, steps=STEPS, batches=tiny_batches, weight_stashing=stashing
    )
    losses = run_local(job)
    assert sorted(losses) == list(range(STEPS))
    assert [losses[m] for m in range(STEPS)] == pytest.approx(expected, abs=1e-5)


def test_runtime_checkpoint_resume_equals_uninterrupted(tiny_config, tiny_batches, fast_optim, single_thread, tmp_path):
    optim, stages = fast_optim("basis-rotation"), 3
    expected = _emulated(tiny_config, optim, tiny_batches, stages, True)
    common = dict(model=tiny_config, optim=optim, num_stages=stages, steps=STEPS, batches=tiny_batches)
    # the first run stops after 4 minibatches; stage 0 then has minibatches 4 and 5 in flight, with
    # stashed weight versions, and stage 1 holds the activation of minibatch 5 already sent to it
    first = run_local(PipelineJob(**common, checkpoint_dir=str(tmp_path), checkpoint_every=4, stop_after=4))
    assert [first[m] for m in sorted(first)] == pytest.approx(expected[:4], abs=1e-5)
    assert all(checkpoint_path(tmp_path, 4, s).exists() for s in range(stages))
    resumed = run_local(PipelineJob(**common, checkpoint_dir=str(tmp_path), resume_step=4))
    assert [resumed[m] for m in range(STEPS)] == pytest.approx(expected, abs=1e-5)


def test_job_bad_inputs(tiny_config, tiny_batches, fast_optim):
    with pytest.raises(ValueError, match=r"num_stages \(5\) is larger than the number of layers \(4\)"):
        PipelineJob(model=tiny_config, optim=fast_optim(), num_stages=5, steps=4, batches=tiny_batches)
    with pytest.raises(ValueError, match="need a checkpoint_dir"):
        PipelineJob(model=tiny_config, optim=fast_optim(), num_stages=2, steps=4, batches=tiny_batches, resume_step=2)


def test_worker_refuses_a_checkpoint_of_other_settings(tiny_config, tiny_batches, fast_optim, tmp_path):
    job = PipelineJob(
        model=tiny_config, optim=fast_optim(), num_stages=2, steps=6, batches=tiny_batches, checkpoint_dir=str(tmp_path)
    )
    AsyncPipelineWorker(job, 0, torch.device("cpu")).save_checkpoint(2)  # stage 0 needs no peer to save
    other = replace(job, optim=fast_optim(lr=2e-2, precondition_frequency=5), steps=9)
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.01 -> 0\.02; optim\.precondition_frequency: 3 -> 5; steps"):
        AsyncPipelineWorker(other, 0, torch.device("cpu")).load_checkpoint(2)
    more_stages = replace(job, num_stages=3)
    with pytest.raises(ValueError, match="num_stages: 2 -> 3"):
        AsyncPipelineWorker(more_stages, 0, torch.device("cpu")).load_checkpoint(2)
    AsyncPipelineWorker(job, 0, torch.device("cpu")).load_checkpoint(2)  # the same settings resume


def test_job_settings_name_each_setting_once(tiny_config, tiny_batches, fast_optim):
    def job_for(run: TrainConfig) -> PipelineJob:
        return PipelineJob(
            model=run.model,
            optim=run.optim,
            num_stages=run.stages,
            steps=run.steps,
            batches=tiny_batches,
            seed=run.seed,
            run_config=resume_config(run),
        )

    base = TrainConfig(model=tiny_config, optim=fast_optim(), stages=2, steps=6, data="random")
    faster = replace(base, optim=fast_optim(lr=2e-2))
    assert config_changes(job_for(base).settings(), job_for(faster).settings()) == ["optim.lr: 0.01 -> 0.02"]
    other_data = replace(base, data="stdlib")
    assert config_changes(job_for(base).settings(), job_for(other_data).settings()) == [
        "run.data: 'random' -> 'stdlib'"
    ]


def test_each_checkpoint_step_has_its_settings_as_json(tiny_config, tiny_batches, fast_optim, tmp_path):
    job = PipelineJob(
        model=tiny_config, optim=fast_optim(), num_stages=2, steps=6, batches=tiny_batches, checkpoint_dir=str(tmp_path)
    )
    AsyncPipelineWorker(job, 0, torch.device("cpu")).save_checkpoint(2)
    saved = json.loads(checkpoint_settings_path(tmp_path, 2).read_text())
    assert saved == json.loads(json.dumps(job.settings()))
    in_checkpoint = load_torch(checkpoint_path(tmp_path, 2, 0))["settings"]  # loads with weights_only
    assert config_changes(saved, in_checkpoint) == []


TINY_RUN = dict(stages=2, steps=6, data="random", batch_size=4, eval_batches=1, checkpoint_every=2)


def _interrupted_run(directory, config, settings) -> None:
    """A partial run of ``config`` with a checkpoint at step 2 whose stage files cannot be loaded:
    the resume checks must not need them."""
    run = open_training_run(config, directory)
    run.begin()
    run.claim(distributed_files(config))
    step_dir = checkpoint_settings_path(directory / "checkpoints", 2).parent
    step_dir.mkdir(parents=True)
    for stage in range(2):
        (step_dir / f"stage_{stage}.pt").write_bytes(b"not a checkpoint")
    if settings is not None:
        (step_dir / "settings.json").write_text(json.dumps(settings))


def test_resume_is_refused_from_the_manifest_not_the_stage_checkpoints(tmp_path, fast_optim):
    model = ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    saved = TrainConfig(**TINY_RUN, model=model, optim=fast_optim())
    job = PipelineJob(
        model=saved.model,
        optim=saved.optim,
        num_stages=2,
        steps=saved.steps,
        batches=random_batches(vocab_size=32, block_size=8, batch_size=4, seed=0),
        run_config=resume_config(saved),
    )
    _interrupted_run(tmp_path, saved, job.settings())
    with pytest.raises(
        ValueError, match=r"holds a run with a different config \(differing: optim\.lr: 0\.01 -> 0\.03\)"
    ):
        train_distributed(replace(saved, optim=fast_optim(lr=3e-2)), tmp_path)


def test_resume_from_a_checkpoint_without_settings_says_how_to_continue(tmp_path, fast_optim):
    model = ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    config = TrainConfig(**TINY_RUN, model=model, optim=fast_optim())
    _interrupted_run(tmp_path, config, None)
    with pytest.raises(ValueError, match=r"step_00000002'\) records no configuration .*delete it, or use a new"):
        train_distributed(config, tmp_path)


TORCHRUN_RANK = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "LOCAL_RANK": "1"}


def test_launch_mode_on_launcher_environments():
    assert launch_mode({}) == "local"
    assert launch_mode(TORCHRUN_RANK) == "process-group"
    with pytest.raises(ValueError, match="MASTER_PORT are not"):
        launch_mode({k: v for k, v in TORCHRUN_RANK.items() if k != "MASTER_PORT"})
    with pytest.raises(ValueError, match="started under MPI as one of 2 processes"):
        launch_mode({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})


SRUN_ONE_TASK = {
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "1",
    "SLURM_STEP_NUM_TASKS": "1",
    "PMI_SIZE": "1",
    "PMIX_RANK": "0",
}


@pytest.mark.parametrize(
    "environment",
    [
        SRUN_ONE_TASK,
        {"PMIX_RANK": "0"},  # srun --mpi=pmix sets the rank in every task
        {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0"},  # mpirun -n 1
        {"MV2_COMM_WORLD_SIZE": "1"},
        {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"},  # an sbatch script: one process in a larger allocation
    ],
)
def test_a_single_mpi_or_slurm_task_spawns_the_stages(environment):
    assert launch_mode(environment) == "local"


@pytest.mark.parametrize(
    ("environment", "variable"),
    [
        ({**SRUN_ONE_TASK, "SLURM_STEP_NUM_TASKS": "4", "PMI_SIZE": "4"}, "PMI_SIZE=4"),
        ({"SLURM_STEP_NUM_TASKS": "2", "PMIX_RANK": "1"}, "SLURM_STEP_NUM_TASKS=2"),
        ({"MV2_COMM_WORLD_SIZE": "3"}, "MV2_COMM_WORLD_SIZE=3"),
    ],
)
def test_several_mpi_or_slurm_tasks_are_refused(environment, variable):
    with pytest.raises(ValueError, match=f"started under MPI as one of .*{variable}"):
        launch_mode(environment)


def test_a_non_integer_mpi_world_size_is_named():
    with pytest.raises(ValueError, match="PMI_SIZE='two': expected the number of processes"):
        launch_mode({"PMI_SIZE": "two"})


def test_accelerate_cpu_launcher_starts_one_process_that_spawns_the_stages():
    """``accelerate launch --cpu --num_processes 4`` runs one process, without RANK: it must spawn."""
    pytest.importorskip("accelerate")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    argv = ["--cpu", "--num_processes", "4", "-m", "basisrot_pipeline", "train", "--runtime", "distributed"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    command, env = prepare_simple_launcher_cmd_env(args)
    assert command[:3] == [sys.executable, "-m", "basisrot_pipeline"]  # one plain process
    assert "RANK" not in env and env["MASTER_ADDR"] == "127.0.0.1"
    assert launch_mode(env) == "local"


def test_accelerate_multi_gpu_launch_runs_one_process_per_stage(tmp_path, single_thread):
    """The documented ``accelerate launch --multi_gpu --num_processes P`` command, on CPU (gloo)."""
    pytest.importorskip("accelerate")
    from basisrot_pipeline.model import ModelConfig
    from basisrot_pipeline.train import TrainConfig, train

    config_file = tmp_path / "tiny.json"
    tiny = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    settings = dict(stages=2, steps=4, data="random", batch_size=4, eval_batches=1, checkpoint_every=0)
    config_file.write_text(json.dumps({**settings, "model": tiny}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    train_args = ["-m", "basisrot_pipeline", "train", "--runtime", "distributed", "--config", str(config_file)]
    result = subprocess.run(
        [*launch, "--main_process_port", "0", *train_args, "--output-dir", str(tmp_path / "acc")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spawning one process per stage here" not in result.stderr  # accelerate started the ranks
    record = json.loads((tmp_path / "acc" / "results.json").read_text())
    emulated = train(TrainConfig(**settings, model=ModelConfig(**tiny)), tmp_path / "emulated")
    assert record["metrics"]["train_losses"] == pytest.approx(emulated["train_losses"], abs=1e-5)
    assert record["metrics"]["val_loss"] == pytest.approx(emulated["val_loss"], abs=1e-5)
