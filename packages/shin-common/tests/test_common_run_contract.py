"""The run contract: output directories, safe loading and the one-line command runner."""

import argparse
import json
import os
import pathlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from shin_common import (
    ConfigMismatchError,
    CorruptFileError,
    MissingExtraError,
    OutputDirectoryError,
    RunDirectory,
    UnsafeFileError,
    config_changes,
    config_differences,
    load_json,
    load_npz,
    load_torch,
    provenance,
    require_extra,
    run_command,
    save_torch_atomic,
)
from shin_common.rundir import MANIFEST_NAME


class _TouchOnLoad:
    """Unpickling this would create ``marker``: the shape of a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# ---------------------------------------------------------------------------- loading
def test_load_torch_refuses_a_crafted_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state": _TouchOnLoad(str(marker))}, tmp_path / "checkpoint.pt")
    with pytest.raises(UnsafeFileError, match=r"checkpoint\.pt"):
        load_torch(tmp_path / "checkpoint.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "truncate_large", "garbage", "empty"])
def test_load_torch_names_a_corrupt_file(tmp_path, damage):
    path = tmp_path / "model.pt"
    # a large tensor truncated mid-record fails in torch's zip reader with an OSError, a small one earlier
    torch.save({"w": torch.ones(4096 if damage == "truncate_large" else 100)}, path)
    data = path.read_bytes()
    damaged = {"garbage": b"not a checkpoint" * 8, "empty": b""}.get(damage, data[: len(data) // 2])
    path.write_bytes(damaged)
    with pytest.raises(CorruptFileError, match=r"model\.pt") as info:
        load_torch(path)
    assert "\n" not in str(info.value)


def test_load_torch_round_trips_what_save_torch_atomic_wrote(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 3, "history": [{"loss": 0.5}]}
    save_torch_atomic(state, tmp_path / "sub" / "state.pt")
    loaded = load_torch(tmp_path / "sub" / "state.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3 and loaded["history"] == [{"loss": 0.5}]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["state.pt"]  # no temporary left


def test_save_torch_atomic_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "state.pt"
    save_torch_atomic({"v": 1}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_torch_atomic({"v": lambda: None}, path)  # lambdas cannot be pickled
    assert load_torch(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_load_npz_refuses_object_arrays_and_names_garbage(tmp_path):
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(UnsafeFileError, match=r"objects\.npz"):
        load_npz(tmp_path / "objects.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(CorruptFileError, match=r"bad\.npz"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "ok.npz", a=np.arange(3))
    assert load_npz(tmp_path / "ok.npz")["a"].tolist() == [0, 1, 2]


def test_load_json_names_a_torn_file(tmp_path):
    (tmp_path / "state.json").write_text('{"a": 1', encoding="utf-8")
    with pytest.raises(CorruptFileError, match=r"state\.json"):
        load_json(tmp_path / "state.json")


def test_require_extra_says_how_to_install():
    assert require_extra("json", install="x", purpose="y") is json
    with pytest.raises(MissingExtraError, match=r"pip install 'recon-prune\[lm-eval\]'"):
        require_extra("no_such_module_here", install="recon-prune[lm-eval]", purpose="--tasks")


# ---------------------------------------------------------------------------- output paths
@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (".", "working directory"),
        ("..", "contains the working directory"),
        ("/", "filesystem root"),
        ("~", "home directory"),
        ("afile", "is a file"),
        ("afile/sub", "lies under the file"),
        ("", "empty"),
    ],
)
def test_forbidden_output_paths(in_tmp, given, expected):
    (in_tmp / "afile").write_text("x")
    with pytest.raises(OutputDirectoryError, match=expected):
        RunDirectory(given, tool="t", config={})


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_directory(in_tmp):
    locked = in_tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputDirectoryError, match="permission denied"):
            RunDirectory(locked / "run", tool="t", config={})
    finally:
        locked.chmod(0o755)


def test_unwritable_output_directory_as_the_system_reports_it(in_tmp, monkeypatch):
    """The same check where the tests run as root (who may write anywhere): access() says no."""
    locked = (in_tmp / "locked").resolve()
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    with pytest.raises(OutputDirectoryError, match="cannot be created in"):
        RunDirectory(locked / "run", tool="t", config={})
    with pytest.raises(OutputDirectoryError, match="cannot be written"):
        RunDirectory(locked, tool="t", config={})


def test_validation_creates_nothing(in_tmp):
    RunDirectory("deep/new/run", tool="t", config={"a": 1})
    assert not (in_tmp / "deep").exists()


def test_symlinked_directory_is_its_target(in_tmp):
    (in_tmp / "real").mkdir()
    (in_tmp / "link").symlink_to(in_tmp / "real")
    run = RunDirectory("link", tool="t", config={})
    run.begin()
    run.file("a.txt").write_text("x")
    assert run.path == (in_tmp / "real").resolve()
    assert (in_tmp / "real" / "a.txt").is_file()
    again = RunDirectory("link", tool="t", config={}, overwrite=True)
    again.begin()
    assert (in_tmp / "link").is_symlink() and not (in_tmp / "real" / "a.txt").exists()


# ---------------------------------------------------------------------------- manifest rules
def _finished_run(path, config=None):
    run = RunDirectory(path, tool="t", config=config or {"lr": 0.1, "opt": {"rho": 0.05}}, command="train")
    run.begin()
    run.file("checkpoint.pt").write_bytes(b"ckpt")
    (run.path / "model").mkdir()
    (run.path / "model" / "weights.bin").write_bytes(b"w")
    run.claim_tree("model")
    run.finish(metrics={"acc": 0.9}, seed=1)
    return run


def _snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_finished_run_with_the_same_config_is_reported(in_tmp):
    _finished_run("out")
    again = RunDirectory("out", tool="t", config={"lr": 0.1, "opt": {"rho": 0.05}}, command="train")
    assert again.finished and not again.resuming
    results = again.results()
    assert results["metrics"] == {"acc": 0.9} and results["seed"] == 1


def test_different_config_is_refused_naming_keys_and_nothing_changes(in_tmp):
    _finished_run("out")
    before = _snapshot(in_tmp / "out")
    with pytest.raises(ConfigMismatchError, match=r"differing: opt\.rho: 0\.05 -> 0\.5\)") as info:
        RunDirectory("out", tool="t", config={"lr": 0.1, "opt": {"rho": 0.5}}, command="train")
    assert info.value.keys == ["opt.rho"]
    assert len(str(info.value).splitlines()) == 1
    assert _snapshot(in_tmp / "out") == before


def test_another_tool_or_command_is_refused(in_tmp):
    _finished_run("out")
    with pytest.raises(OutputDirectoryError, match="holds a run of 't'"):
        RunDirectory("out", tool="other", config={"lr": 0.1, "opt": {"rho": 0.05}})
    with pytest.raises(ConfigMismatchError, match="differing: command: 'train' -> 'demo'"):
        RunDirectory("out", tool="t", config={"lr": 0.1, "opt": {"rho": 0.05}}, command="demo")


def test_unfinished_run_resumes(in_tmp):
    run = RunDirectory("out", tool="t", config={"a": 1})
    run.begin()
    run.file("checkpoint.pt").write_bytes(b"x")
    again = RunDirectory("out", tool="t", config={"a": 1})
    assert again.resuming and not again.finished
    again.begin()
    assert (in_tmp / "out" / "checkpoint.pt").read_bytes() == b"x"


def test_directory_with_foreign_files_is_refused_without_manifest(in_tmp):
    (in_tmp / "out").mkdir()
    (in_tmp / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirectoryError, match=r"notes\.txt"):
        RunDirectory("out", tool="t", config={})
    RunDirectory("empty", tool="t", config={})  # an empty or missing directory is fine


def test_overwrite_deletes_only_own_files(in_tmp):
    _finished_run("out")
    (in_tmp / "out" / ".checkpoint.pt.0123abcd.tmp").write_bytes(b"torn")  # left by a killed atomic write
    run = RunDirectory("out", tool="t", config={"lr": 1.0}, overwrite=True, command="train")
    assert not run.finished
    run.begin()
    assert sorted(p.name for p in (in_tmp / "out").iterdir()) == [MANIFEST_NAME]
    manifest = json.loads((in_tmp / "out" / MANIFEST_NAME).read_text())
    assert manifest["files"] == [] and manifest["config"] == {"lr": 1.0}


def test_overwrite_is_refused_while_foreign_files_are_present(in_tmp):
    _finished_run("out")
    (in_tmp / "out" / "model" / "notes.txt").write_text("mine")
    before = _snapshot(in_tmp / "out")
    with pytest.raises(OutputDirectoryError, match=r"model/notes\.txt"):
        RunDirectory("out", tool="t", config={}, overwrite=True, command="train")
    assert _snapshot(in_tmp / "out") == before


def test_a_manifest_cannot_point_outside_the_directory(in_tmp):
    (in_tmp / "victim.txt").write_text("keep")
    (in_tmp / "out").mkdir()
    manifest = {"tool": "t", "config": {}, "files": ["../victim.txt"], "finished": True}
    (in_tmp / "out" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="not a path inside"):
        RunDirectory("out", tool="t", config={}, overwrite=True).begin()
    assert (in_tmp / "victim.txt").read_text() == "keep"


def test_config_differences_names_nested_added_and_removed_keys():
    old = {"a": 1, "b": {"c": 2, "d": 3}, "gone": 0}
    new = {"a": 1, "b": {"c": 2, "d": 4}, "added": 0}
    assert config_differences(old, new) == ["added", "b.d", "gone"]
    assert config_differences({"x": float("nan")}, {"x": None}) == []  # both are null in records
    assert config_changes(old, new) == ["added: <absent> -> 0", "b.d: 3 -> 4", "gone: 0 -> <absent>"]


def test_config_changes_shorten_long_values_and_compare_tuples_as_lists():
    long_hash = "f" * 64
    (change,) = config_changes({"sha": long_hash}, {"sha": "0" * 64})
    assert change.startswith("sha: 'fff") and change.count("...") == 2 and len(change) < 100
    assert config_changes({"dims": (1, 2)}, {"dims": [1, 2]}) == []  # records store tuples as lists


def test_results_record_the_writing_package(in_tmp):
    record = provenance(package="shin-common")
    assert record["package"]["name"] == "shin-common" and record["package"]["version"]
    assert record["versions"]["shin-common"] == record["package"]["version"]


# ---------------------------------------------------------------------------- runner
def _parser():
    parser = argparse.ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command")
    go = sub.add_parser("go")
    go.add_argument("--what", default="ok")
    return parser


def _handler(args):
    if args.what == "value":
        raise ValueError("--budgets -5: expected a non-negative integer\n(more detail)")
    if args.what == "file":
        raise CorruptFileError("x.pt", "truncated")
    if args.what == "missing":
        raise FileNotFoundError(2, "No such file or directory", "nope.pt")
    if args.what == "extra":
        raise MissingExtraError("lm_eval", "recon-prune[lm-eval]", "--tasks")
    if args.what == "interrupt":
        raise KeyboardInterrupt
    if args.what == "bug":
        raise KeyError("bug")
    return 0


@pytest.mark.parametrize(
    ("what", "code", "expected"),
    [
        ("value", 2, "tool go: error: --budgets -5: expected a non-negative integer (more detail)"),
        ("file", 2, "tool go: error: 'x.pt' is corrupt"),
        ("missing", 2, "tool go: error: [Errno 2] No such file or directory: 'nope.pt'"),
        ("extra", 2, "tool go: error: --tasks needs lm_eval"),
        ("interrupt", 130, "tool go: interrupted"),
    ],
)
def test_known_errors_are_one_line(capsys, what, code, expected):
    assert run_command(_parser(), {"go": _handler}, ["go", "--what", what]) == code
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err


def test_interrupt_says_resume_only_for_resumable_commands(capsys):
    run_command(_parser(), {"go": _handler}, ["go", "--what", "interrupt"], resumable={"go"})
    assert capsys.readouterr().err == "tool go: interrupted; rerun the same command to resume\n"


def test_debug_shows_the_traceback_and_bugs_keep_theirs(monkeypatch):
    with pytest.raises(ValueError):
        run_command(_parser(), {"go": _handler}, ["go", "--what", "value", "--debug"])
    monkeypatch.setenv("SHIN_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        run_command(_parser(), {"go": _handler}, ["go", "--what", "interrupt"])
    monkeypatch.delenv("SHIN_DEBUG")
    with pytest.raises(KeyError):
        run_command(_parser(), {"go": _handler}, ["go", "--what", "bug"])


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        run_command(_parser(), {"go": _handler}, ["go", "--nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "tool: error: unrecognized arguments: --nope (see tool --help)\n"


def test_no_command_prints_help(capsys):
    assert run_command(_parser(), {"go": _handler}, []) == 0
    assert "usage: tool" in capsys.readouterr().out
