"""Refuse to resume (or to report a finished run) under a configuration other than the saved one.

A checkpoint restores the optimizer's ``lr``, ``base_lr`` and refresh frequency together with its
state, and the cosine schedule depends on the total number of steps, so continuing a run under
different settings would silently train with a mixture of the old and the new ones.

The output directory itself is a :class:`shin_common.RunDirectory`: its manifest records the run's
config, and :func:`open_run` refuses a directory holding another config with every differing key
and both of its values named (``optim.lr: 0.001 -> 0.003``, shin-common's message), as the
checkpoints' own checks do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from shin_common import RunDirectory, config_changes

TOOL = "basisrot-pipeline"


def check_same_config(saved: Mapping[str, Any] | None, current: Mapping[str, Any], *, where: str) -> None:
    """Raise ``ValueError`` naming every differing key if ``saved`` (from ``where``) is not ``current``."""
    if saved is None:
        raise ValueError(
            f"{where} records no configuration (checkpoints of older versions do not), so it cannot be "
            "checked against this run; delete it, or use a new output directory (--output-dir) to start "
            "another run"
        )
    differences = config_changes(saved, current)
    if differences:
        raise ValueError(
            f"{where} was written with a different configuration ({'; '.join(differences)}); "
            "use the same settings to continue, or a new output directory to start another run"
        )


def open_run(
    path: str | os.PathLike[str], *, config: Mapping[str, Any], command: str, overwrite: bool = False
) -> RunDirectory:
    """The checked output directory of one command (no side effects until ``begin()``).

    A directory holding a run of another config is refused with ``key: saved -> current`` for each
    differing key (the manifest's config against ``config``).
    """
    return RunDirectory(path, tool=TOOL, config=config, overwrite=overwrite, command=command)
