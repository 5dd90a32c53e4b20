"""The run contract through the command line (docs/run-contract.md).

Every refused input or file ends the command with status 2 and ONE line on stderr naming what was
wrong, before any model is pruned, and leaves every file where it was. Crafted pickles (model
weights, checkpoint files) never run. ``--overwrite`` deletes only what recon-prune wrote. Ctrl-C
ends a checkpointed run with status 130 and one line, and the same command resumes it.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rp_models import save_byte_llama

from recon_prune.cli import main

SMALL = ["--nsamples", "4", "--seq-len", "32", "--epochs", "1", "--set", "blocksize=16"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_byte_llama(tmp_path_factory.mktemp("models") / "dense")


@pytest.fixture(scope="module")
def checkpointed(model_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished block-wise run's checkpoint directory and the prune arguments that wrote it."""
    root = tmp_path_factory.mktemp("checkpointed")
    args = ["--model", str(model_dir), "--eval", "none", "--reconstruction", "br", *SMALL]
    args += ["--checkpoint-dir", str(root / "ckpt")]
    assert main(["prune", *args, "--output-dir", str(root / "out")]) == 0
    return root / "ckpt", args


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _one_line_error(capsys, command: str, *, after_model_load: bool = False) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    if after_model_load:  # checkpoint files are checked against the loaded model: its progress bar comes first
        lines = [line for line in lines if not line.startswith("Loading weights")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"recon-prune {command}: error: "), lines[0]
    return lines[0]


class _TouchOnLoad:
    """Unpickling this calls ``pathlib.Path.touch(marker)``: any code could run in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_the_crafted_file_would_run_code_without_weights_only(tmp_path):
    torch.save({"w": _TouchOnLoad(tmp_path / "pwned")}, tmp_path / "crafted.pt")
    torch.load(tmp_path / "crafted.pt", weights_only=False)
    assert (tmp_path / "pwned").exists()


def _copy_model(model_dir: Path, tmp: Path) -> Path:
    copy = tmp / "model"
    copy.mkdir()
    for file in model_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


# Each case prepares tmp (the working directory) and returns (argv, text the error line must contain).
def _output_is_a_file(tmp, model_dir):
    (tmp / "out.txt").write_text("not a directory")
    return ["prune", "--model", str(model_dir), "--output-dir", "out.txt"], "out.txt"


def _output_under_a_file(tmp, model_dir):
    (tmp / "out.txt").write_text("not a directory")
    return ["prune", "--model", str(model_dir), "--output-dir", "out.txt/run"], "out.txt"


def _output_is_the_working_directory(tmp, model_dir):
    return ["prune", "--model", str(model_dir), "--output-dir", "."], "working directory"


def _output_is_the_parent_directory(tmp, model_dir):
    (tmp / "sub").mkdir()
    os.chdir(tmp / "sub")
    return ["prune", "--model", str(model_dir), "--output-dir", "..", "--overwrite"], "'..'"


def _missing_model(tmp, model_dir):
    return [
        "prune",
        "--model",
        "/nonexistent/path",
        "--output-dir",
        "out",
    ], "model directory '/nonexistent/path' does not exist"


def _negative_self_generated(tmp, model_dir):
    return ["prune", "--model", str(model_dir), "--output-dir", "out", "--self-generated", "-1"], "--self-generated"


def _demo_zero_eval_chunks(tmp, model_dir):
    return ["demo", "--output-dir", "out", "--eval-chunks", "0"], "--eval-chunks must be a positive integer, got 0"


def _eval_tasks_without_lm_eval(tmp, model_dir):
    return ["eval", "--model", str(model_dir), "--tasks", "boolq"], "recon-prune[lm-eval]"


def _has_lm_eval() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _truncated_safetensors(tmp, model_dir):
    model = _copy_model(model_dir, tmp)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["prune", "--model", str(model), "--output-dir", "out"], "model.safetensors' is corrupt"


def _garbage_bin_weights(tmp, model_dir):
    model = _copy_model(model_dir, tmp)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x00 not weights \xff" * 4)
    return ["prune", "--model", str(model), "--output-dir", "out"], "pytorch_model.bin' is corrupt"


def _generate_into_a_directory(tmp, model_dir):
    (tmp / "existing").mkdir()
    return ["generate-calibration", "--model", str(model_dir), "--output", "existing", "--overwrite"], (
        "--output 'existing' is a directory; expected a file path"
    )


CASES = [
    _generate_into_a_directory,
    _output_is_a_file,
    _output_under_a_file,
    _output_is_the_working_directory,
    _output_is_the_parent_directory,
    _missing_model,
    _negative_self_generated,
    _demo_zero_eval_chunks,
    _eval_tasks_without_lm_eval,
    _truncated_safetensors,
    _garbage_bin_weights,
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__.strip("_"))
def test_refused_inputs_give_one_line_and_change_nothing(case, model_dir, tmp_path, monkeypatch):
    """Through the console script: stderr is the error line alone, so no model was loaded or pruned
    (its progress bar and per-block log lines would come first) and no perplexity computed."""
    if case is _eval_tasks_without_lm_eval and _has_lm_eval():
        pytest.skip("lm-eval is installed here")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("the user's notes")
    argv, named = case(tmp_path, model_dir)
    before = _snapshot(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SHIN_DEBUG", None)
    argv = [*argv, *SMALL] if argv[0] == "prune" else argv
    result = subprocess.run(
        [sys.executable, "-m", "recon_prune", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"recon-prune {argv[0]}: error: ") and named in lines[0], lines[0]
    assert _snapshot(tmp_path) == before


def test_crafted_model_weights_are_refused_without_running(model_dir, tmp_path, capsys):
    model = _copy_model(model_dir, tmp_path)
    (model / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _TouchOnLoad(tmp_path / "pwned")}, model / "pytorch_model.bin")
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model), "--output-dir", str(out), *SMALL]) == 2
    line = _one_line_error(capsys, "prune")
    assert "pytorch_model.bin" in line and "refusing to load" in line
    assert not (tmp_path / "pwned").exists() and not out.exists()


@pytest.mark.parametrize("damage", ["crafted block file", "truncated block file", "garbage state.json"])
def test_damaged_checkpoints_are_refused_without_running(checkpointed, tmp_path, capsys, damage):
    source, args = checkpointed
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for file in source.iterdir():
        (ckpt / file.name).write_bytes(file.read_bytes())
    args = [a if a != str(source) else str(ckpt) for a in args]
    state = json.loads((ckpt / "state.json").read_text())
    block = ckpt / state["block_files"]["0"]
    if damage == "crafted block file":
        torch.save({"weights": _TouchOnLoad(tmp_path / "pwned"), "masks": {}}, block)
        named = f"refusing to load '{block}'"
    elif damage == "truncated block file":
        block.write_bytes(block.read_bytes()[:100])
        named = f"{block.name}' is corrupt"
    else:
        (ckpt / "state.json").write_text('{"block_files": ')
        named = "state.json' is corrupt"
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["prune", *args, "--output-dir", str(out)]) == 2
    assert named in _one_line_error(capsys, "prune", after_model_load=True)
    assert not (tmp_path / "pwned").exists() and not out.exists()


def test_overwrite_replaces_only_recon_prunes_own_files(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", "--model", str(model_dir), "--output-dir", str(out), "--eval", "none", *SMALL]
    args += ["--reconstruction", "none"]
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["package"]["name"] == "recon-prune"
    assert main(args) == 0  # the same finished run: reported, not recomputed
    assert "already holds this finished prune run" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == first

    capsys.readouterr()
    assert main([*args, "--sparsity", "0.25"]) == 2  # another config: refused, naming the key
    assert "sparsity" in _one_line_error(capsys, "prune")

    assert main([*args, "--sparsity", "0.25", "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["sparsity"] == 0.25

    (out / "model" / "my_notes.txt").write_text("mine")  # a user's file inside the run
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 2
    assert "my_notes.txt" in _one_line_error(capsys, "prune")
    assert (out / "model" / "my_notes.txt").read_text() == "mine" and (out / "results.json").is_file()


def test_a_symlinked_output_directory_is_written_through(model_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    args = ["prune", "--model", str(model_dir), "--output-dir", str(tmp_path / "link"), "--eval", "none", *SMALL]
    args += ["--reconstruction", "none"]
    assert main(args) == 0
    assert main([*args, "--overwrite"]) == 0
    assert (real / "results.json").is_file() and (tmp_path / "link").is_symlink()


def test_ctrl_c_stops_a_checkpointed_prune_in_one_line_and_the_same_command_resumes(tmp_path):
    # about half a second per block: time to interrupt after the first checkpoint
    model = save_byte_llama(tmp_path / "dense", layers=8)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    args = ["prune", "--model", str(model), "--output-dir", str(out), "--eval", "none", "--checkpoint-dir", str(ckpt)]
    args += ["--nsamples", "4", "--seq-len", "32", "--epochs", "30", "--reconstruction", "br"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SHIN_DEBUG", None)
    script = [sys.executable, "-m", "recon_prune", *args]
    # a shell's background job starts with SIGINT ignored; the child needs Python's usual handler
    process = subprocess.Popen(
        script,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not (ckpt / "state.json").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "recon-prune prune: interrupted; rerun the same command to resume"
    assert "Traceback" not in stderr and not (out / "results.json").exists()
    done = json.loads((ckpt / "state.json").read_text())["next_block"]
    assert 1 <= done < 8

    resumed = subprocess.run(script, capture_output=True, text=True, env=env, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint" in resumed.stderr
    record = json.loads((out / "results.json").read_text())
    assert len(record["report"]["block_errors"]) == 8 and record["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)
