"""Crash-safe per-block checkpoints of a pruning run, and the fingerprint that ties them to the run.

A checkpoint directory holds step-numbered block and buffer files and a ``state.json`` that lists
the files it owns; every save commits by one atomic rename of ``state.json`` (see
:class:`Checkpoint`). Files are loaded without running code (``torch.load(weights_only=True)``) and
checked to hold what recon-prune saved there, so a tampered or truncated file gives one line that
names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from recon_prune.calibration import CalibrationData
from recon_prune.config import PruneConfig
from shin_common import CorruptFileError, config_to_dict, load_json, load_torch, save_torch_atomic, write_json_atomic


class Checkpoint:
    """Per-block checkpoint whose every step commits by one atomic rename of ``state.json``.

    Each save writes its files under names that no committed state refers to (the step number is
    part of the name), and only then replaces ``state.json``, which lists the files it owns. A kill
    at any point therefore leaves either the previous state (whose files are untouched) or the new
    one; :meth:`load` reads only the files the state lists, and files of an unfinished step or of
    superseded states are deleted after the next commit. Only names of the checkpoint's own patterns
    (:data:`OWN_FILE`) are ever deleted, so other files in the directory are safe.

    Every file is fsynced before ``state.json`` names it and the directory is fsynced after each
    rename, so after a power loss the committed state never refers to a truncated or missing file.
    """

    # block_<index>.step<step>.pt and buffers.step<step>.pt, and the temporaries a killed save left:
    # ".NAME.<hex>.tmp" (shin-common's atomic save) or ".NAME.tmp" (older recon-prune)
    OWN_FILE = re.compile(r"^(?P<tmp>\.)?(?:block_\d+|buffers)\.step\d+\.pt(?(tmp)(?:\.[0-9a-f]{8})?\.tmp)$")
    COMMITTED_FILE = re.compile(r"^(?:block_\d+|buffers)\.step\d+\.pt$")

    def __init__(self, directory: str | os.PathLike[str], fingerprint: str) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.block_files: dict[int, str] = {}

    def _fsync_dir(self) -> None:
        """Make the renames in the directory durable (POSIX; Windows cannot open a directory)."""
        if os.name == "nt":
            return
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _save(self, name: str, obj: Any) -> None:
        save_torch_atomic(obj, self.dir / name)  # fsynced temporary, then renamed

    def load(self) -> dict[str, Any] | None:
        state_file = self.dir / "state.json"
        if not state_file.is_file():
            return None
        state = load_json(state_file)
        if not isinstance(state, dict):
            raise CorruptFileError(state_file, "expected a JSON object")
        # The format first: an older checkpoint's fingerprint never matches (it lacks the weights digest).
        if "block_files" not in state or "buffers_file" not in state:
            raise ValueError(
                f"checkpoint directory {str(self.dir)!r} was written by an older recon-prune whose checkpoints "
                "are not crash-safe; delete it and rerun"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint directory {str(self.dir)!r} belongs to a different run (other model weights, "
                "calibration or config); use a new directory or delete it"
            )
        self.block_files, buffers_file = _checked_state(state_file, state)
        # Only tensors and plain containers are unpickled: a crafted file here cannot run code.
        state["buffers"] = _checked_file(self.dir / buffers_file, ("sparse_in", "dense_in"))
        state["block_states"] = {
            index: _checked_file(self.dir / name, ("weights", "masks"))
            for index, name in sorted(self.block_files.items())
        }
        state["block_paths"] = {index: self.dir / name for index, name in self.block_files.items()}
        return state

    def save(
        self, next_block: int, block_states: dict[int, Any], buffers: dict[str, Any], report: dict[str, Any]
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # A resumed run saves step next_block > every committed step, so these names are never listed
        # by the state on disk; a leftover of a crashed attempt at this step is simply overwritten.
        files = dict(self.block_files)
        for index, state in block_states.items():
            files[index] = f"block_{index:04d}.step{next_block:04d}.pt"
            self._save(files[index], state)
        buffers_file = f"buffers.step{next_block:04d}.pt"
        self._save(buffers_file, buffers)
        self._fsync_dir()  # the renamed files are on disk before the state that names them
        write_json_atomic(
            self.dir / "state.json",
            {
                "fingerprint": self.fingerprint,
                "next_block": next_block,
                "block_files": {str(index): name for index, name in sorted(files.items())},
                "buffers_file": buffers_file,
                "report": report,
            },
        )
        self._fsync_dir()  # the commit itself survives a power loss
        self.block_files = files
        owned = {*files.values(), buffers_file}
        for old in self.dir.iterdir():
            if self.OWN_FILE.match(old.name) and old.name not in owned:
                old.unlink(missing_ok=True)


def _checked_state(state_file: Path, state: dict[str, Any]) -> tuple[dict[int, str], str]:
    """The block files and the buffers file a checkpoint's ``state.json`` lists, or a one-line error."""
    try:
        block_files = {int(index): name for index, name in state["block_files"].items()}
        buffers_file = state["buffers_file"]
        int(state["next_block"])
        missing = [key for key in ("block_errors", "reconstruction") if key not in state["report"]]
        if missing:
            raise KeyError(f"report.{missing[0]}")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(state_file, f"not a recon-prune checkpoint state ({type(exc).__name__}: {exc})") from exc
    for name in (*block_files.values(), buffers_file):
        # A listed name is opened in the checkpoint directory: nothing else (no path) is accepted.
        if not isinstance(name, str) or not Checkpoint.COMMITTED_FILE.match(name):
            raise CorruptFileError(state_file, f"lists {name!r}, which is not a checkpoint file name")
    return block_files, buffers_file


def _checked_file(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A checkpoint file loaded without running code, checked to hold what recon-prune saved there."""
    content = load_torch(path, map_location=None)  # tensors return to the device they were saved from
    if not isinstance(content, dict) or any(key not in content for key in keys):
        raise CorruptFileError(path, f"expected a mapping with {', '.join(map(repr, keys))}")
    return content


def baked_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with masked weights under their plain names (parametrized modules don't deepcopy)."""
    state = {k: v.detach().cpu().clone() for k, v in block.state_dict().items()}
    for name, module in block.named_modules():
        if parametrize.is_parametrized(module):
            prefix = f"{name}." if name else ""
            for tensor_name in module.parametrizations:  # "weight", or a fused experts parameter
                state.pop(f"{prefix}parametrizations.{tensor_name}.original")
                state[f"{prefix}{tensor_name}"] = getattr(module, tensor_name).detach().cpu().clone()
    return state


def block_state(block: nn.Module, masks: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """What a checkpoint keeps of one block: its masked weights and its masks."""
    return {"weights": baked_state(block), "masks": {k: v for k, v in masks.items() if k.startswith(prefix)}}


def weights_digest(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """SHA-256 over name, shape, dtype and an evenly strided sample of every tensor of the state dict.

    Exact bytes rather than statistics (a float sum can differ in the last bit between machines and
    thread counts), and a sample rather than all bytes so a 7B model costs milliseconds: two different
    trainings or fine-tunes of one architecture differ in virtually every weight.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.float64).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: nn.Module, data: CalibrationData, config: PruneConfig) -> str:
    """Identity of a run: config, model class, model config, dense weights and calibration ids."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config_to_dict(config), sort_keys=True).encode())
    digest.update(type(model).__name__.encode())
    digest.update(
        json.dumps(getattr(getattr(model, "config", None), "to_dict", dict)(), sort_keys=True, default=str).encode()
    )
    digest.update(weights_digest(model).encode())
    digest.update(data.all_ids().numpy().tobytes())
    digest.update(str(data.num_real).encode())
    return digest.hexdigest()
