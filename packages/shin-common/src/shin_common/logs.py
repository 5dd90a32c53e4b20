"""Logging set-up and progress bars that stay quiet where nobody is watching."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

LOG_LEVEL_ENV = "SHIN_LOG_LEVEL"
T = TypeVar("T")


def setup_logging(level: str | int | None = None, env_var: str = LOG_LEVEL_ENV) -> int:
    """Configure the root logger once for a command-line run and return the level used.

    The level comes from ``level``, else the environment variable ``env_var`` (e.g.
    ``SHIN_LOG_LEVEL=DEBUG``), else INFO. Library code only calls ``logging.getLogger(__name__)``.
    """
    chosen = level if level is not None else os.environ.get(env_var, "INFO")
    if isinstance(chosen, str):
        numeric = logging.getLevelName(chosen.strip().upper())
        if not isinstance(numeric, int):
            raise ValueError(
                f"unknown log level {chosen!r} (from {'argument' if level is not None else env_var}); "
                "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
            )
    else:
        numeric = int(chosen)
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    return numeric


def progress(
    iterable: Iterable[T] | None = None,
    *,
    rank: int = 0,
    disable: bool | None = None,
    **tqdm_kwargs: Any,
) -> tqdm:
    """A tqdm bar that is silent on non-main ranks and when stderr is not a terminal.

    Set ``SHIN_PROGRESS=1`` to force bars on (e.g. in a notebook piped to a file) or ``0`` to force
    them off; ``disable`` given explicitly wins over both.
    """
    if disable is None:
        forced = os.environ.get("SHIN_PROGRESS")
        if forced is not None:
            disable = forced.strip() in {"0", "false", "no", ""}
        else:
            disable = not sys.stderr.isatty()
    return tqdm(iterable, disable=disable or rank != 0, **tqdm_kwargs)
