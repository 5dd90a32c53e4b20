import dataclasses
import enum
import json
import math
import os
import stat
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from shin_common import JsonlStore, files, read_json, records, write_json_atomic, write_run_record
from shin_common.records import record_key, to_jsonable


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
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["versions"]["numpy"] == np.__version__
    assert saved["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
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
        import shin_common.files as files
        import shin_common.records as records
        def die(src, dst):
            os._exit(9)   # simulated crash: the temporary file is written, the rename never happens
        files.os.replace = die
        records.write_json_atomic({str(target)!r}, {{"version": 2, "payload": "x" * 100000}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == 9
    assert read_json(target) == {"version": 1}
    (stray,) = [p for p in tmp_path.iterdir() if p.name != "out.json"]
    assert stray.name.startswith(".out.json.") and stray.name.endswith(".tmp")
    write_json_atomic(target, {"version": 3})  # a later write still works ...
    assert read_json(target) == {"version": 3}
    assert stray.exists()  # ... and leaves a recent temporary file alone (its writer may still be running)
    an_hour_and_more_ago = time.time() - files.STALE_TEMPORARY_SECONDS - 60
    os.utime(stray, (an_hour_and_more_ago, an_hour_and_more_ago))
    (tmp_path / ".other.json.abcd.tmp").write_text("not ours")
    os.utime(tmp_path / ".other.json.abcd.tmp", (an_hour_and_more_ago, an_hour_and_more_ago))
    write_json_atomic(target, {"version": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.abcd.tmp", "out.json"]


def test_atomic_writes_remove_only_their_own_stale_temporaries(tmp_path):
    an_hour_and_more_ago = time.time() - files.STALE_TEMPORARY_SECONDS - 60
    stale = {name: tmp_path / f".{name}.0123abcd.tmp" for name in ("a.json", "b.json", "a")}
    for path in stale.values():
        path.write_text("left by a killed writer")
        os.utime(path, (an_hour_and_more_ago, an_hour_and_more_ago))
    write_json_atomic(tmp_path / "a.json", {"v": 1})
    assert not stale["a.json"].exists() and stale["b.json"].exists() and stale["a"].exists()
    write_json_atomic(tmp_path / "b.json", {"v": 2})
    assert not stale["b.json"].exists() and stale["a"].exists()  # ".a.json.*" is not a temporary of "a"


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_new_files_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    written = write_json_atomic(tmp_path / "new.json", {"a": 1})
    with open(tmp_path / "plain.json", "w") as handle:  # what an ordinary open() gives
        handle.write("{}")
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "shared.json"
    write_json_atomic(target, {"v": 1})
    target.chmod(0o660)
    write_json_atomic(target, {"v": 2})
    assert stat.S_IMODE(target.stat().st_mode) == 0o660 and read_json(target) == {"v": 2}


def test_written_json_is_standard_with_non_finite_numbers(tmp_path):
    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    metrics = {"ppl": float("inf"), "low": -math.inf, "nan": float("nan"), "t": torch.tensor([1.0, math.inf])}
    write_run_record(tmp_path / "run.json", config={"lr": float("inf")}, metrics=metrics)
    saved = json.loads((tmp_path / "run.json").read_text(), parse_constant=reject)
    assert saved["metrics"] == {"ppl": None, "low": None, "nan": None, "t": [1.0, None]}
    assert saved["config"] == {"lr": None}
    store = JsonlStore(tmp_path / "s.jsonl")
    store.append({"lr": math.inf}, {"loss": np.float64("nan"), "best": -math.inf})
    line = json.loads((tmp_path / "s.jsonl").read_text(), parse_constant=reject)
    assert (line["loss"], line["best"], line["config"]) == (None, None, {"lr": None})


def test_record_key_tells_nan_infinities_and_none_apart(tmp_path):
    keys = [record_key({"x": v}) for v in (None, math.nan, math.inf, -math.inf, 0.0)]
    assert len(set(keys)) == len(keys)
    assert record_key({"x": float("nan")}) == record_key({"x": np.float32("nan")})
    store = JsonlStore(tmp_path / "s.jsonl")
    store.append({"x": math.nan}, {"m": 1})
    assert store.is_complete({"x": float("nan")}) and not store.is_complete({"x": None})
    assert json.loads(record_key({"x": math.inf}))["x"] == math.inf  # the key is still readable by Python


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
    store.append({"a": 3}, {"metrics": {"x": 3}})
    assert store.is_complete({"a": 3})
    assert caplog.text.count("incomplete line") == 1  # rereading the file does not repeat the warning


@pytest.mark.parametrize("field", ["key", "config"])
def test_jsonl_store_rejects_records_that_would_overwrite_its_own_fields(tmp_path, field):
    store = JsonlStore(tmp_path / "s.jsonl")
    with pytest.raises(ValueError, match=rf"has field\(s\) \['{field}'\], which the store writes itself"):
        store.append({"a": 1}, {field: "mine", "metrics": {}})
    assert not (tmp_path / "s.jsonl").exists()
    assert not store.is_complete({"a": 1})


def test_jsonl_store_reads_the_file_only_when_it_changed_and_sees_other_writers(tmp_path, monkeypatch):
    path = tmp_path / "s.jsonl"
    store = JsonlStore(path)
    parsed = []
    original_parse = JsonlStore._parse

    def counting_parse(self, raw, number):
        parsed.append(number)
        return original_parse(self, raw, number)

    monkeypatch.setattr(JsonlStore, "_parse", counting_parse)
    grid = [{"i": i} for i in range(20)]
    for cfg in grid:
        assert not store.is_complete(cfg)
        store.append(cfg, {"metrics": {"v": cfg["i"]}})
        assert store.is_complete(cfg)
    parsed.clear()
    for cfg in grid:
        assert store.is_complete(cfg)
    assert parsed == []  # the file did not change since the last append was seen: nothing reread

    other = JsonlStore(path)  # e.g. a second process working on the same sweep
    other.append({"i": 99}, {"metrics": {"v": 99}})
    assert store.is_complete({"i": 99}) and store.get({"i": 99})["metrics"] == {"v": 99}
    assert parsed == list(range(1, 22))  # the change was noticed and the file read once for both calls

    store.get({"i": 3})["metrics"]["v"] = "mutated"  # callers get copies, not the cached entries
    assert store.get({"i": 3})["metrics"] == {"v": 3}
    assert [r["config"] for r in store.records()] == [*grid, {"i": 99}]

    replacement = tmp_path / "new.jsonl"
    JsonlStore(replacement).append({"i": 0}, {"metrics": {"v": "redone"}})
    os.replace(replacement, path)  # the file was replaced: read again from the start
    assert store.completed_keys() == {record_key({"i": 0})}
    assert store.get({"i": 0})["metrics"] == {"v": "redone"}
    path.unlink()
    assert store.records() == [] and not store.is_complete({"i": 0})
    other.reload()
    assert other.records() == []


def test_jsonl_store_counts_a_valid_last_line_without_newline(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"key": record_key({"a": 1}), "config": {"a": 1}, "m": 1}))  # hand-made, no newline
    store = JsonlStore(path)
    assert store.is_complete({"a": 1})
    store.append({"a": 2}, {"m": 2})
    assert [r["m"] for r in store.records()] == [1, 2]
    assert [r["m"] for r in JsonlStore(path).records()] == [1, 2]


def _store_lines(*entries: tuple[dict, dict]) -> bytes:
    """The bytes JsonlStore.append would write for ``(config, record)`` pairs."""
    lines = [json.dumps({"key": record_key(cfg), "config": cfg, **rec}) + "\n" for cfg, rec in entries]
    return "".join(lines).encode()


def test_jsonl_store_rereads_a_file_rewritten_in_place(tmp_path):
    path = tmp_path / "s.jsonl"
    store = JsonlStore(path)
    store.append({"i": 0}, {"m": 0})
    store.append({"i": 1}, {"m": 1})
    assert store.completed_keys() == {record_key({"i": 0}), record_key({"i": 1})}
    inode = path.stat().st_ino
    # same inode, same line lengths (so a newline still ends where reading stopped), other runs
    rewritten = _store_lines(({"i": 5}, {"m": 5}), ({"i": 6}, {"m": 6}), ({"i": 7}, {"m": 7}))
    with open(path, "r+b") as handle:
        handle.write(rewritten)
        handle.truncate()
    assert path.stat().st_ino == inode
    assert [r["config"] for r in store.records()] == [{"i": 5}, {"i": 6}, {"i": 7}]
    assert not store.is_complete({"i": 0})


def test_jsonl_store_rereads_a_file_recreated_under_a_reused_inode(tmp_path, monkeypatch):
    path = tmp_path / "s.jsonl"
    big = {"m": "x" * 5000}  # the first 4 KiB of the old and new file are the same first line
    path.write_bytes(_store_lines(({"i": 0}, big), ({"i": 1}, {"m": 1})))
    store = JsonlStore(path)
    assert store.is_complete({"i": 1})
    old = os.stat(path)
    path.unlink()
    path.write_bytes(_store_lines(({"i": 0}, big), ({"i": 2}, {"m": "longer than before"})))
    real_stat = os.stat

    def reused_inode(target, *args, **kwargs):  # the file system gave the new file the deleted one's inode
        info = real_stat(target, *args, **kwargs)
        if os.fspath(target) != os.fspath(path):
            return info
        return types.SimpleNamespace(
            st_dev=old.st_dev, st_ino=old.st_ino, st_size=info.st_size, st_mtime_ns=info.st_mtime_ns
        )

    monkeypatch.setattr(records.os, "stat", reused_inode)
    assert [r["config"] for r in store.records()] == [{"i": 0}, {"i": 2}]
    assert not store.is_complete({"i": 1})


def test_shards_are_disjoint_and_cover_the_sweep(monkeypatch):
    from shin_common import shard

    items = list(range(10))
    shares = [shard(items, rank=r, world_size=3) for r in range(3)]
    assert sorted(i for share in shares for i in share) == items and shares[0] == [0, 3, 6, 9]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shard(items) == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        shard(items, rank=2, world_size=2)


def test_processes_appending_to_one_store_lose_no_line(tmp_path):
    """Two processes of a sharded sweep append at once: every line arrives whole."""
    path = tmp_path / "sweep.jsonl"
    script = textwrap.dedent(
        f"""
        import sys
        from shin_common import JsonlStore
        store = JsonlStore({str(path)!r})
        for i in range(150):
            store.append({{"rank": int(sys.argv[1]), "i": i}}, {{"metrics": {{"pad": "x" * 5000}}}})
        """
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, str(rank)]) for rank in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 300 and all(json.loads(line)["metrics"]["pad"] == "x" * 5000 for line in lines)
    assert len(JsonlStore(path).completed_keys()) == 300
