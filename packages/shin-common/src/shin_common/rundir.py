"""Output directories: one rule set for every tool of the toolkit (docs/run-contract.md).

A :class:`RunDirectory` is checked before any work starts and created only when work begins, so a
bad path or a bad value never leaves an empty directory behind. The tool writes in it a manifest
(``.run-manifest.json``) naming the tool, the config and every file it wrote. That manifest is what
makes the other rules safe:

* ``--overwrite`` deletes the files the manifest names and nothing else (never the directory), and
  is refused while the directory holds files the tool did not write;
* a directory holding a finished run of the same config is reported, not recomputed;
* a directory holding a run of another config is refused, naming the differing keys, unchanged;
* a partial run of the same config resumes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from shin_common.errors import ConfigMismatchError, CorruptFileError, OutputDirectoryError
from shin_common.files import _TEMPORARY_NAME, load_json
from shin_common.records import to_jsonable, write_json_atomic, write_run_record

MANIFEST_NAME = ".run-manifest.json"
RESULTS_NAME = "results.json"


_ABSENT = "<absent>"


def _changed_values(old: Any, new: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    # (dotted name, old value, new value) for every leaf that differs; a missing key is _ABSENT
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[tuple[str, Any, Any]] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}{key}"
            if key not in old or key not in new:
                found.append((name, old.get(key, _ABSENT), new.get(key, _ABSENT)))
            else:
                found.extend(_changed_values(old[key], new[key], prefix=f"{name}."))
        return found
    return [] if old == new else [(prefix.rstrip(".") or "<config>", old, new)]


def config_differences(old: Any, new: Any) -> list[str]:
    """Dotted names of the keys whose values differ between two configs (after ``to_jsonable``).

    >>> config_differences({"lr": 0.1, "opt": {"rho": 0.05}}, {"lr": 0.1, "opt": {"rho": 0.5}})
    ['opt.rho']
    """
    return [name for name, _, _ in _changed_values(to_jsonable(old), to_jsonable(new), "")]


def _shown(value: Any, limit: int = 40) -> str:
    text = value if value is _ABSENT else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_changes(old: Any, new: Any) -> list[str]:
    """``key: old -> new`` for every key whose value differs, in the order of :func:`config_differences`.

    Long values are shortened; a key present on one side only shows ``<absent>`` on the other.

    >>> config_changes({"optim": {"lr": 0.001}}, {"optim": {"lr": 0.005}, "seed": 1})
    ['optim.lr: 0.001 -> 0.005', 'seed: <absent> -> 1']
    """
    return [
        f"{name}: {_shown(before)} -> {_shown(after)}"
        for name, before, after in _changed_values(to_jsonable(old), to_jsonable(new), "")
    ]


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """The resolved output directory, after checking that a run may create and write it.

    Refused: a path that is a file or lies under one; one that cannot be created or written; the
    working directory, the home directory, the filesystem root and every ancestor of the working
    directory. A symlink is resolved and its target checked.
    """
    given = str(path)
    if not given.strip():
        raise OutputDirectoryError("output directory is empty; expected a directory path")
    target = Path(given).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd:
        raise OutputDirectoryError(
            f"output directory {given!r} is the working directory; choose a new or empty subdirectory"
        )
    if target.parent == target:
        raise OutputDirectoryError(f"output directory {given!r} is the filesystem root; choose a new directory")
    with contextlib.suppress(RuntimeError):  # no home directory known
        if target == Path.home().resolve():
            raise OutputDirectoryError(f"output directory {given!r} is the home directory; choose a new directory")
    if cwd.is_relative_to(target):
        raise OutputDirectoryError(
            f"output directory {given!r} ({target}) contains the working directory; choose a new directory"
        )
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == target else f"lies under the file {str(existing)!r}"
        raise OutputDirectoryError(f"output directory {given!r} {what}; expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "cannot be written" if existing == target else f"cannot be created in {str(existing)!r}"
        raise OutputDirectoryError(f"output directory {given!r} {what}: permission denied")
    return target


class RunDirectory:
    """An output directory under the toolkit's rules (see the module docstring).

    >>> run = RunDirectory("out", tool="sam-overparam", config=config)   # doctest: +SKIP
    >>> if run.finished:                                                   # doctest: +SKIP
    ...     print(run.results()["metrics"]); return 0
    >>> run.begin()                        # creates it (clearing an --overwrite'd run)  # doctest: +SKIP
    >>> torch.save(state, run.file("checkpoint.pt"))                       # doctest: +SKIP
    >>> run.finish(metrics=metrics, config=config, seed=0)                 # doctest: +SKIP

    ``config`` is what identifies the run: pass the values that change the results, not the output
    path or ``--overwrite``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        tool: str,
        config: Any,
        overwrite: bool = False,
        command: str | None = None,
    ) -> None:
        self.given = str(path)
        self.path = check_output_path(path)
        self.tool = tool
        self.command = command
        self.config = to_jsonable(config)
        self.overwrite = overwrite
        self._manifest = self._read_manifest()
        self._check_existing()

    # ------------------------------------------------------------------ state
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def finished(self) -> bool:
        """A finished run of the same config is here (and ``--overwrite`` was not given)."""
        return self._manifest is not None and bool(self._manifest.get("finished")) and not self.overwrite

    @property
    def resuming(self) -> bool:
        """An unfinished run of the same config is here: the tool continues it."""
        return self._manifest is not None and not self._manifest.get("finished") and not self.overwrite

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        manifest = load_json(self.manifest_path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
            raise CorruptFileError(self.manifest_path, "expected a mapping with a 'files' list")
        for name in manifest["files"]:
            _check_relative(self.manifest_path, name)
        return manifest

    def _written_here(self) -> set[str]:
        return set() if self._manifest is None else set(self._manifest["files"])

    def foreign_entries(self) -> list[str]:
        """Files and links in the directory that the manifest does not name (sorted, relative)."""
        if not self.path.is_dir():
            return []
        ours = self._written_here()
        foreign: list[str] = []
        for root, dirs, files in os.walk(self.path):
            base = Path(root)
            for name in [*files, *[d for d in dirs if (base / d).is_symlink()]]:
                rel = (base / name).relative_to(self.path).as_posix()
                if rel == MANIFEST_NAME or rel in ours or _is_temporary_of(rel, ours | {MANIFEST_NAME}):
                    continue
                foreign.append(rel)
        return sorted(foreign)

    def _check_existing(self) -> None:
        if not self.path.is_dir():
            return
        foreign = self.foreign_entries()
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        if self._manifest is None:
            if foreign:
                raise OutputDirectoryError(
                    f"output directory {self.given!r} holds files {self.tool} did not write ({shown}); "
                    "choose a new or empty directory"
                )
            return
        if self._manifest.get("tool") != self.tool:
            raise OutputDirectoryError(
                f"output directory {self.given!r} holds a run of {self._manifest.get('tool')!r}, "
                f"not of {self.tool}; choose another directory"
            )
        if self.overwrite:
            if foreign:
                raise OutputDirectoryError(
                    f"--overwrite deletes only the files {self.tool} wrote, but output directory {self.given!r} "
                    f"also holds {shown}; move them away or choose another directory"
                )
            return
        stored_config = self._manifest.get("config")
        differing = config_differences(stored_config, self.config)
        changes = config_changes(stored_config, self.config)
        if self._manifest.get("command") not in (None, self.command):
            differing.insert(0, "command")
            changes.insert(0, f"command: {self._manifest.get('command')!r} -> {self.command!r}")
        if differing:
            raise ConfigMismatchError(self.given, differing, changes)

    # ------------------------------------------------------------------ writing
    def begin(self) -> Path:
        """Create the directory (after ``--overwrite``, first delete the previous run's files)."""
        if self.overwrite and self._manifest is not None:
            self._delete_own_files()
            self._manifest = None
        self.path.mkdir(parents=True, exist_ok=True)
        if self._manifest is None:
            now = _now()
            self._manifest = {
                "tool": self.tool,
                "command": self.command,
                "config": self.config,
                "files": [],
                "finished": False,
                "created": now,
                "updated": now,
            }
            self._save_manifest()
        self.overwrite = False  # cleared once; from now on this object tracks the new run
        return self.path

    def file(self, name: str) -> Path:
        """The path of ``name`` (relative) in the run, recorded in the manifest before it is written."""
        self.claim([name])
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def claim(self, names: Iterable[str]) -> None:
        """Record files (relative paths) the tool is about to write or has written."""
        if self._manifest is None:
            self.begin()
        assert self._manifest is not None
        new = [n for n in (PurePosixPath(str(n)).as_posix() for n in names) if n not in self._manifest["files"]]
        for name in new:
            _check_relative(self.manifest_path, name)
        if new:
            self._manifest["files"].extend(new)
            self._save_manifest()

    def claim_tree(self, name: str) -> None:
        """Record every file under the subdirectory ``name`` (after the tool wrote it there)."""
        root = self.path / name
        self.claim(sorted(p.relative_to(self.path).as_posix() for p in root.rglob("*") if not p.is_dir()))

    def finish(
        self,
        *,
        metrics: Mapping[str, Any],
        config: Any = None,
        seed: int | None = None,
        packages: Iterable[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        name: str = RESULTS_NAME,
    ) -> dict[str, Any]:
        """Write ``results.json`` (provenance included, atomically) and mark the run finished."""
        kwargs: dict[str, Any] = {} if packages is None else {"packages": packages}
        record = write_run_record(
            self.file(name),
            config=self.config if config is None else config,
            metrics=metrics,
            seed=seed,
            package=self.tool,
            extra=extra,
            **kwargs,
        )
        assert self._manifest is not None
        self._manifest["finished"] = True
        self._manifest["results"] = name
        self._save_manifest()
        return record

    def results(self) -> dict[str, Any] | None:
        """The finished run's results record (None when there is none)."""
        if self._manifest is None or not self._manifest.get("finished"):
            return None
        path = self.path / self._manifest.get("results", RESULTS_NAME)
        return load_json(path) if path.is_file() else None

    def _save_manifest(self) -> None:
        assert self._manifest is not None
        self._manifest["updated"] = _now()
        write_json_atomic(self.manifest_path, self._manifest)

    def _delete_own_files(self) -> None:
        """Delete the files the manifest names, their leftover temporaries, then directories left empty."""
        ours = self._written_here()
        parents: set[Path] = set()
        for rel in sorted(ours):
            target = self.path / rel
            parents.update(p for p in target.parents if p != self.path and p.is_relative_to(self.path))
            if target.is_symlink() or target.is_file():
                target.unlink()
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                rel = (Path(root) / name).relative_to(self.path).as_posix()
                if rel not in ours and _is_temporary_of(rel, ours | {MANIFEST_NAME}):
                    (Path(root) / name).unlink(missing_ok=True)
        for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: it holds something else
                directory.rmdir()
        self.manifest_path.unlink(missing_ok=True)


def _check_relative(manifest: Path, name: Any) -> None:
    path = PurePosixPath(str(name))
    if not isinstance(name, str) or path.is_absolute() or ".." in path.parts or not path.parts:
        raise CorruptFileError(manifest, f"file entry {name!r} is not a path inside the run directory")


def _is_temporary_of(rel: str, names: set[str]) -> bool:
    """Whether ``rel`` is a temporary file that an atomic write of one of ``names`` left behind."""
    path = PurePosixPath(rel)
    match = _TEMPORARY_NAME.fullmatch(path.name)
    return match is not None and (path.parent / match["target"]).as_posix() in names


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
