"""Logging set-up and progress bars that stay quiet where nobody is watching."""

from __future__ import annotations

import logging
import os
import sys
import warnings
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
        name = chosen.strip().upper()
        numeric = int(name) if name.isdigit() else logging.getLevelName(name)
        if not isinstance(numeric, int):
            raise ValueError(
                f"unknown log level {chosen!r} (from {'argument' if level is not None else env_var}); "
                "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL or a number such as 10"
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

    Set ``SHIN_PROGRESS`` to ``1``/``true``/``yes``/``on`` to force bars on (e.g. in a notebook
    piped to a file) or to ``0``/``false``/``no``/``off`` (or empty) to force them off, in any
    case; any other value is ignored with a warning. ``disable`` given explicitly wins over both.
    """
    if disable is None:
        forced = _progress_from_environment()
        disable = not sys.stderr.isatty() if forced is None else not forced
    return tqdm(iterable, disable=disable or rank != 0, **tqdm_kwargs)


PROGRESS_ENV = "SHIN_PROGRESS"
_TRUE_WORDS = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off", "n", "f", ""})


def _progress_from_environment() -> bool | None:
    """``SHIN_PROGRESS`` as on (True), off (False) or not set / not understood (None)."""
    raw = os.environ.get(PROGRESS_ENV)
    if raw is None:
        return None
    word = raw.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    warnings.warn(
        f"{PROGRESS_ENV}={raw!r} is not understood; expected one of 1, true, yes, on (bars on) or "
        "0, false, no, off (bars off). Showing bars only on a terminal.",
        stacklevel=3,
    )
    return None
