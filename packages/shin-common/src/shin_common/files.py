"""Loading files without running their code, saving them atomically, and optional extras.

Every checkpoint, predictions file or array a tool reads goes through :func:`load_torch` or
:func:`load_npz`: ``torch.load(weights_only=True)`` and ``np.load(allow_pickle=False)`` build
only tensors, arrays and plain containers, so a crafted file placed in an output directory cannot
run code. A file that fails to load raises :class:`~shin_common.errors.CorruptFileError` naming
it, which the command-line runner prints as one line.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from shin_common.errors import CorruptFileError, MissingExtraError, UnsafeFileError
from shin_common.records import _create_temporary, _remove_stale_temporaries


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


def load_torch(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; unreadable files raise a one-line error naming them.

    A missing file raises ``FileNotFoundError`` as usual.
    """
    import torch

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"file {str(file)!r} does not exist")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch raises this both for a refused global (a crafted or foreign pickle) and for garbage.
        if "GLOBAL" in str(exc):
            raise UnsafeFileError(file, _torch_reason(exc)) from exc
        raise CorruptFileError(file, _torch_reason(exc)) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, AttributeError) as exc:
        raise CorruptFileError(file, _torch_reason(exc)) from exc
    except OSError as exc:
        # a truncated zip archive surfaces as "[Errno 22] Invalid argument" from torch's reader
        raise CorruptFileError(file, f"unreadable as a torch file ({_first_line(exc)})") from exc


def _torch_reason(exc: BaseException) -> str:
    """The informative line of torch's long multi-line load errors."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            # "WeightsUnpickler error: Unsupported global: GLOBAL x was not ... . Please use ...": the refusal only
            return line.strip().removeprefix("WeightsUnpickler error: ").split(". ")[0].rstrip(".")
    first = _first_line(exc)
    return first.split(". ")[0]


def load_npz(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All arrays of an ``.npz`` file, loaded with ``allow_pickle=False``."""
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"file {str(file)!r} does not exist")
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UnsafeFileError(file, "an object array needs pickle") from exc
        raise CorruptFileError(file, _first_line(exc)) from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CorruptFileError(file, _first_line(exc)) from exc


def load_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file's contents; invalid JSON raises a one-line error naming the file."""
    file = Path(path)
    try:
        with open(file, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(file, f"not valid JSON ({_first_line(exc)})") from exc


def save_torch_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` so that ``path`` holds the old file or the complete new one, never a torn one.

    Written to a temporary file in the same directory, fsynced, then renamed over ``path``.
    """
    import torch

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _remove_stale_temporaries(target)
    return target


def require_extra(module: str, *, install: str, purpose: str) -> Any:
    """Import an optional dependency or raise :class:`MissingExtraError` saying how to install it.

    Call it before any work starts, so a missing extra is reported in seconds, not after hours.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module.split(".")[0], install, purpose) from exc


def import_pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
