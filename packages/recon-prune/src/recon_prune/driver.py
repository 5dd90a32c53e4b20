"""Sequential pruning driver: one decoder block on the compute device at a time.

For block ``i`` (Shin et al. 2024, Sec. 3 and Fig. 1):

1. block ``i`` itself, before it is pruned, maps the dense-path inputs to the next dense-path
   activations (the GP targets and the reference for the per-depth error) and, for BR, the
   sparse-path inputs to the BR targets, so no dense copy of the block is needed;
2. mask statistics (Hessian for SparseGPT, input norms for Wanda) are collected on the sparse-path
   inputs of the real calibration samples only;
3. every linear layer is pruned (SparseGPT also applies its closed-form OBS update = LR), and the
   masks are frozen;
4. BR trains the block towards its targets on the sparse inputs, GP towards the dense path; CR
   trains the window of blocks ``i-1, i`` (stride 1) from the sparse inputs of block ``i-1``. The
   provisional block ``i-1`` waits on ``offload_device`` between its two trainings, and CR without
   GP keeps a dense copy of it there for the window target;
5. the sparse-path activations advance, and the error ``MSE(sparse path, dense path)`` at this
   depth is recorded; a final block goes back to the device it was on before the run.

Both activation buffers live on ``offload_device``. With a checkpoint directory, each finished
block, the buffers and the running report are committed atomically (see :class:`_Checkpoint`), so a
run killed at any point continues at the next block and ends with the same model as an
uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from recon_prune.calibration import CalibrationData, as_calibration
from recon_prune.config import PruneConfig
from recon_prune.evaluate import sparsity_report
from recon_prune.masks import WandaStats, magnitude_mask, wanda_mask
from recon_prune.model_adapter import (
    BlockInputs,
    capture_block_inputs,
    find_decoder_blocks,
    find_linears,
    run_blocks,
    to_native_layout,
    weight_matrix,
)
from recon_prune.reconstruct import apply_mask, bake_masks, mse, train_blocks
from recon_prune.sparsegpt import SparseGPT
from shin_common import (
    CorruptFileError,
    config_to_dict,
    load_json,
    load_torch,
    progress,
    save_torch_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PruneReport:
    """Outcome of :func:`prune`. ``masks`` maps ``"<blocks path>.<i>.<linear>"`` to boolean masks
    in the module's own weight layout (``True`` = kept)."""

    config: dict[str, Any]
    model_type: str
    blocks_path: str
    num_blocks: int
    block_errors: list[float | None]
    reconstruction: list[dict[str, float]] = field(default_factory=list)
    sparsity: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    calibration: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    resumed_from_block: int | None = None

    @property
    def final_block_error(self) -> float | None:
        return self.block_errors[-1] if self.block_errors else None

    def to_dict(self) -> dict[str, Any]:
        """Everything but the masks (for results JSON)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "masks"}
        data["final_block_error"] = self.final_block_error
        return data


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_structure(model: nn.Module, config: PruneConfig) -> tuple[str, nn.ModuleList]:
    """Decoder blocks findable, every block has linear layers, N:M divides every input width."""
    path, blocks = find_decoder_blocks(model)
    for i, block in enumerate(blocks):
        linears = find_linears(block)
        if config.nm is not None:
            for name, module in linears.items():
                cols = weight_matrix(module).shape[1]
                if cols % config.nm[1]:
                    raise ValueError(
                        f"pattern {config.pattern}: {path}.{i}.{name} has {cols} input features, not divisible by M={config.nm[1]}"
                    )
    return path, blocks


def check_model_and_calibration(
    model: nn.Module, data: CalibrationData, config: PruneConfig
) -> tuple[str, nn.ModuleList]:
    """All checks that must pass before any work is done."""
    path, blocks = check_structure(model, config)
    for name, actual in (("nsamples", data.num_real), ("seq_len", data.seq_len)):
        wanted = getattr(config, name)
        if wanted is not None and wanted != actual:
            what = "real samples" if name == "nsamples" else "tokens per sample"
            raise ValueError(
                f"config.{name}={wanted} but the calibration has {actual} {what}; build the calibration with "
                f"{name}={wanted} or leave config.{name} unset"
            )
    limit = max_positions(model)
    if limit is not None and data.seq_len > limit:
        raise ValueError(f"calibration sequence length {data.seq_len} exceeds the model's context of {limit} positions")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and int(data.all_ids().max()) >= vocab:
        raise ValueError(
            f"calibration token id {int(data.all_ids().max())} is outside the model's vocabulary of {vocab}"
        )
    return path, blocks


def _forward(
    blocks: list[nn.Module], inputs: BlockInputs, x: torch.Tensor, device: torch.device, batch: int
) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            outs.append(run_blocks(blocks, inputs, x[start : start + batch].to(device, torch.float32)).to(x.device))
    return torch.cat(outs)


def _collect_stats(
    block: nn.Module, method: str, inputs: BlockInputs, x: torch.Tensor, device: torch.device, batch: int
) -> dict[str, Any]:
    if method == "magnitude":
        return {}
    stats: dict[str, Any] = {}
    handles = []
    for name, module in find_linears(block).items():
        cols = weight_matrix(module).shape[1]
        stats[name] = SparseGPT(cols, device) if method == "sparsegpt" else WandaStats(cols, device)

        def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any, acc: Any = stats[name]) -> None:
            acc.add_batch(args[0])

        handles.append(module.register_forward_hook(hook))
    try:
        _forward([block], inputs, x, device, batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _prune_block(block: nn.Module, stats: dict[str, Any], config: PruneConfig, prefix: str) -> dict[str, torch.Tensor]:
    masks = {}
    for name, module in find_linears(block).items():
        weight = weight_matrix(module).detach().float()
        if config.method == "magnitude":
            new_weight, mask = weight, magnitude_mask(weight, config.sparsity, config.nm)
        elif config.method == "wanda":
            new_weight, mask = weight, wanda_mask(weight, stats[name].feature_norms(), config.sparsity, config.nm)
        else:
            updated, mask = stats[name].prune(
                weight,
                config.sparsity,
                nm=config.nm,
                blocksize=config.blocksize,
                percdamp=config.percdamp,
                name=f"{prefix}.{name}",
            )
            new_weight = updated if config.uses_obs_update else weight
        native_mask = to_native_layout(module, mask)
        with torch.no_grad():
            module.weight.copy_(to_native_layout(module, new_weight * mask))
        apply_mask(module, native_mask)
        masks[f"{prefix}.{name}"] = native_mask.cpu()
    return masks


def _baked_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with masked weights under their plain names (parametrized modules don't deepcopy)."""
    state = {k: v.detach().cpu().clone() for k, v in block.state_dict().items()}
    for name, module in block.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            prefix = f"{name}." if name else ""
            state.pop(f"{prefix}parametrizations.weight.original")
            state[f"{prefix}weight"] = module.weight.detach().cpu().clone()
    return state


def _block_state(block: nn.Module, masks: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    return {"weights": _baked_state(block), "masks": {k: v for k, v in masks.items() if k.startswith(prefix)}}


class _Checkpoint:
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
        if not isinstance(name, str) or not _Checkpoint.COMMITTED_FILE.match(name):
            raise CorruptFileError(state_file, f"lists {name!r}, which is not a checkpoint file name")
    return block_files, buffers_file


def _checked_file(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A checkpoint file loaded without running code, checked to hold what recon-prune saved there."""
    content = load_torch(path, map_location=None)  # tensors return to the device they were saved from
    if not isinstance(content, dict) or any(key not in content for key in keys):
        raise CorruptFileError(path, f"expected a mapping with {', '.join(map(repr, keys))}")
    return content


def _weights_digest(model: nn.Module, samples_per_tensor: int = 4096) -> str:
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


def _fingerprint(model: nn.Module, data: CalibrationData, config: PruneConfig) -> str:
    """Identity of a run: config, model class, model config, dense weights and calibration ids."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config_to_dict(config), sort_keys=True).encode())
    digest.update(type(model).__name__.encode())
    digest.update(
        json.dumps(getattr(getattr(model, "config", None), "to_dict", dict)(), sort_keys=True, default=str).encode()
    )
    digest.update(_weights_digest(model).encode())
    digest.update(data.all_ids().numpy().tobytes())
    digest.update(str(data.num_real).encode())
    return digest.hexdigest()


@dataclass
class _Window:
    """CR state carried to the next block: the provisional block i-1 (idle on the offload device),
    for CR without GP its dense copy (also offloaded), and its sparse-path input."""

    block: nn.Module | None = None
    dense: nn.Module | None = None
    sparse_in: torch.Tensor | None = None


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    first = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    return first.device if first is not None else default


def _copy_to(module: nn.Module, device: torch.device) -> nn.Module:
    """Deep copy of ``module`` whose parameters and buffers are created directly on ``device``.

    ``copy.deepcopy`` alone would first duplicate every tensor on the module's own (compute) device.
    """
    memo: dict[int, Any] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        copied = tensor.detach().to(device, copy=True)
        memo[id(tensor)] = (
            nn.Parameter(copied, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copied
        )
    return copy.deepcopy(module, memo)


def _restore(
    saved: dict[str, Any],
    blocks: nn.ModuleList,
    path: str,
    config: PruneConfig,
    report: PruneReport,
    offload: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, _Window]:
    """Load finished blocks, masks, buffers and the running report from a checkpoint."""
    start = saved["next_block"]
    # CR leaves block start-1 provisional, unless the run had finished: then every block is final.
    has_window = config.uses_cr and 0 < start < len(blocks)
    for index, state in saved["block_states"].items():
        if has_window and index == start - 1:  # the provisional block is kept in float32
            blocks[index].to(torch.float32)
        try:
            blocks[index].load_state_dict(state["weights"])
        except RuntimeError as exc:  # same fingerprint, so only a tampered or foreign file gets here
            reason = " ".join(str(exc).split())[:300]
            raise CorruptFileError(
                saved["block_paths"][index], f"its weights do not fit block {index} ({reason})"
            ) from exc
        report.masks.update(state["masks"])
    buffers = saved["buffers"]
    for key in ("block_errors", "reconstruction"):
        setattr(report, key, saved["report"][key])
    report.resumed_from_block = start
    window = _Window()
    if has_window:
        block = blocks[start - 1].to(offload, torch.float32)
        dense = None
        if "prev_dense_state" in buffers:
            dense = _copy_to(block, offload)
            dense.load_state_dict(buffers["prev_dense_state"])
        for name, module in find_linears(block).items():
            apply_mask(module, report.masks[f"{path}.{start - 1}.{name}"])
        window = _Window(block=block, dense=dense, sparse_in=buffers["prev_sparse_in"])
    return buffers["sparse_in"], buffers["dense_in"], window


def prune(
    model: nn.Module,
    calibration: CalibrationData | torch.Tensor,
    config: PruneConfig,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    block_callback: Callable[[int, PruneReport], None] | None = None,
) -> PruneReport:
    """Prune ``model`` in place, block by block, and return a :class:`PruneReport`.

    Args:
        model: a Hugging Face causal LM (any model whose decoder blocks can be found generically).
        calibration: :class:`~recon_prune.calibration.CalibrationData` or a ``(n, seq_len)`` tensor of
            token ids. Self-generated rows in ``CalibrationData.generated_ids`` join reconstruction only.
        config: a :class:`~recon_prune.config.PruneConfig`.
        checkpoint_dir: if given, progress is saved there after every block and a rerun with the
            same arguments resumes at the next block.
        block_callback: called as ``block_callback(i, report)`` after block ``i`` is finished (and
            checkpointed).
    """
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    data = as_calibration(calibration)
    path, blocks = check_model_and_calibration(model, data, config)
    if config.reconstruction_is_a_no_op:
        # Said once per run, here rather than when the config is built (copies of a config rebuild it),
        # so that a user does not believe a reconstruction ran.
        log.warning(
            "reconstruction='lr' is SparseGPT's weight update; method=%r has none, so the result equals "
            "reconstruction='none' (use 'br' or a GP/CR variant to reconstruct)",
            config.method,
        )
    started = time.perf_counter()
    device = resolve_device(config.device)
    offload = torch.device(config.offload_device)
    model.eval()
    if config.dtype != "auto":
        model.to(_DTYPES[config.dtype])
    model_type = str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))
    hparams = config.hparams(model_type)
    batch = hparams.batch_size
    n_real = data.num_real
    all_ids = data.all_ids()
    report = PruneReport(
        # the calibration's actual shape, which the config's values (if given) were checked against
        config=config_to_dict(config)
        | {"nsamples": n_real, "seq_len": data.seq_len, "hparams": dataclasses.asdict(hparams)},
        model_type=model_type,
        blocks_path=path,
        num_blocks=len(blocks),
        block_errors=[None] * len(blocks),
        calibration=data.describe(),
    )
    checkpoint = _Checkpoint(checkpoint_dir, _fingerprint(model, data, config)) if checkpoint_dir is not None else None
    saved = checkpoint.load() if checkpoint is not None else None
    model_dtype = next(blocks[0].parameters()).dtype
    homes = [_module_device(block, offload) for block in blocks]  # where each block goes back when final

    if saved is None:
        start = 0
        sparse_in, replay = capture_block_inputs(model, all_ids, device=device, offload_device=offload)
        sparse_in = sparse_in.float()
        dense_in = sparse_in.clone()
        window = _Window()
    else:
        start = saved["next_block"]
        _, replay = capture_block_inputs(model, all_ids[:1], device=device, offload_device=offload)
        sparse_in, dense_in, window = _restore(saved, blocks, path, config, report, offload)
        log.info("resuming from checkpoint %s at block %d", checkpoint_dir, start)
    replay_dev = replay.to(device)
    # CR without GP targets the dense window (i-1, i), so the dense block i-1 must outlive its pruning;
    # every other target is computed from block i itself before it is pruned (no dense copy at all).
    keeps_dense_copy = config.uses_cr and not config.uses_gp

    for i in progress(
        range(start, len(blocks)), desc=f"pruning ({config.method}, {config.reconstruction})", total=len(blocks) - start
    ):
        block = blocks[i].to(device, torch.float32)
        prefix = f"{path}.{i}"
        last = i == len(blocks) - 1
        dense_out = _forward([block], replay_dev, dense_in, device, batch)
        target = None
        if config.uses_gp:
            target = dense_out
        elif config.uses_block_training:
            if config.uses_cr and window.block is not None:  # dense window (i-1, i) on block i-1's inputs
                target = _forward([window.dense.to(device), block], replay_dev, window.sparse_in, device, batch)
                window.dense = None
            else:  # BR: the dense block on the sparse-path inputs
                target = _forward([block], replay_dev, sparse_in, device, batch)
        dense_copy = _copy_to(block, offload) if keeps_dense_copy and not last else None
        stats = _collect_stats(block, config.method, replay_dev, sparse_in[:n_real], device, batch)
        report.masks.update(_prune_block(block, stats, config, prefix))
        del stats
        seed = config.seed * 1_000_003 + i
        step_report: dict[str, float] = {"block": float(i)}
        finished: dict[int, nn.Module] = {}
        if config.uses_cr:  # train the window (block i-1, block i) from the sparse inputs of block i-1
            prev = window.block
            if prev is not None:
                prev.to(device)
            sparse_blocks = [prev, block] if prev is not None else [block]
            window_in = window.sparse_in if prev is not None else sparse_in
            step_report |= train_blocks(sparse_blocks, replay_dev, window_in, target, hparams, device=device, seed=seed)
            if prev is not None:  # block i-1 is final now: its output is block i's input
                sparse_in = _forward([prev], replay_dev, window.sparse_in, device, batch)
                report.block_errors[i - 1] = mse(sparse_in[:n_real], dense_in[:n_real])
                finished[i - 1] = prev
        elif config.uses_block_training:
            step_report |= train_blocks([block], replay_dev, sparse_in, target, hparams, device=device, seed=seed)
        del target
        sparse_out = _forward([block], replay_dev, sparse_in, device, batch)
        report.block_errors[i] = mse(sparse_out[:n_real], dense_out[:n_real])
        report.reconstruction.append(step_report)
        if not config.uses_cr or last:
            finished[i] = block
        for index, done in finished.items():  # back where the block was before the run, in the model's dtype
            bake_masks(done)
            done.to(homes[index], model_dtype)
        keep_window = config.uses_cr and not last
        if checkpoint is not None:
            states = {index: _block_state(done, report.masks, f"{path}.{index}.") for index, done in finished.items()}
            buffers: dict[str, Any] = {"sparse_in": sparse_out, "dense_in": dense_out}
            if keep_window:  # the provisional block i, its input and (CR without GP) the dense block i
                states[i] = _block_state(block, report.masks, f"{prefix}.")
                buffers["prev_sparse_in"] = sparse_in
                if dense_copy is not None:
                    buffers["prev_dense_state"] = _baked_state(dense_copy)
            progress_so_far = {"block_errors": report.block_errors, "reconstruction": report.reconstruction}
            checkpoint.save(i + 1, states, buffers, progress_so_far)
        if keep_window:  # idle until it trains again as the first block of the next window
            window = _Window(block=block.to(offload), dense=dense_copy, sparse_in=sparse_in)
        sparse_in, dense_in = sparse_out, dense_out
        report.elapsed_s = time.perf_counter() - started
        log.info("block %d/%d: error %.4g", i + 1, len(blocks), report.block_errors[i])
        if block_callback is not None:
            block_callback(i, report)
    report.sparsity = sparsity_report(model)
    report.elapsed_s = time.perf_counter() - started
    return report
