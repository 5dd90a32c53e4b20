"""Results records: how every number this toolkit saves was obtained.

``write_run_record`` saves one run (config, metrics, seed, versions, git revision, host) as JSON,
atomically. ``JsonlStore`` is the append-only record of a sweep: each finished run is one line
keyed by its configuration, so a killed sweep resumes without redoing or losing finished runs.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import enum
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from shin_common.files import load_json, write_text_atomic

try:  # POSIX only; elsewhere a store has one writer at a time
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_PACKAGES = ("shin-common", "numpy", "torch", "transformers", "accelerate", "datasets")


def to_jsonable(value: Any) -> Any:
    """Convert dataclasses, paths, tuples, numpy and torch scalars/arrays to plain JSON values.

    Non-finite floats (NaN, +inf, -inf) become ``None``: standard JSON (RFC 8259) has no literal
    for them, and ``null`` keeps the files readable by every JSON parser. A result that diverged
    therefore reads as missing, never as a number.
    """
    return _jsonable(value, keep_non_finite=False)


def _jsonable(value: Any, *, keep_non_finite: bool) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _jsonable(getattr(value, f.name), keep_non_finite=keep_non_finite)
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, keep_non_finite=keep_non_finite) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v, keep_non_finite=keep_non_finite) for v in items]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return _jsonable(value.value, keep_non_finite=keep_non_finite)
    if isinstance(value, float) and not math.isfinite(value):
        return float(value) if keep_non_finite else None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy arrays/scalars, torch tensors
        return _jsonable(value.tolist(), keep_non_finite=keep_non_finite)
    if hasattr(value, "item"):
        return _jsonable(value.item(), keep_non_finite=keep_non_finite)
    return repr(value)


def _dumps(obj: Any, **kwargs: Any) -> str:
    """Standard JSON only: ``to_jsonable`` has already replaced NaN and infinities."""
    return json.dumps(to_jsonable(obj), allow_nan=False, **kwargs)


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


def package_source_revision(dist: str) -> dict[str, Any] | None:
    """The git commit of the installed package ``dist``'s own source, or None.

    Found from where the package's code lives, not from the working directory, and only when that
    code is a tracked file of the checkout (an editable install); a wheel installed inside some
    repository's virtual environment has no revision. ``dirty`` covers the package's code only.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(dist.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    origin = Path(spec.origin).resolve()
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", origin.name],
            cwd=origin.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if tracked.returncode != 0:
            return None
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=origin.parent, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=origin.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def provenance(
    *,
    config: Any = None,
    seed: int | None = None,
    packages: Iterable[str] = DEFAULT_PACKAGES,
    extra: Mapping[str, Any] | None = None,
    package: str | None = None,
) -> dict[str, Any]:
    """Everything needed to say how a result was obtained.

    ``package`` names the distribution that wrote the result (``recon-prune``): its version is
    recorded under ``package``, and ``git`` is then the revision of that package's own source,
    whatever the working directory is (without ``package``, that of the working directory).
    """
    names = list(packages)
    if package is not None and package not in names:
        names.append(package)
    record: dict[str, Any] = {
        "config": to_jsonable(config),
        "seed": seed,
    }
    if package is not None:
        record["package"] = {"name": package, "version": package_versions([package])[package]}
    record |= {
        "versions": {"python": platform.python_version(), **package_versions(names)},
        "git": package_source_revision(package) if package is not None else git_revision(),
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

    See :func:`shin_common.files.write_text_atomic` for how (temporary file, fsync, rename).
    """
    return write_text_atomic(path, _dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_run_record(
    path: str | os.PathLike[str],
    *,
    config: Any,
    metrics: Mapping[str, Any],
    seed: int | None = None,
    packages: Iterable[str] = DEFAULT_PACKAGES,
    extra: Mapping[str, Any] | None = None,
    package: str | None = None,
) -> dict[str, Any]:
    """Save one run's metrics with its provenance as JSON (atomically) and return the record."""
    record = provenance(config=config, seed=seed, packages=packages, extra=extra, package=package)
    record["metrics"] = to_jsonable(dict(metrics))
    write_json_atomic(path, record)
    return record


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file's contents; invalid JSON raises a one-line ``CorruptFileError`` naming the file."""
    return load_json(path)


def record_key(config: Mapping[str, Any] | Any) -> str:
    """A canonical string key for a configuration (sorted JSON), used to match finished runs.

    Unlike the records themselves, the key keeps non-finite floats as ``NaN``, ``Infinity`` and
    ``-Infinity``, so a config with ``float("nan")`` and one with ``None`` are different runs. The
    key is only compared as a string; it is stored as a JSON string, so the files stay standard.
    """
    return json.dumps(_jsonable(config, keep_non_finite=True), sort_keys=True, separators=(",", ":"))


class JsonlStore:
    """Append-only JSON-lines store of finished runs in a sweep.

    Each line is ``{"key": ..., "config": ..., **record}``. A run is written only when it has
    finished, in one ``write`` of a complete line followed by fsync, so a killed process leaves at
    most one partial last line; reading skips it with a warning and the next append starts on a
    fresh line.

    The store keeps what it read in memory and reads the file again only when its identity, size
    or modification time changed (an append by this or another process, a replacement, a rewrite),
    so checking every run of a sweep does not reparse the file each time; :meth:`reload` forces a
    reread.

    >>> store = JsonlStore("sweep.jsonl")                        # doctest: +SKIP
    >>> for cfg in grid:                                          # doctest: +SKIP
    ...     if store.is_complete(cfg):
    ...         continue
    ...     store.append(cfg, {"metrics": train(cfg)})
    """

    RESERVED_FIELDS = ("key", "config")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._warned_lines: set[int] = set()  # torn lines already reported: a reread does not repeat it
        self._forget()

    # ------------------------------------------------------------------ reading
    def _forget(self) -> None:
        self._entries: list[dict[str, Any]] = []  # complete lines, in file order
        self._latest: dict[str, dict[str, Any]] = {}  # key -> last entry with that key
        self._stamp: tuple[int, int, int, int] | None = None  # (device, inode, size, mtime_ns) when read
        self._tail: dict[str, Any] | None = None  # a valid last line that lacks its newline

    def reload(self) -> None:
        """Drop what is held in memory; the next call reads the file from the start."""
        self._forget()

    def _refresh(self) -> None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            self._forget()
            return
        stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if stamp == self._stamp:
            return
        # Taken before reading: a line appended meanwhile changes the file again, so it is read next time.
        data = self.path.read_bytes()
        self._forget()
        end = data.rfind(b"\n") + 1  # only newline-terminated lines are final
        for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
            entry = self._parse(raw, number)
            if entry is not None:
                self._entries.append(entry)
                self._latest[entry["key"]] = entry
        tail = data[end:]
        self._tail = self._parse(tail, data[:end].count(b"\n") + 1) if tail.strip() else None
        self._stamp = stamp

    def _parse(self, raw: bytes, number: int) -> dict[str, Any] | None:
        if not raw.strip():
            return None
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number not in self._warned_lines:
                self._warned_lines.add(number)
                log.warning("%s:%d: skipping an incomplete line (interrupted write)", self.path, number)
            return None
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            return entry
        return None

    def _all(self) -> list[dict[str, Any]]:
        self._refresh()
        return self._entries if self._tail is None else [*self._entries, self._tail]

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in the order written."""
        return copy.deepcopy(self._all())

    def completed_keys(self) -> set[str]:
        self._refresh()
        keys = set(self._latest)
        if self._tail is not None:
            keys.add(self._tail["key"])
        return keys

    def is_complete(self, config: Any) -> bool:
        key = record_key(config)
        self._refresh()
        return key in self._latest or (self._tail is not None and self._tail["key"] == key)

    def get(self, config: Any) -> dict[str, Any] | None:
        """The last record written for ``config``, or None."""
        key = record_key(config)
        self._refresh()
        if self._tail is not None and self._tail["key"] == key:
            return copy.deepcopy(self._tail)
        found = self._latest.get(key)
        return None if found is None else copy.deepcopy(found)

    # ------------------------------------------------------------------ writing
    def append(self, config: Any, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one finished run. ``config`` identifies it; ``record`` holds its results.

        ``record`` may not have the fields ``key`` and ``config``: the store writes those itself
        and uses them to find finished runs.
        """
        clashing = [name for name in self.RESERVED_FIELDS if name in record]
        if clashing:
            raise ValueError(
                f"record for {self.path} has field(s) {clashing}, which the store writes itself "
                f"(the run's key and config); rename them, e.g. to {[f'run_{name}' for name in clashing]}"
            )
        entry = {"key": record_key(config), "config": to_jsonable(config), **to_jsonable(dict(record))}
        line = json.dumps(entry, sort_keys=False, allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            # Processes of a sharded sweep append to one store: the lock makes the torn-line check
            # and the write one step (released when the file closes).
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a previous writer died mid-line: start a new one
                    line = "\n" + line
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        return entry


def shard(items: Iterable[Any], *, rank: int | None = None, world_size: int | None = None) -> list[Any]:
    """This process's share of a sweep: every ``world_size``-th item starting at ``rank``.

    Without arguments the rank and world size come from the launcher's environment (``RANK`` and
    ``WORLD_SIZE``, set by torchrun and accelerate launch); a single process gets everything. The
    shares of all ranks are disjoint and together are ``items``, so N processes appending to one
    :class:`JsonlStore` run each item once.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world size")
    return list(items)[rank::world_size]
