import dataclasses
import enum
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from shin_common import JsonlStore, read_json, record_key, write_json_atomic, write_run_record
from shin_common.records import to_jsonable


@dataclasses.dataclass
class Cfg:
    lr: float = 0.1
    path: Path = Path("x")


class Mode(enum.Enum):
    FAST = "fast"


def test_run_record_has_provenance(tmp_path):
    record = write_run_record(tmp_path / "run.json", config=Cfg(), metrics={"acc": np.float32(0.5)}, seed=3)
    saved = read_json(tmp_path / "run.json")
    assert saved == json.loads(json.dumps(record))
    assert saved["config"] == {"lr": 0.1, "path": "x"}
    assert saved["metrics"] == {"acc": 0.5}
    assert saved["seed"] == 3
    assert saved["versions"]["torch"] == torch.__version__.split("+")[0] or saved["versions"]["torch"]
    assert saved["versions"]["shin-common"] is not None
    assert {"hostname", "platform", "cpu_count"} <= set(saved["host"])
    assert "git" in saved and "created" in saved


def test_git_revision_inside_a_repository(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("x")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "-C", str(tmp_path), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "commit", "-qm", "m"], check=True, env={**os.environ, **env})
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    monkeypatch.chdir(tmp_path)
    record = write_run_record(tmp_path / "r.json", config={}, metrics={})
    assert record["git"] == {"commit": head.strip(), "dirty": False}
    (tmp_path / "f").write_text("changed")
    assert write_run_record(tmp_path / "r.json", config={}, metrics={})["git"]["dirty"] is True


def test_to_jsonable_handles_common_types():
    value = {"t": torch.tensor([1.0, 2.0]), "n": np.int64(3), "e": Mode.FAST, "s": {2, 1}, "nan": float("nan")}
    assert to_jsonable(value) == {"t": [1.0, 2.0], "n": 3, "e": "fast", "s": [1, 2], "nan": None}


def test_atomic_write_keeps_old_file_when_serialisation_fails(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"version": 1})

    class Exploding:
        def tolist(self):
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash while writing"):
        write_json_atomic(target, {"version": 2, "bad": Exploding()})
    assert read_json(target) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left behind


def test_atomic_write_survives_a_killed_process(tmp_path):
    """A process killed between writing the temp file and the rename leaves the old file intact."""
    target = tmp_path / "out.json"
    write_json_atomic(target, {"version": 1})
    script = textwrap.dedent(
        f"""
        import os
        import shin_common.records as records
        def die(src, dst):
            os._exit(9)   # simulated crash: the temporary file is written, the rename never happens
        records.os.replace = die
        records.write_json_atomic({str(target)!r}, {{"version": 2, "payload": "x" * 100000}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == 9
    assert read_json(target) == {"version": 1}


def test_jsonl_store_resume_skips_finished_runs(tmp_path):
    store = JsonlStore(tmp_path / "sweep.jsonl")
    grid = [{"width": w, "seed": s} for w in (8, 16) for s in (0, 1)]
    ran = []

    def sweep(stop_after=None):
        for i, cfg in enumerate(grid):
            if store.is_complete(cfg):
                continue
            if stop_after is not None and i >= stop_after:
                return
            ran.append(cfg)
            store.append(cfg, {"metrics": {"loss": cfg["width"] * 0.1 + cfg["seed"]}})

    sweep(stop_after=2)  # killed after two runs
    assert len(ran) == 2
    sweep()  # resumed
    assert ran == grid  # every run done exactly once
    assert {r["key"] for r in store.records()} == {record_key(c) for c in grid}
    assert store.get({"seed": 1, "width": 16})["metrics"]["loss"] == pytest.approx(2.6)  # key order irrelevant


def test_jsonl_store_tolerates_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "sweep.jsonl"
    store = JsonlStore(path)
    store.append({"a": 1}, {"metrics": {"x": 1}})
    with open(path, "a") as handle:
        handle.write('{"key": "{\\"a\\":2}", "metr')  # process killed mid-write
    assert store.completed_keys() == {record_key({"a": 1})}
    assert "incomplete line" in caplog.text
    store.append({"a": 2}, {"metrics": {"x": 2}})  # the retry starts on a fresh line
    assert store.completed_keys() == {record_key({"a": 1}), record_key({"a": 2})}
