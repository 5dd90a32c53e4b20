"""The run contract through the real console script: one-line errors, safe loading, untouched runs.

Every case runs ``python -m sam_overparam`` in a subprocess, as a user would, and checks the exit
status, that stderr is one line naming the offending value or file, and that no file anywhere
under the test directory changed (user files next to and inside the run included).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sam_overparam import cli
from sam_overparam import train as train_lib
from sam_overparam.train import TrainConfig
from shin_common import CorruptFileError, RunDirectory, UnsafeFileError, config_to_dict, load_json, load_torch
from shin_common.rundir import MANIFEST_NAME

SMALL = dict(num_train=200, num_test=200, widths=[16, 5], epochs=2, batch_size=50)
OVERRIDES = [arg for k, v in SMALL.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
ANALYZE_SMALL = ["--num-examples", "64", "--batch-size", "32", "--probes", "2", "--lanczos-steps", "6"]
ANALYZE_SMALL += ["--density-probes", "1"]


class _TouchOnLoad:
    """Unpickling this creates ``marker``: the shape of a crafted checkpoint that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _craft(path: Path, marker: Path) -> None:
    torch.save({"model": _TouchOnLoad(marker), "epoch": 1}, path)


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sam_overparam", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory (None) under ``root``."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-epoch train run (in-process: the subprocess cases copy it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", "--output-dir", str(run_dir), *OVERRIDES]) == 0
    return run_dir


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "notes.txt").write_text("the user's own notes, inside the run directory\n")
    return run_dir


def _partial_run(tmp_path: Path) -> Path:
    """A run directory as an interrupted `train` of OVERRIDES leaves it: manifest unfinished."""
    config = TrainConfig(**SMALL)
    run = RunDirectory(tmp_path / "run", tool="sam-overparam", config=config_to_dict(config), command="train")
    run.begin()
    run.file("config.json").write_text(json.dumps(config_to_dict(config)))
    run.claim(["checkpoint.pt"])  # claimed before the first epoch's checkpoint is written
    return run.path


# Each case prepares tmp_path and returns (argv, text the one error line must contain).
Case = Callable[[Path, Path], tuple[list[str], str]]


def _output_is_a_file(tmp: Path, finished: Path):
    (tmp / "out.txt").write_text("a file, not a directory\n")
    return ["train", "--output-dir", "out.txt", *OVERRIDES], "out.txt"


def _output_under_a_file(tmp: Path, finished: Path):
    (tmp / "blocker").write_text("a file\n")
    return ["train", "--output-dir", "blocker/run", *OVERRIDES], "blocker"


def _train_bad_value(tmp: Path, finished: Path):
    return ["train", "--output-dir", "new", *OVERRIDES, "--set", "rho=-1"], "rho=-1.0"


def _demo_bad_value(tmp: Path, finished: Path):
    return ["demo", "--quick", "--output-dir", "new", "--rho", "-1"], "rho=-1.0"


def _rerun_with_other_config(tmp: Path, finished: Path):
    _copy_run(finished, tmp)
    return ["train", "--output-dir", "run", *OVERRIDES, "--set", "rho=0.5"], "differing: rho"


def _resume_crafted_checkpoint(tmp: Path, finished: Path):
    _craft(_partial_run(tmp) / "checkpoint.pt", tmp / "marker")
    return ["train", "--output-dir", "run", *OVERRIDES], "checkpoint.pt"


def _resume_truncated_checkpoint(tmp: Path, finished: Path):
    data = (finished / "checkpoint.pt").read_bytes()
    (_partial_run(tmp) / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return ["train", "--output-dir", "run", *OVERRIDES], "checkpoint.pt"


def _analyze_crafted_model(tmp: Path, finished: Path):
    _craft(_copy_run(finished, tmp) / "model.pt", tmp / "marker")
    return ["analyze", "--run-dir", "run", *ANALYZE_SMALL], "model.pt"


def _analyze_truncated_model(tmp: Path, finished: Path):
    model = _copy_run(finished, tmp) / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    return ["analyze", "--run-dir", "run", *ANALYZE_SMALL], "model.pt"


def _analyze_garbage_model(tmp: Path, finished: Path):
    (_copy_run(finished, tmp) / "model.pt").write_bytes(b"\x00garbage, not a checkpoint" * 20)
    return ["analyze", "--run-dir", "run", *ANALYZE_SMALL], "model.pt"


def _analyze_edited_config(tmp: Path, finished: Path):
    # what a refused rerun used to leave behind: config.json no longer the trained config
    config = _copy_run(finished, tmp) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rho": 0.5}))
    return ["analyze", "--run-dir", "run", *ANALYZE_SMALL], "config.json"


def _analyze_missing_run(tmp: Path, finished: Path):
    return ["analyze", "--run-dir", "nowhere", *ANALYZE_SMALL], "nowhere"


def _analyze_output_under_a_file(tmp: Path, finished: Path):
    _copy_run(finished, tmp)
    (tmp / "blocker").write_text("a file\n")
    return ["analyze", "--run-dir", "run", "--output-dir", "blocker/analysis", *ANALYZE_SMALL], "blocker"


CASES: dict[str, Case] = {
    "train: output is a file": _output_is_a_file,
    "train: output under a file": _output_under_a_file,
    "train: bad value leaves no directory": _train_bad_value,
    "demo: bad value leaves no directory": _demo_bad_value,
    "train: finished run, other config": _rerun_with_other_config,
    "train: crafted checkpoint.pt": _resume_crafted_checkpoint,
    "train: truncated checkpoint.pt": _resume_truncated_checkpoint,
    "analyze: crafted model.pt": _analyze_crafted_model,
    "analyze: truncated model.pt": _analyze_truncated_model,
    "analyze: garbage model.pt": _analyze_garbage_model,
    "analyze: config.json disagrees with the run": _analyze_edited_config,
    "analyze: run directory missing": _analyze_missing_run,
    "analyze: output under a file": _analyze_output_under_a_file,
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_refused_with_one_line_and_nothing_changed(case, finished_run, tmp_path):
    (tmp_path / "notes.txt").write_text("the user's own notes, next to the run\n")
    argv, named = CASES[case](tmp_path, finished_run)
    before = _snapshot(tmp_path)
    result = _cli(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sam-overparam {argv[0]}: error: ") and named in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert _snapshot(tmp_path) == before  # not a byte changed, no directory created
    assert not (tmp_path / "marker").exists()  # the crafted pickle's code never ran


def test_crafted_file_would_run_code_when_unpickled(tmp_path):
    """The payload used above is real: loaded the old way (weights_only=False) it runs."""
    _craft(tmp_path / "probe.pt", tmp_path / "marker")
    with pytest.raises(UnsafeFileError, match=r"probe\.pt"):
        load_torch(tmp_path / "probe.pt")
    assert not (tmp_path / "marker").exists()
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other model", "not a checkpoint"])
def test_train_names_a_checkpoint_that_does_not_fit(tmp_path, damage, finished_run):
    path = tmp_path / "checkpoint.pt"
    data = (finished_run / "checkpoint.pt").read_bytes()
    if damage == "garbage":
        path.write_bytes(b"garbage" * 50)
    elif damage == "truncated":
        path.write_bytes(data[:-200])
    elif damage == "other model":
        state = load_torch(finished_run / "checkpoint.pt")
        state["model"] = {"layer.weight": torch.zeros(2, 2)}
        torch.save(state, path)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CorruptFileError, match=r"checkpoint\.pt") as info:
        train_lib.train(TrainConfig(**SMALL), checkpoint=path)
    assert "\n" not in str(info.value)


def test_sigint_exits_130_and_rerun_resumes_to_the_uninterrupted_result(tmp_path):
    config = TrainConfig(**{**SMALL, "epochs": 120})
    argv = ["train", "--output-dir", "run", *OVERRIDES, "--set", "epochs=120"]
    (tmp_path / "notes.txt").write_text("keep me\n")
    # SIGINT may be ignored in a background shell; the child must get Python's usual handler
    process = subprocess.Popen(
        [sys.executable, "-m", "sam_overparam", *argv],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip() == "sam-overparam train: interrupted; rerun the same command to resume"
    stopped_at = load_torch(checkpoint)["epoch"]
    assert 1 <= stopped_at < config.epochs
    assert not load_json(tmp_path / "run" / MANIFEST_NAME)["finished"]

    resumed = _cli(*argv, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr and "Traceback" not in resumed.stderr
    metrics = load_json(tmp_path / "run" / "results.json")["metrics"]
    _, reference = train_lib.train(config)
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, config.epochs + 1))
    for got, want in zip(metrics["history"], reference["history"], strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert metrics["best_epoch"] == reference["best_epoch"]
    assert metrics["final_test"] == pytest.approx(reference["final_test"])

    # the finished run is now reported, not recomputed, and not a byte changes
    before = _snapshot(tmp_path)
    again = _cli(*argv, cwd=tmp_path)
    assert again.returncode == 0 and "nothing recomputed" in again.stdout, again.stderr
    assert _snapshot(tmp_path) == before
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_analyze_attaches_to_the_train_run_and_reports_a_finished_analysis(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert cli.main(["analyze", "--run-dir", str(run_dir), *ANALYZE_SMALL]) == 0
    manifest = load_json(run_dir / MANIFEST_NAME)
    assert manifest["finished"] and manifest["results"] == "results.json"
    assert {"analysis.json", "spectral_density.png"} <= set(manifest["files"])
    record = load_json(run_dir / "analysis.json")
    assert record["package"]["name"] == "sam-overparam"
    # stability is computed at the lr of the trained run's last epoch and its rho, read from what train wrote
    trained = load_json(run_dir / "results.json")["config"]
    assert record["metrics"]["stability_lr"] == train_lib.final_lr(TrainConfig(**trained))
    assert record["metrics"]["initial_lr"] == trained["lr"]
    assert record["metrics"]["stability_rho"] == trained["rho"]
    capsys.readouterr()

    before = _snapshot(run_dir)
    assert cli.main(["analyze", "--run-dir", str(run_dir), *ANALYZE_SMALL]) == 0
    assert "nothing recomputed" in capsys.readouterr().out
    assert _snapshot(run_dir) == before
    # other settings: refused (naming them) unless --overwrite, which replaces only the analysis
    assert cli.main(["analyze", "--run-dir", str(run_dir), *ANALYZE_SMALL, "--probes", "3"]) == 2
    assert "analysis.probes" in capsys.readouterr().err
    assert _snapshot(run_dir) == before
    assert cli.main(["analyze", "--run-dir", str(run_dir), *ANALYZE_SMALL, "--probes", "3", "--overwrite"]) == 0
    assert load_json(run_dir / "analysis.json")["config"]["analysis"]["probes"] == 3
    for name in ("model.pt", "results.json", "checkpoint.pt", "config.json"):
        assert (run_dir / name).read_bytes() == before[name]

    # a separate --output-dir is a run directory of its own
    out = tmp_path / "analysis"
    train_run_before = _snapshot(run_dir)
    assert cli.main(["analyze", "--run-dir", str(run_dir), "--output-dir", str(out), *ANALYZE_SMALL]) == 0
    separate = load_json(out / MANIFEST_NAME)
    assert separate["command"] == "analyze" and separate["finished"]
    assert separate["config"]["train"] == load_json(run_dir / MANIFEST_NAME)["config"]
    assert load_json(out / "results.json")["package"]["name"] == "sam-overparam"
    assert _snapshot(run_dir) == train_run_before  # nothing of it went into the train run
