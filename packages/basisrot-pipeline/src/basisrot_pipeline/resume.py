"""Refuse to resume (or to report a finished run) under a configuration other than the saved one.

A checkpoint restores the optimizer's ``lr``, ``base_lr`` and refresh frequency together with its
state, and the cosine schedule depends on the total number of steps, so continuing a run under
different settings would silently train with a mixture of the old and the new ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

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
