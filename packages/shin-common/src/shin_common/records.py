"""Results records: how every number this toolkit saves was obtained.

``write_run_record`` saves one run (config, metrics, seed, versions, git revision, host) as JSON,
atomically. ``JsonlStore`` is the append-only record of a sweep: each finished run is one line
keyed by its configuration, so a killed sweep resumes without redoing or losing finished runs.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PACKAGES = ("shin-common", "numpy", "torch", "transformers", "accelerate", "datasets")


def to_jsonable(value: Any) -> Any:
    """Convert dataclasses, paths, tuples, numpy and torch scalars/arrays to plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v) for v in items]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, float) and value != value:  # NaN is not valid JSON
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_jsonable(value.tolist())
    if hasattr(value, "item"):
        return to_jsonable(value.item())
    return repr(value)


def package_versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None for those not installed)."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The commit and dirty flag of the git checkout containing ``path`` (default: cwd)."""
    cwd = Path(path) if path is not None else Path.cwd()
    if cwd.is_file():
        cwd = cwd.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def provenance(
    *,
    config: Any = None,
    seed: int | None = None,
    packages: Iterable[str] = DEFAULT_PACKAGES,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to say how a result was obtained."""
    record: dict[str, Any] = {
        "config": to_jsonable(config),
        "seed": seed,
        "versions": {"python": platform.python_version(), **package_versions(packages)},
        "git": git_revision(),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "argv": list(sys.argv),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if extra:
        record.update(to_jsonable(dict(extra)))
    return record


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON so that ``path`` holds either the old file or the complete new one.

    The data goes to a temporary file in the same directory, is flushed and fsynced, then renamed
    over ``path`` (``os.replace`` is atomic on POSIX and Windows).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=indent, sort_keys=False) + "\n"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def write_run_record(
    path: str | os.PathLike[str],
    *,
    config: Any,
    metrics: Mapping[str, Any],
    seed: int | None = None,
    packages: Iterable[str] = DEFAULT_PACKAGES,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Save one run's metrics with its provenance as JSON (atomically) and return the record."""
    record = provenance(config=config, seed=seed, packages=packages, extra=extra)
    record["metrics"] = to_jsonable(dict(metrics))
    write_json_atomic(path, record)
    return record


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def record_key(config: Mapping[str, Any] | Any) -> str:
    """A canonical string key for a configuration (sorted JSON), used to match finished runs."""
    return json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"))


class JsonlStore:
    """Append-only JSON-lines store of finished runs in a sweep.

    Each line is ``{"key": ..., **record}``. A run is written only when it has finished, in one
    ``write`` of a complete line followed by fsync, so a killed process leaves at most one partial
    last line; reading skips it with a warning and the next append starts on a fresh line.

    >>> store = JsonlStore("sweep.jsonl")                        # doctest: +SKIP
    >>> for cfg in grid:                                          # doctest: +SKIP
    ...     if store.is_complete(cfg):
    ...         continue
    ...     store.append(cfg, {"metrics": train(cfg)})
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _lines(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s:%d: skipping an incomplete line (interrupted write)", self.path, number)
                    continue
                if isinstance(entry, dict) and "key" in entry:
                    yield entry

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in the order written."""
        return list(self._lines())

    def completed_keys(self) -> set[str]:
        return {entry["key"] for entry in self._lines()}

    def is_complete(self, config: Any) -> bool:
        return record_key(config) in self.completed_keys()

    def get(self, config: Any) -> dict[str, Any] | None:
        """The last record written for ``config``, or None."""
        key = record_key(config)
        found = None
        for entry in self._lines():
            if entry["key"] == key:
                found = entry
        return found

    def append(self, config: Any, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one finished run. ``config`` identifies it; ``record`` holds its results."""
        entry = {"key": record_key(config), "config": to_jsonable(config), **to_jsonable(dict(record))}
        line = json.dumps(entry, sort_keys=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a previous writer died mid-line: start a new one
                    line = "\n" + line
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        return entry
