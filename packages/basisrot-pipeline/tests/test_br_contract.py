"""The run contract through the real console script (docs/run-contract.md).

Every refused input or file ends the script with status 2 and ONE line on stderr naming what was
wrong, and leaves every file where it was (nothing created, nothing half-written, the user's
notes.txt untouched). Crafted pickles never run: every load path uses ``weights_only=True``.
Ctrl-C ends a training run with status 130 and one line, and the same command resumes it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from basisrot_pipeline import __version__
from basisrot_pipeline.cli import build_parser, config_from_args
from basisrot_pipeline.runtime import LOSSES_NAME, checkpoint_path, checkpoint_settings_path, final_weights_path
from basisrot_pipeline.train import distributed_files, make_batches, open_training_run, pipeline_job

SCRIPT = [sys.executable, "-m", "basisrot_pipeline"]
TINY = [
    "--stages",
    "2",
    "--steps",
    "4",
    *("--set", "data=random"),
    *("--set", "model.vocab_size=32"),
    *("--set", "model.block_size=8"),
    *("--set", "model.n_layer=2"),
    *("--set", "model.n_embd=16"),
    *("--set", "model.n_head=2"),
    *("--set", "batch_size=4"),
    *("--set", "eval_batches=1"),
    *("--set", "checkpoint_every=2"),
]
DISTRIBUTED = [*TINY, "--runtime", "distributed"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SHIN_DEBUG", None)
    return subprocess.run([*SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _config(args: list[str]):
    """The TrainConfig the script builds from ``args``."""
    return config_from_args(build_parser().parse_args(["train", *args, "--output-dir", "unused"]))


def _partial_run(out: pathlib.Path, args: list[str]):
    """An output directory holding an interrupted run of ``args`` (its manifest; files are added by the caller)."""
    config = _config(args)
    run = open_training_run(config, out)
    run.begin()
    if config.runtime == "distributed":
        run.claim(distributed_files(config))
    return run


def _snapshot(root: pathlib.Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under ``root``."""
    return {
        path.relative_to(root).as_posix(): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


def _assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.match(r"basisrot-pipeline (train|demo): error: ", lines[0]), lines[0]
    for pattern in named:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------- cases
# Each case prepares tmp_path and returns the script's arguments and what its error must name.


def _output_is_a_file(tmp):
    (tmp / "out").write_text("a file")
    return ["train", *TINY, "--output-dir", str(tmp / "out")], [r"'[^']*out' is a file"]


def _output_under_a_file(tmp):
    return ["train", *TINY, "--output-dir", str(tmp / "notes.txt" / "run")], [r"lies under the file '[^']*notes\.txt'"]


def _other_config(tmp):
    _partial_run(tmp / "out", TINY)
    args = ["train", *TINY, "--set", "optim.lr=0.005", "--output-dir", str(tmp / "out")]
    return args, [r"'[^']*out' holds a run with a different config \(differing: optim\.lr: 0\.001 -> 0\.005\)"]


def _overwrite_with_foreign_files(tmp):
    _partial_run(tmp / "out", TINY)
    (tmp / "out" / "mine.txt").write_text("the user's")
    return ["train", *TINY, "--overwrite", "--output-dir", str(tmp / "out")], [r"--overwrite", r"mine\.txt"]


def _bad_value(tmp):
    return ["train", *TINY, "--optimizer", "sgd", "--output-dir", str(tmp / "out")], [r"unknown optimizer 'sgd'"]


def _demo_without_steps(tmp):
    return ["demo", "--steps", "0", "--output-dir", str(tmp / "out")], [r"steps must be >= 1, got 0"]


def _truncated_checkpoint(tmp):
    run = _partial_run(tmp / "out", TINY)
    torch.save({"emulator": {"weights": torch.ones(64, 64)}, "losses": [1.0, 2.0]}, run.file("checkpoint.pt"))
    data = (tmp / "out" / "checkpoint.pt").read_bytes()
    (tmp / "out" / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return ["train", *TINY, "--output-dir", str(tmp / "out")], [r"checkpoint\.pt' is corrupt"]


def _garbage_checkpoint(tmp):
    run = _partial_run(tmp / "out", TINY)
    run.file("checkpoint.pt").write_bytes(b"\x00 not a checkpoint \xff")
    return ["train", *TINY, "--output-dir", str(tmp / "out")], [r"checkpoint\.pt' is corrupt"]


def _garbage_stage_checkpoints(tmp):
    """Each stage process fails to load its file: the parent reports it, and stops the other stage."""
    _partial_run(tmp / "out", DISTRIBUTED)
    _stage_checkpoints(tmp / "out", lambda path: path.write_bytes(b"PK\x03\x04 truncated"))
    return ["train", *DISTRIBUTED, "--output-dir", str(tmp / "out")], [
        r"pipeline stage [01] of 2: .*step_00000002/stage_[01]\.pt' is corrupt"
    ]


def _corrupt_losses(tmp):
    _finished_stages(tmp / "out", lambda path: torch.save({}, path))
    (tmp / "out" / LOSSES_NAME).write_text('{"losses": {"0": ')
    return ["train", *DISTRIBUTED, "--output-dir", str(tmp / "out")], [r"losses\.json' is corrupt .*not valid JSON"]


def _stage_checkpoints(out: pathlib.Path, write) -> None:
    """A checkpoint at step 2 of the DISTRIBUTED run in ``out``: its true settings, stage files by ``write``."""
    config = _config(DISTRIBUTED)
    checkpoints = out / "checkpoints"
    settings = pipeline_job(config, make_batches(config)[0], checkpoints).settings()
    settings_file = checkpoint_settings_path(checkpoints, 2)
    settings_file.parent.mkdir(parents=True)
    settings_file.write_text(json.dumps(settings))
    for stage in range(2):
        write(checkpoint_path(checkpoints, 2, stage))


def _finished_stages(out: pathlib.Path, write) -> None:
    """A DISTRIBUTED run whose stage processes all finished (only the evaluation was left)."""
    _partial_run(out, DISTRIBUTED)
    (out / LOSSES_NAME).write_text(json.dumps({"losses": {str(m): 3.0 for m in range(4)}, "next_backward": 4}))
    for stage in range(2):
        path = final_weights_path(out, stage)
        path.parent.mkdir(exist_ok=True)
        write(path)


CASES = [
    _output_is_a_file,
    _output_under_a_file,
    _other_config,
    _overwrite_with_foreign_files,
    _bad_value,
    _demo_without_steps,
    _truncated_checkpoint,
    _garbage_checkpoint,
    _garbage_stage_checkpoints,
    _corrupt_losses,
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__.strip("_"))
def test_refused_inputs_and_files_give_one_line_and_change_nothing(tmp_path, case):
    (tmp_path / "notes.txt").write_text("the user's notes")  # next to the output directory
    args, named = case(tmp_path)
    before = _snapshot(tmp_path)
    _assert_one_line_error(_cli(*args), *named)
    assert _snapshot(tmp_path) == before  # nothing created (no empty directory either), removed or changed


# ------------------------------------------------------------------------------- crafted pickles


class _TouchOnLoad:
    """Unpickling this calls ``pathlib.Path.touch(marker)``: any code could run in its place."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _crafted(marker: pathlib.Path):
    def write(path: pathlib.Path) -> None:
        torch.save({"stage": _TouchOnLoad(marker), "emulator": _TouchOnLoad(marker), "losses": []}, path)

    return write


def _crafted_emulated_checkpoint(out, write):
    run = _partial_run(out, TINY)
    write(run.file("checkpoint.pt"))
    return TINY, r"checkpoint\.pt"


def _crafted_stage_checkpoints(out, write):
    _partial_run(out, DISTRIBUTED)
    _stage_checkpoints(out, write)
    return DISTRIBUTED, r"pipeline stage [01] of 2: .*step_00000002/stage_[01]\.pt"


def _crafted_final_weights(out, write):
    _finished_stages(out, write)
    return DISTRIBUTED, r"final_weights/stage_0\.pt"


def test_the_crafted_file_would_run_code_without_weights_only(tmp_path):
    """The files of the next test are real attacks: a plain ``torch.load`` runs their code."""
    marker = tmp_path / "pwned"
    _crafted(marker)(tmp_path / "crafted.pt")
    torch.load(tmp_path / "crafted.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "prepare",
    [_crafted_emulated_checkpoint, _crafted_stage_checkpoints, _crafted_final_weights],
    ids=["emulated-checkpoint", "stage-checkpoints", "final-weights"],
)
def test_crafted_pickles_are_refused_without_running(tmp_path, prepare):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    args, file_pattern = prepare(out, _crafted(marker))
    before = _snapshot(tmp_path)
    error = _assert_one_line_error(_cli("train", *args, "--output-dir", str(out)), file_pattern)
    assert "refusing to load" in error
    assert not marker.exists()
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------- Ctrl-C


WAIT_AFTER_FIRST_CHECKPOINT = """
import importlib, sys, time
from basisrot_pipeline.cli import main

train = importlib.import_module("basisrot_pipeline.train")  # the module: the package exports a function `train`

save = train.save_torch_atomic

def save_then_wait(obj, path, *args, **kwargs):
    written = save(obj, path, *args, **kwargs)
    time.sleep(120)
    return written

train.save_torch_atomic = save_then_wait
raise SystemExit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_training_in_one_line_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = ["train", *TINY, "--steps", "200", "--set", "checkpoint_every=5", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SHIN_DEBUG", None)
    # The first checkpoint save pauses, so Ctrl-C always lands mid-run however loaded the machine is.
    process = subprocess.Popen(
        [sys.executable, "-c", WAIT_AFTER_FIRST_CHECKPOINT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not ignored as in a background job
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert stderr.strip() == "basisrot-pipeline train: interrupted; rerun the same command to resume"
    assert not (out / "results.json").exists()

    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert record["metrics"]["resumed_from_step"] >= 5 and len(record["metrics"]["train_losses"]) == 200
    assert json.loads(resumed.stdout)["resumed_from_step"] == record["metrics"]["resumed_from_step"]
    assert record["package"] == {"name": "basisrot-pipeline", "version": __version__}
    assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"])
    assert not (out / "checkpoint.pt").exists()

    finished = (out / "results.json").read_bytes()
    reported = _cli(*args)  # a finished run of the same config: reported, not trained again
    assert reported.returncode == 0 and json.loads(reported.stdout)["already_finished"] is True
    assert (out / "results.json").read_bytes() == finished
