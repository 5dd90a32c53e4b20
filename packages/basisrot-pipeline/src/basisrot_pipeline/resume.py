"""Refuse to resume (or to report a finished run) under a configuration other than the saved one.

A checkpoint restores the optimizer's ``lr``, ``base_lr`` and refresh frequency together with its
state, and the cosine schedule depends on the total number of steps, so continuing a run under
different settings would silently train with a mixture of the old and the new ones.

The output directory itself is a :class:`shin_common.RunDirectory`: its manifest records the run's
config, and :func:`open_run` refuses a directory holding another config with every differing key
and both of its values named (``optim.lr: 0.001 -> 0.003``), as the checkpoints' own checks do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shin_common import ConfigMismatchError, CorruptFileError, RunDirectory, load_json
from shin_common.rundir import MANIFEST_NAME

TOOL = "basisrot-pipeline"
_MISSING = "<absent>"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys: ``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    # the JSON round trip makes tuples lists, as in run.json, so saved and current compare equal
    return json.loads(json.dumps(config, default=str))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved -> current`` for every dotted key whose value differs (sorted by key)."""
    old, new = flatten(_plain(saved)), flatten(_plain(current))
    return [
        f"{key}: {old.get(key, _MISSING)!r} -> {new.get(key, _MISSING)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, _MISSING) != new.get(key, _MISSING)
    ]


def check_same_config(saved: Mapping[str, Any] | None, current: Mapping[str, Any], *, where: str) -> None:
    """Raise ``ValueError`` naming every differing key if ``saved`` (from ``where``) is not ``current``."""
    if saved is None:
        raise ValueError(
            f"{where} records no configuration (checkpoints of older versions do not), so it cannot be "
            "checked against this run; delete it, or use a new output directory (--output-dir) to start "
            "another run"
        )
    differences = config_differences(saved, current)
    if differences:
        raise ValueError(
            f"{where} was written with a different configuration ({'; '.join(differences)}); "
            "use the same settings to continue, or a new output directory to start another run"
        )


class RunConfigMismatchError(ConfigMismatchError):
    """An output directory holding a run of another config; the message shows each key's two values."""

    def __init__(self, path: str, keys: list[str], differences: list[str]) -> None:
        self.keys = keys
        # ValueError's own constructor: ConfigMismatchError's would list the keys without their values.
        ValueError.__init__(
            self,
            f"output directory {path!r} holds a run with a different configuration ({'; '.join(differences)}); "
            "use the same settings to continue or report it, choose another --output-dir, or pass "
            "--overwrite to replace that run",
        )


def open_run(
    path: str | os.PathLike[str], *, config: Mapping[str, Any], command: str, overwrite: bool = False
) -> RunDirectory:
    """The checked output directory of one command (no side effects until ``begin()``).

    A directory holding a run of another config is refused with ``key: saved -> current`` for each
    differing key (the manifest's config against ``config``).
    """
    try:
        return RunDirectory(path, tool=TOOL, config=config, overwrite=overwrite, command=command)
    except ConfigMismatchError as exc:
        manifest = load_json(Path(path).expanduser() / MANIFEST_NAME)  # readable: RunDirectory just read it
        if not isinstance(manifest, dict):  # pragma: no cover - RunDirectory refuses it before
            raise CorruptFileError(Path(path) / MANIFEST_NAME, "expected a mapping") from exc
        differences = []
        if manifest.get("command") not in (None, command):
            differences.append(f"command: {manifest.get('command')!r} -> {command!r}")
        differences += config_differences(manifest.get("config") or {}, config)
        raise RunConfigMismatchError(str(path), exc.keys, differences or exc.keys) from exc
