"""Command line: train (emulated, resumable), config errors, and the demo's outputs on a short run."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from basisrot_pipeline.cli import main
from basisrot_pipeline.emulator import StalenessEmulator
from basisrot_pipeline.model import ModelConfig
from basisrot_pipeline.optim import OptimConfig
from basisrot_pipeline.train import TrainConfig, train

TINY_ARGS = [
    "--set",
    "model.n_layer=2",
    "--set",
    "model.n_embd=16",
    "--set",
    "model.n_head=2",
    "--set",
    "model.block_size=16",
    "--set",
    "batch_size=4",
    "--set",
    "eval_batches=2",
]


def test_train_emulated_writes_record(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--stages",
            "2",
            "--optimizer",
            "basis-rotation",
            "--runtime",
            "emulated",
            "--steps",
            "6",
            "--output-dir",
            str(out),
            *TINY_ARGS,
        ]
    )
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    assert len(record["metrics"]["train_losses"]) == 6 and record["metrics"]["delays"] == [1, 0]
    assert record["config"]["optim"]["name"] == "basis-rotation" and "git" in json.dumps(record)
    assert "val_loss" in capsys.readouterr().out


def test_train_resumes_after_interruption(tmp_path, monkeypatch):
    config = TrainConfig(
        stages=2,
        steps=7,
        batch_size=4,
        data="random",
        checkpoint_every=3,
        eval_batches=1,
        model=ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16),
    )
    full = train(config, tmp_path / "full")

    real_step = StalenessEmulator.step

    def crash_at_minibatch_4(self, inputs, targets):
        if self.updates == 4:
            raise KeyboardInterrupt
        return real_step(self, inputs, targets)

    monkeypatch.setattr(StalenessEmulator, "step", crash_at_minibatch_4)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "interrupted")
    assert (tmp_path / "interrupted" / "checkpoint.pt").exists()
    monkeypatch.setattr(StalenessEmulator, "step", real_step)
    # a resume under other settings would bring back the saved lr/frequency with the optimizer state
    changed = replace(config, optim=replace(config.optim, lr=3e-3), steps=9)
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.001 -> 0\.003, steps: 7 -> 9") as refused:
        train(changed, tmp_path / "interrupted")
    assert "interrupted" in str(refused.value) and "--overwrite" in str(refused.value)
    resumed = train(replace(config, checkpoint_every=2), tmp_path / "interrupted")  # continues from minibatch 3
    assert resumed["train_losses"] == full["train_losses"]
    assert resumed["val_loss"] == full["val_loss"]


def test_rerun_of_a_finished_emulated_run_reports_it(tmp_path, monkeypatch):
    config = TrainConfig(
        stages=2,
        steps=4,
        batch_size=4,
        data="random",
        checkpoint_every=2,
        eval_batches=1,
        model=ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16),
    )
    first = train(config, tmp_path)

    def must_not_train(self, inputs, targets):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(StalenessEmulator, "step", must_not_train)
    again = train(config, tmp_path)
    assert again["already_finished"] and again["train_losses"] == first["train_losses"]
    assert again["val_loss"] == first["val_loss"]
    with pytest.raises(
        ValueError, match=r"holds a run with a different config \(differing: optim\.name: 'basis-rotation' -> 'adamw'\)"
    ):
        train(replace(config, optim=OptimConfig(name="adamw")), tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stages", "3"], r"stages \(3\) is larger than the number of layers \(2\)"),
        (["--optimizer", "sgd"], "unknown optimizer 'sgd'"),
        (["--schedule", "gpipe"], "unknown staleness schedule 'gpipe'"),
        (["--set", "optim.precondition_frequency=0"], "precondition_frequency must be a positive int"),
        (["--runtime", "mpi"], "unknown runtime 'mpi'"),
    ],
)
def test_train_bad_inputs(tmp_path, capsys, args, message):
    assert main(["train", "--output-dir", str(tmp_path / "out"), *TINY_ARGS, *args]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error) and error.startswith("basisrot-pipeline train: error:")
    assert not (tmp_path / "out").exists()  # refused before the output directory was created


def test_demo_short_run(tmp_path):
    pytest.importorskip("matplotlib")
    from basisrot_pipeline.experiments import run_demo

    summary = run_demo(tmp_path, steps=3)
    assert set(summary) >= {"adamw", "basis-rotation", "wall_seconds"}
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert (tmp_path / "adamw" / "results.json").exists() and (tmp_path / "basis-rotation" / "results.json").exists()
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["adamw"] == summary["adamw"]


def test_train_distributed_matches_emulated(tmp_path, single_thread, capsys):
    tiny = [
        "--set",
        "data=random",
        "--set",
        "model.vocab_size=32",
        "--set",
        "model.block_size=8",
        "--set",
        "model.n_layer=2",
        "--set",
        "model.n_embd=16",
        "--set",
        "model.n_head=2",
        "--set",
        "batch_size=4",
        "--set",
        "eval_batches=1",
        "--set",
        "checkpoint_every=3",
    ]
    for runtime in ("emulated", "distributed"):
        assert (
            main(
                [
                    "train",
                    "--stages",
                    "2",
                    "--steps",
                    "5",
                    "--runtime",
                    runtime,
                    "--output-dir",
                    str(tmp_path / runtime),
                    *tiny,
                ]
            )
            == 0
        )
    emulated = json.loads((tmp_path / "emulated" / "results.json").read_text())["metrics"]
    record = json.loads((tmp_path / "distributed" / "results.json").read_text())
    assert record["metrics"]["train_losses"] == pytest.approx(emulated["train_losses"], abs=1e-5)
    assert record["metrics"]["val_loss"] == pytest.approx(emulated["val_loss"], abs=1e-5)
    assert record["runtime"] == "distributed"
    assert (tmp_path / "distributed" / "checkpoints" / "step_00000003" / "stage_1.pt").exists()

    # a rerun of the finished run reports it (no workers are started), as the emulated runtime does
    rerun = ["train", "--stages", "2", "--steps", "5", "--runtime", "distributed", *tiny]
    capsys.readouterr()
    assert main([*rerun, "--output-dir", str(tmp_path / "distributed")]) == 0
    assert '"already_finished": true' in capsys.readouterr().out
    # other settings are refused before starting any worker
    assert main([*rerun, "--set", "optim.lr=0.005", "--output-dir", str(tmp_path / "distributed")]) == 2
    error = capsys.readouterr().err
    assert re.search(
        r"distributed' holds a run with a different config \(differing: optim\.lr: 0\.001 -> 0\.005\)", error
    )
    assert len(re.findall(r"optim\.lr:", error)) == 1  # each differing key is named once


def test_train_from_yaml_config_with_custom_schedule(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "stages: 2\nschedule: custom\ncustom_delays: [2, 0]\nsteps: 3\ndata: random\nbatch_size: 2\n"
        "eval_batches: 1\nmodel:\n  vocab_size: 16\n  block_size: 4\n  n_layer: 2\n  n_head: 1\n  n_embd: 8\n"
        "optim:\n  name: nesterov\n"
    )
    assert main(["train", "--config", str(config_file), "--output-dir", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["metrics"]["delays"] == [2, 0] and record["config"]["optim"]["name"] == "nesterov"


DEMO_TINY = ["--set", "stages=2", "--set", "n_layer=2", "--set", "n_embd=16", "--set", "n_head=2"]
DEMO_TINY += ["--set", "block_size=8", "--set", "batch_size=2", "--set", "eval_batches=1"]


def test_demo_help_lists_its_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--config FILE" in out and "--set KEY=VALUE" in out
    for key in (
        "steps (int) = 1000",
        "stages (int) = 8",
        "n_layer (int) = 8",
        "n_embd (int) = 64",
        "seed (int) = 0",
        "threads",
    ):
        assert key in out, key


def test_demo_defaults_are_the_demo_runs_of_before():
    """The default DemoConfig trains exactly the two runs the demo trained before it had a config."""
    from basisrot_pipeline.experiments import DemoConfig, demo_config

    for optimizer in ("adamw", "basis-rotation"):
        assert demo_config(optimizer, DemoConfig()) == TrainConfig(
            stages=8,
            model=ModelConfig(n_layer=8, n_embd=64, n_head=4, block_size=64),
            batch_size=16,
            steps=1000,
            optim=OptimConfig(name=optimizer, lr=3e-3, warmup_steps=50),
            checkpoint_every=100,
            eval_batches=8,
        )


def test_demo_set_changes_the_recorded_config(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", *DEMO_TINY, "--set", "seed=3", "--output-dir", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    for optimizer in ("adamw", "basis-rotation"):
        config = record["config"][optimizer]
        assert (config["stages"], config["steps"], config["seed"]) == (2, 2, 3)
        assert config["model"]["n_layer"] == 2 and config["model"]["n_embd"] == 16
        assert config["optim"]["name"] == optimizer
    assert record["seed"] == 3


def test_demo_refuses_a_key_given_by_flag_and_set(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--set", "steps=3", "--output-dir", str(tmp_path / "out")]) == 2
    assert re.search(r"steps is set twice", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
