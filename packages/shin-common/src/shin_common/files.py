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
import re
import secrets
import stat
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from shin_common.errors import CorruptFileError, MissingExtraError, UnsafeFileError


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
    """``torch.save`` so that ``path`` holds the old file or the complete new one, never a torn one."""
    import torch

    return write_atomic(path, lambda handle: torch.save(obj, handle))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) so that ``path`` holds the old file or the complete new one."""
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync it, rename it over ``path``.

    ``os.replace`` is atomic on POSIX and Windows, so ``path`` holds either the old file or the
    complete new one. The file gets the permissions a plain ``open(path, "w")`` would give it: those
    of the file it replaces, or ``0o666`` less the umask for a new one. Temporary files of the same
    name left by a writer killed more than an hour ago are removed after a successful write.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp_name, stat.S_IMODE(os.stat(target).st_mode))
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _remove_stale_temporaries(target)
    return target


STALE_TEMPORARY_SECONDS = 3600.0


def _create_temporary(target: Path) -> tuple[int, str]:
    """Create ``.<name>.<random>.tmp`` next to ``target`` with mode 0o666 filtered by the umask.

    ``tempfile.mkstemp`` would create it 0o600 regardless of the umask, and the rename would keep
    that mode for the results file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = str(target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {str(target)!r}")


_TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{8}\.tmp")  # as _create_temporary names them


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporary files of ``target`` left by killed writers (old enough not to be in use).

    Only names of the exact form :func:`_create_temporary` gives ``target`` count, so writing ``a``
    never touches the temporaries of ``a.json``.
    """
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            match = _TEMPORARY_NAME.fullmatch(entry.name)
            if match is None or match["target"] != target.name:
                continue
            with contextlib.suppress(OSError):  # another process removed or replaced it meanwhile
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)


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
