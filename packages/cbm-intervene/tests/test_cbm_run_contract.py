"""The run contract through the real console script: output directories, one-line errors, safe
loading, Ctrl-C and resume (docs/run-contract.md).

Every subprocess pays for importing torch (a few seconds), so each fault has one subprocess case
and its variants run in-process through ``main`` (the function the console script calls).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cbm_tiny import TINY

from cbm_intervene.cli import main
from cbm_intervene.data import save_predictions
from cbm_intervene.models import TargetModelSpec

MANIFEST = ".run-manifest.json"


class _TouchOnLoad:
    """Unpickling this would create ``marker``: the shape of a crafted file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def train_argv(out: Path, strategy: str = "JNT", *extra: str) -> list[str]:
    sets = [a for kv in TINY for a in ("--set", kv)]
    return ["train", "--output-dir", str(out), *sets, "--set", f"train.strategy={strategy}", *extra]


def cli(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The console script in a fresh process; INFO logs off, so stderr holds only the error."""
    env = {**os.environ, "SHIN_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "cbm_intervene", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file (content and mtime) and directory under ``root``: what a refused command must not touch."""
    state: dict[str, tuple[bytes, int] | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        state[rel] = None if path.is_dir() else (path.read_bytes(), path.stat().st_mtime_ns)
    return state


def assert_one_line_error(stderr: str, *expected: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for text in expected:
        assert text in lines[0], lines[0]


def mark_unfinished(run: Path) -> None:
    """As a run interrupted after writing these files would have left its manifest."""
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["finished"] = False
    (run / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def finished_train_run(tmp_path_factory) -> Path:
    """A finished tiny JNT training run (made once; tests work on copies)."""
    out = tmp_path_factory.mktemp("train") / "run"
    assert main(train_argv(out)) == 0
    return out


@dataclass
class Case:
    tmp: Path
    train_run: Path
    predictions_factory: Callable

    def predictions(self, suffix: str = ".pt") -> Path:
        spec = TargetModelSpec(n_concepts=6, n_classes=4)
        target = spec.build()
        return save_predictions(
            self.tmp / f"p{suffix}", self.predictions_factory("prob"), target_model=target, target_spec=spec
        )

    def intervene(self, predictions: Path, *extra: str) -> list[str]:
        out = self.tmp / "tti"
        return ["intervene", "--predictions", str(predictions), "--output-dir", str(out), "--no-plot", *extra]

    def run_copy(self) -> Path:
        return Path(shutil.copytree(self.train_run, self.tmp / "run"))


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _craft_checkpoint(case: Case, name: str) -> list[str]:
    run = case.run_copy()
    mark_unfinished(run)
    if name != "cbm.pt":  # resuming from a stage's progress file: training had not finished
        (run / "checkpoints" / "cbm.pt").unlink()
    torch.save({"state_dict": _TouchOnLoad(case.tmp / "marker")}, run / "checkpoints" / name)
    return train_argv(run)


def _crafted_predictions(case: Case) -> list[str]:
    path = case.tmp / "p.pt"
    torch.save({"meta": _TouchOnLoad(case.tmp / "marker"), "arrays": {}}, path)
    return case.intervene(path)


def _crafted_npz(case: Case) -> list[str]:
    path = case.tmp / "p.npz"
    np.savez(path, __meta__=np.array([_TouchOnLoad(case.tmp / "marker")], dtype=object), values=np.zeros((2, 2)))
    return case.intervene(path)


def _truncated_checkpoint(case: Case) -> list[str]:
    run = case.run_copy()
    mark_unfinished(run)
    _truncate(run / "checkpoints" / "cbm.pt")
    return train_argv(run)


# id -> (setup returning argv, what stderr must name)
ERROR_CASES: dict[str, tuple[Callable[[Case], list[str]], list[str]]] = {
    "predictions-pt-truncated": (lambda c: c.intervene(_truncate(c.predictions(".pt"))), ["p.pt", "corrupt"]),
    "predictions-npz-truncated": (lambda c: c.intervene(_truncate(c.predictions(".npz"))), ["p.npz", "corrupt"]),
    "predictions-pt-crafted-pickle": (_crafted_predictions, ["p.pt", "refusing to load"]),
    "predictions-npz-object-array": (_crafted_npz, ["p.npz", "refusing to load"]),
    "budgets-negative": (lambda c: c.intervene(c.predictions(), "--budgets", "-5"), ["--budgets -5", ">= 0"]),
    "target-error-above-one": (
        lambda c: c.intervene(c.predictions(), "--target-error", "2"),
        ["--target-error 2", "[0, 1]"],
    ),
    "output-is-a-file": (
        lambda c: ["intervene", "--predictions", str(c.predictions()), "--output-dir", str(c.tmp / "notes.txt")],
        ["notes.txt", "is a file"],
    ),
    "output-under-a-file": (lambda c: train_argv(c.tmp / "notes.txt" / "run"), ["notes.txt", "lies under the file"]),
    "train-other-strategy": (lambda c: train_argv(c.run_copy(), "IND"), ["differing: train.strategy", "--overwrite"]),
    "checkpoint-crafted-pickle": (lambda c: _craft_checkpoint(c, "cbm.pt"), ["cbm.pt", "refusing to load"]),
    "progress-crafted-pickle": (
        lambda c: _craft_checkpoint(c, "joint_model.progress.pt"),
        ["joint_model.progress.pt", "refusing to load"],
    ),
    "checkpoint-truncated": (_truncated_checkpoint, ["cbm.pt", "corrupt"]),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_refused_commands_end_in_one_line_and_touch_nothing(name, tmp_path, finished_train_run, predictions_factory):
    setup, expected = ERROR_CASES[name]
    (tmp_path / "notes.txt").write_text("the user's own notes\n")
    argv = setup(Case(tmp_path, finished_train_run, predictions_factory))
    if (tmp_path / "run").is_dir():
        (tmp_path / "run" / "notes.txt").write_text("notes inside the run directory\n")
    before = snapshot(tmp_path)
    result = cli(argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, *expected)
    assert not (tmp_path / "marker").exists()  # a crafted file was refused, not unpickled
    assert snapshot(tmp_path) == before  # no output directory made, no file written or removed


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--n-samples", "0"], "--n-samples 0 is out of range; expected an integer >= 1"),
        (["--max-steps", "-1"], "--max-steps -1"),
        (["--seeds", "0", "-1"], "--seeds -1"),
        (["--tau-i", "-1"], "--tau-i -1"),
        (["--tau-g", "nan"], "--tau-g nan"),
        (["--tau-f", "inf"], "--tau-f inf"),
        (["--budgets", "5", "nan"], "--budgets nan"),
        (["--target-error", "-0.1"], "--target-error -0.1"),
        (["--criteria", "NOPE"], "unknown criterion 'NOPE'"),
    ],
)
def test_every_numeric_intervene_flag_is_checked_before_any_work(
    extra, expected, tmp_path, predictions_factory, finished_train_run, capsys
):
    case = Case(tmp_path, finished_train_run, predictions_factory)
    assert main(case.intervene(case.predictions(), *extra)) == 2
    assert_one_line_error(capsys.readouterr().err, "cbm-intervene intervene: error:", expected)
    assert not (tmp_path / "tti").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--target-error", "2"], "--target-error 2"),
        (["--noise-std", "-1"], "--noise-std -1"),
        (["--seed", "-3"], "--seed -3"),
        (["--seeds", "-1"], "--seeds -1"),
    ],
)
def test_demo_flags_are_checked_before_any_work(extra, expected, tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--quick", "--no-plot", *extra]) == 2
    assert_one_line_error(capsys.readouterr().err, "cbm-intervene demo: error:", expected)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("damage", ["garbage", "missing-target"])
def test_unusable_predictions_files_are_named(damage, tmp_path, predictions_factory, capsys):
    path = tmp_path / "p.pt"
    if damage == "garbage":
        path.write_bytes(b"not a predictions file" * 10)
    else:  # a valid file without the f that intervention needs
        save_predictions(path, predictions_factory("prob"))
    assert main(["intervene", "--predictions", str(path), "--output-dir", str(tmp_path / "tti")]) == 2
    expected = "corrupt" if damage == "garbage" else "holds no target model"
    assert_one_line_error(capsys.readouterr().err, "p.pt", expected)
    assert not (tmp_path / "tti").exists()


def test_overwrite_is_refused_while_the_directory_holds_the_users_files(tmp_path, finished_train_run, capsys):
    run = Path(shutil.copytree(finished_train_run, tmp_path / "run"))
    (run / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    assert main(train_argv(run, "IND", "--overwrite")) == 2
    assert_one_line_error(capsys.readouterr().err, "notes.txt", "--overwrite deletes only")
    assert snapshot(tmp_path) == before


def test_finished_run_is_reported_and_overwrite_replaces_only_its_own_files(tmp_path, finished_train_run):
    run = Path(shutil.copytree(finished_train_run, tmp_path / "run"))
    (tmp_path / "notes.txt").write_text("next to the run\n")
    before = snapshot(tmp_path)
    same = cli(train_argv(run), cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert "nothing recomputed" in same.stdout and "trained JNT: test task error" in same.stdout
    assert snapshot(tmp_path) == before  # not recomputed: no file rewritten

    replaced = cli(train_argv(run, "IND", "--overwrite"), cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    record = json.loads((run / "results.json").read_text())
    assert record["config"]["train"]["strategy"] == "IND"
    assert record["package"]["name"] == "cbm-intervene" and "git" in record
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    # the JNT run's stage files are gone, not mixed in with the IND run's
    assert left == sorted(
        ["cbm.pt", "concept_model.pt", "concept_model.progress.pt", "target_model.pt", "target_model.progress.pt"]
    )
    assert (tmp_path / "notes.txt").read_text() == "next to the run\n"
    assert "joint_model.pt" not in json.dumps(json.loads((run / MANIFEST).read_text())["files"])


# The command line, except that training waits after writing its first progress file: Ctrl-C then
# always arrives mid-training, however fast the remaining epochs would run or however late the
# signal is sent (without the wait, a loaded machine could let training finish first).
WAIT_AFTER_FIRST_PROGRESS = """
import sys, time
import cbm_intervene.models as models
from cbm_intervene.cli import main

save = models.save_torch_atomic

def save_then_wait(obj, path, *args, **kwargs):
    written = save(obj, path, *args, **kwargs)
    if str(path).endswith(models.PROGRESS_SUFFIX):
        time.sleep(120)
    return written

models.save_torch_atomic = save_then_wait
raise SystemExit(main(sys.argv[1:]))
"""


def test_ctrl_c_ends_train_in_one_line_and_a_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    argv = train_argv(run, "JNT", "--set", "train.max_epochs=300", "--set", "train.patience=300")
    env = {**os.environ, "SHIN_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(
        [sys.executable, "-c", WAIT_AFTER_FIRST_PROGRESS, *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not ignored as in a background job
    )
    progress = run / "checkpoints" / "joint_model.progress.pt"
    deadline = time.monotonic() + 90
    while not progress.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert progress.exists(), "training never wrote its progress file"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert_one_line_error(stderr, "cbm-intervene train: interrupted; rerun the same command to resume")
    assert not json.loads((run / MANIFEST).read_text())["finished"]
    assert not (run / "results.json").exists()
    assert not [p.name for p in run.rglob("*.tmp")]  # nothing half-written left behind

    rerun = cli(argv, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    record = json.loads((run / "results.json").read_text())
    assert record["resumed"] is True and len(record["history"]["joint"]) == 300
    assert json.loads((run / MANIFEST).read_text())["finished"]
