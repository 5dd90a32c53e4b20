"""What ``--model`` names, checked before anything is loaded, and readable errors for bad weights.

``--model`` takes ``stdlib-tiny``, a local directory or a Hugging Face Hub id (``name`` or
``org/name``). A value that can only be a path (it starts with ``/``, ``.`` or ``~``, has more
than one ``/`` or a backslash, or exists) and does not exist is reported as a missing directory,
instead of Hugging Face's "Repo id must be in the form ..." for a path it took for a Hub id.

This module imports neither torch nor transformers, so the command line checks ``--model`` in
milliseconds.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

from shin_common import CorruptFileError, UnsafeFileError

MODEL_NAME = "stdlib-tiny"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _looks_like_path(name: str) -> bool:
    # Hub ids are ``name`` or ``org/name`` made of letters, digits, '-', '_' and '.' (never first).
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or (os.sep != "/" and os.sep in name)
        or os.path.exists(os.path.expanduser(name))
    )


def resolve_model_source(name: str) -> str:
    """``name`` as ``from_pretrained`` should get it: ``stdlib-tiny``, a Hub id or an existing directory.

    A local path is returned absolute with ``~`` expanded; one that does not exist or is not a
    directory raises ``ValueError``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"--model must be stdlib-tiny, a local model directory or a Hub id, got {name!r}")
    if name == MODEL_NAME or not _looks_like_path(name):
        return name
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"model directory {name!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"model path {name!r} is not a directory; expected a save_pretrained model directory")
    return str(path.resolve())


def weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def check_safetensors(directory: Path) -> None:
    """Read the header of every ``.safetensors`` file of ``directory`` (cheap: no tensor is loaded).

    The header says where each tensor lies, so a truncated or garbage file fails here, named,
    instead of inside ``from_pretrained`` with a message that does not say which file.
    """
    from safetensors import SafetensorError, safe_open

    for file in weight_files(directory):
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="numpy"):
                pass
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(file, f"not a complete safetensors file ({_first_line(exc)})") from exc


def weights_error(directory: Path, exc: BaseException) -> CorruptFileError:
    """The one-line error for weights of ``directory`` that ``from_pretrained`` could not load."""
    files = weight_files(directory)
    # With several weight files the loader does not say which one failed; name the directory then.
    culprit: Path = files[0] if len(files) == 1 else directory
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in text:
        refused = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "a refused global")
        reason = refused.split(". ")[0].removeprefix("WeightsUnpickler error: ")
        return UnsafeFileError(culprit, reason)
    if isinstance(exc, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)):
        return CorruptFileError(culprit, f"its weights could not be read ({_first_line(exc)})")
    return CorruptFileError(culprit, f"its weights could not be loaded ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
