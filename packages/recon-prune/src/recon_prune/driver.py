"""Sequential pruning driver: one decoder block on the compute device at a time.

For block ``i`` (Shin et al. 2024, Sec. 3 and Fig. 1):

1. block ``i`` itself, before it is pruned, maps the dense-path inputs to the next dense-path
   activations (the GP targets and the reference for the per-depth error) and, for BR, the
   sparse-path inputs to the BR targets, so no dense copy of the block is needed;
2. mask statistics (Hessian for SparseGPT, input norms for Wanda) are collected on the sparse-path
   inputs of the real calibration samples only; each expert of a fused mixture-of-experts layer gets
   its own, from the tokens routed to it (:mod:`recon_prune.experts`);
3. every linear layer and every expert's slice of a fused experts parameter is pruned (SparseGPT
   also applies its closed-form OBS update = LR), and the masks are frozen; routers stay dense;
4. BR trains the block towards its targets on the sparse inputs, GP towards the dense path; CR
   trains the window of blocks ``i-1, i`` (stride 1) from the sparse inputs of block ``i-1``. The
   provisional block ``i-1`` waits on ``offload_device`` between its two trainings, and CR without
   GP keeps a dense copy of it there for the window target;
5. the sparse-path activations advance, and the error ``MSE(sparse path, dense path)`` at this
   depth is recorded; a final block goes back to the device it was on before the run.

Both activation buffers live on ``offload_device``. With a checkpoint directory, each finished
block, the buffers and the running report are committed atomically (see :class:`~recon_prune.checkpoint.Checkpoint`), so a
run killed at any point continues at the next block and ends with the same model as an
uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recon_prune.calibration import CalibrationData, as_calibration
from recon_prune.checkpoint import Checkpoint, baked_state, block_state, fingerprint
from recon_prune.config import (
    ALL_TOKENS,
    DENSE_BLOCK_ON_RECONSTRUCTED,
    DENSE_WINDOW,
    PruneConfig,
    ReconstructionHParams,
)
from recon_prune.deploy import attach_sparsity_record
from recon_prune.evaluate import sparsity_report
from recon_prune.experts import (
    ExpertStatistics,
    expert_matrix,
    expert_parameter_names,
    find_fused_experts,
    to_native_expert_layout,
)
from recon_prune.methods import BLOCK_TARGET, DENSE_PATH_TARGET
from recon_prune.model_adapter import (
    BlockCalls,
    BlockInputs,
    capture_block_inputs,
    find_linears,
    run_blocks,
    to_native_layout,
    weight_matrix,
)
from recon_prune.reconstruct import apply_mask, bake_masks, mse, train_blocks
from recon_prune.report import PruneReport
from recon_prune.validation import check_model_and_calibration
from shin_common import CorruptFileError, config_to_dict, progress

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _forward(
    blocks: list[nn.Module], inputs: list[BlockInputs], x: torch.Tensor, device: torch.device, batch: int
) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            outs.append(run_blocks(blocks, inputs, x[start : start + batch].to(device, torch.float32)).to(x.device))
    return torch.cat(outs)


def _collect_stats(
    block: nn.Module,
    config: PruneConfig,
    inputs: BlockInputs,
    x: torch.Tensor,
    device: torch.device,
    batch: int,
) -> tuple[dict[str, Any], dict[str, ExpertStatistics]]:
    """The mask method's statistics of every linear layer's inputs over ``x`` and of every fused
    expert's (see :mod:`recon_prune.experts`); nothing for a method without a collector.

    A second pass over ``x`` calibrates, on all tokens, the experts that no routed token reached."""
    method = config.mask_method
    if method.collector is None:
        return {}, {}
    stats: dict[str, Any] = {}
    handles = []
    for name, module in find_linears(block).items():
        stats[name] = method.collector(weight_matrix(module).shape[1], device)

        def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any, acc: Any = stats[name]) -> None:
            acc.add_batch(args[0])

        handles.append(module.register_forward_hook(hook))
    experts: dict[str, ExpertStatistics] = {}
    expert_handles = []
    for name, module in find_fused_experts(block).items():
        experts[name] = ExpertStatistics(module, method.collector, device)
        if config.expert_calibration == ALL_TOKENS:
            experts[name].all_tokens_for = set(range(experts[name].num_experts))
        expert_handles.append(module.register_forward_pre_hook(experts[name].hook, with_kwargs=True))
    try:
        _forward([block], [inputs], x, device, batch)
        for handle in handles:  # the linear layers have their statistics
            handle.remove()
        if config.expert_calibration != ALL_TOKENS:
            for collected in experts.values():  # a second pass feeds only the experts no token reached
                collected.routed, collected.count = False, False
                collected.all_tokens_for = {e for e, n in enumerate(collected.tokens) if n == 0}
            if any(collected.all_tokens_for for collected in experts.values()):
                _forward([block], [inputs], x, device, batch)
    finally:
        for handle in (*handles, *expert_handles):
            handle.remove()
    return stats, experts


def _prune_linears(
    block: nn.Module, stats: dict[str, Any], config: PruneConfig, prefix: str
) -> dict[str, torch.Tensor]:
    """Choose every linear layer's mask, write the kept weights and freeze the mask."""
    method = config.mask_method
    masks = {}
    for name, module in find_linears(block).items():
        weight = weight_matrix(module).detach().float()
        selected, mask = method.select(weight, stats.get(name), config, f"{prefix}.{name}")
        new_weight = selected if config.uses_obs_update else weight
        native_mask = to_native_layout(module, mask)
        with torch.no_grad():
            module.weight.copy_(to_native_layout(module, new_weight * mask))
        apply_mask(module, native_mask)
        masks[f"{prefix}.{name}"] = native_mask.cpu()
    return masks


def _prune_experts(
    block: nn.Module, experts: dict[str, ExpertStatistics], config: PruneConfig, prefix: str
) -> dict[str, torch.Tensor]:
    """Choose each expert's mask in every fused experts parameter (one ``(out, in)`` slice at a time,
    from that expert's own statistics), write the kept weights and freeze the ``(experts, ...)`` mask."""
    method = config.mask_method
    masks = {}
    for name, module in find_fused_experts(block).items():
        collected = experts.get(name)
        for parameter in expert_parameter_names(module):
            fused = getattr(module, parameter)
            new_fused = fused.detach().clone()
            expert_masks = []
            for e in range(fused.shape[0]):
                weight = expert_matrix(module, parameter, e).detach().float()
                stats = collected.stats.pop((parameter, e)) if collected is not None else None
                selected, mask = method.select(weight, stats, config, f"{prefix}.{name}.{parameter}[{e}]")
                kept = selected if config.uses_obs_update else weight
                new_fused[e] = to_native_expert_layout(module, kept * mask).to(new_fused.dtype)
                expert_masks.append(to_native_expert_layout(module, mask))
            native_mask = torch.stack(expert_masks)
            with torch.no_grad():
                fused.copy_(new_fused)
            apply_mask(module, native_mask, parameter)
            masks[f"{prefix}.{name}.{parameter}"] = native_mask.cpu()
    return masks


def _record_expert_tokens(report: PruneReport, experts: dict[str, ExpertStatistics], prefix: str) -> None:
    """Each expert's routed token count and the experts calibrated on all tokens, in the report; a
    warning names every expert that no calibration token reached."""
    for name, collected in experts.items():
        key = f"{prefix}.{name}"
        report.experts[key] = {"tokens": collected.tokens, "calibrated_on_all_tokens": sorted(collected.all_tokens_for)}
        unreached = [e for e, n in enumerate(collected.tokens) if n == 0]
        if unreached:
            log.warning(
                "%s: experts %s received no calibration token from the router; their masks use the statistics "
                "of all calibration tokens",
                key,
                unreached,
            )


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
    report.experts = saved["report"].get("experts", {})
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
        for name, module in find_fused_experts(block).items():
            for parameter in expert_parameter_names(module):
                apply_mask(module, report.masks[f"{path}.{start - 1}.{name}.{parameter}"], parameter)
        window = _Window(block=block, dense=dense, sparse_in=buffers["prev_sparse_in"])
    return buffers["sparse_in"], buffers["dense_in"], window


@dataclass
class _Run:
    """What every block of one run shares: the blocks, where things live, the report and the checkpoint."""

    config: PruneConfig
    hparams: ReconstructionHParams
    blocks: nn.ModuleList
    path: str
    replay: BlockCalls  # every block's own captured arguments, on the compute device
    report: PruneReport
    checkpoint: Checkpoint | None
    device: torch.device
    offload: torch.device
    num_real: int  # mask statistics and errors use the real samples only
    homes: list[torch.device]  # where each block goes back when final
    model_dtype: torch.dtype

    def calls(self, first: int, count: int) -> list[BlockInputs]:
        """The arguments of blocks ``first, ..., first + count - 1``."""
        return list(self.replay[first : first + count])

    def forward(self, first: int, blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """``blocks`` (model blocks ``first, first + 1, ...`` or copies of them) applied to ``x``."""
        return _forward(blocks, self.calls(first, len(blocks)), x, self.device, self.hparams.batch_size)


def _target(
    run: _Run, i: int, block: nn.Module, sparse_in: torch.Tensor, dense_out: torch.Tensor, window: _Window
) -> torch.Tensor | None:
    """What block ``i`` (with block ``i-1`` under CR) trains towards, computed before it is pruned."""
    technique = run.config.technique
    if technique.target == DENSE_PATH_TARGET:
        return dense_out
    if technique.target != BLOCK_TARGET:
        return None
    if technique.window == 2 and window.block is not None and run.config.cr_target == DENSE_BLOCK_ON_RECONSTRUCTED:
        # the authors' target: dense block i on the output of the reconstructed (provisional) block i-1
        provisional_out = run.forward(i - 1, [window.block.to(run.device)], window.sparse_in)
        return run.forward(i, [block], provisional_out)
    if technique.window == 2 and window.block is not None:  # dense window (i-1, i) on block i-1's inputs
        target = run.forward(i - 1, [window.dense.to(run.device), block], window.sparse_in)
        window.dense = None
        return target
    return run.forward(i, [block], sparse_in)  # BR: the dense block on the sparse-path inputs


def _reconstruct(
    run: _Run,
    i: int,
    block: nn.Module,
    target: torch.Tensor | None,
    sparse_in: torch.Tensor,
    dense_in: torch.Tensor,
    window: _Window,
    dense_out: torch.Tensor,
    dense_copy: nn.Module | None,
) -> tuple[dict[str, float], dict[int, nn.Module], torch.Tensor]:
    """Train the pruned block (or the CR window); returns the step's report, the blocks now final and
    block ``i``'s sparse-path input (under CR it comes from the just-finished block ``i-1``).

    CR trains the windows ``[0], [0, 1], ..., [L-2, L-1]`` and then ``[L-1]`` alone, as the authors'
    code does, so every block is trained twice; the last window's target is the dense path under GP
    and otherwise the dense block ``L-1`` (``dense_copy``) on the output of the final block ``L-2``."""
    config, n_real = run.config, run.num_real
    seed = config.seed * 1_000_003 + i
    step_report: dict[str, float] = {"block": float(i)}
    finished: dict[int, nn.Module] = {}
    train = dict(hparams=run.hparams, device=run.device, seed=seed)
    if config.uses_cr:  # train the window (block i-1, block i) from the sparse inputs of block i-1
        prev = window.block
        if prev is None:
            step_report |= train_blocks([block], run.calls(i, 1), sparse_in, target, **train)
        else:
            prev.to(run.device)
            step_report |= train_blocks([prev, block], run.calls(i - 1, 2), window.sparse_in, target, **train)
            sparse_in = run.forward(i - 1, [prev], window.sparse_in)  # block i-1 is final now
            run.report.block_errors[i - 1] = mse(sparse_in[:n_real], dense_in[:n_real])
            finished[i - 1] = prev
        if i == len(run.blocks) - 1:  # the last block alone, from the inputs of the now final block i-1
            last_target = dense_out if config.uses_gp else run.forward(i, [dense_copy.to(run.device)], sparse_in)
            alone = train_blocks([block], run.calls(i, 1), sparse_in, last_target, **(train | {"seed": seed + 1}))
            step_report |= {f"last_alone_{key}": value for key, value in alone.items()}
    elif config.uses_block_training:
        step_report |= train_blocks([block], run.calls(i, 1), sparse_in, target, **train)
    return step_report, finished, sparse_in


def _save_checkpoint(
    run: _Run,
    i: int,
    finished: dict[int, nn.Module],
    outputs: tuple[torch.Tensor, torch.Tensor],
    window: _Window | None,
) -> None:
    """Commit the finished blocks, the next block's inputs and, under CR, the provisional window."""
    masks = run.report.masks
    states = {index: block_state(done, masks, f"{run.path}.{index}.") for index, done in finished.items()}
    buffers: dict[str, Any] = {"sparse_in": outputs[0], "dense_in": outputs[1]}
    if window is not None:  # the provisional block i, its input and (CR without GP) the dense block i
        states[i] = block_state(window.block, masks, f"{run.path}.{i}.")
        buffers["prev_sparse_in"] = window.sparse_in
        if window.dense is not None:
            buffers["prev_dense_state"] = baked_state(window.dense)
    progress_so_far = {
        "block_errors": run.report.block_errors,
        "reconstruction": run.report.reconstruction,
        "experts": run.report.experts,
    }
    run.checkpoint.save(i + 1, states, buffers, progress_so_far)


def _prune_block(
    run: _Run, i: int, sparse_in: torch.Tensor, dense_in: torch.Tensor, window: _Window
) -> tuple[torch.Tensor, torch.Tensor, _Window]:
    """Steps 1-5 of the module docstring for block ``i``; returns the next block's inputs and the CR window."""
    config, report, n_real = run.config, run.report, run.num_real
    last = i == len(run.blocks) - 1
    block = run.blocks[i].to(run.device, torch.float32)
    dense_out = run.forward(i, [block], dense_in)
    target = _target(run, i, block, sparse_in, dense_out, window)
    # CR without GP targets the dense window (i, i+1) next time, and the last block's final window its
    # dense self on new inputs, so the dense block i must outlive its pruning; every other target is
    # computed from block i itself before it is pruned (no dense copy).
    keeps_dense = config.cr_target == DENSE_WINDOW or last
    dense_copy = _copy_to(block, run.offload) if config.uses_cr and not config.uses_gp and keeps_dense else None
    stats, expert_stats = _collect_stats(
        block, config, run.replay[i], sparse_in[:n_real], run.device, run.hparams.batch_size
    )
    report.masks.update(_prune_linears(block, stats, config, f"{run.path}.{i}"))
    _record_expert_tokens(report, expert_stats, f"{run.path}.{i}")
    report.masks.update(_prune_experts(block, expert_stats, config, f"{run.path}.{i}"))
    del stats, expert_stats
    step_report, finished, sparse_in = _reconstruct(
        run, i, block, target, sparse_in, dense_in, window, dense_out, dense_copy if last else None
    )
    del target
    sparse_out = run.forward(i, [block], sparse_in)
    report.block_errors[i] = mse(sparse_out[:n_real], dense_out[:n_real])
    report.reconstruction.append(step_report)
    if not config.uses_cr or last:
        finished[i] = block
    for index, done in finished.items():  # back where the block was before the run, in the model's dtype
        bake_masks(done)
        done.to(run.homes[index], run.model_dtype)
    next_window = None
    if config.uses_cr and not last:
        next_window = _Window(block=block, dense=dense_copy, sparse_in=sparse_in)
    if run.checkpoint is not None:
        _save_checkpoint(run, i, finished, (sparse_out, dense_out), next_window)
    if next_window is None:
        return sparse_out, dense_out, _Window()
    next_window.block.to(run.offload)  # idle until it trains again as the first block of the next window
    return sparse_out, dense_out, next_window


def _new_report(
    model: nn.Module, data: CalibrationData, config: PruneConfig, path: str, num_blocks: int
) -> PruneReport:
    model_type = str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))
    return PruneReport(
        # the calibration's actual shape, which the config's values (if given) were checked against
        config=config_to_dict(config)
        | {
            "nsamples": data.num_real,
            "seq_len": data.seq_len,
            "hparams": dataclasses.asdict(config.hparams(model_type)),
        },
        model_type=model_type,
        blocks_path=path,
        num_blocks=num_blocks,
        block_errors=[None] * num_blocks,
        calibration=data.describe(),
    )


def _warn_left_dense(dense: dict[str, dict[str, Any]]) -> None:
    """Say which weight matrices stayed dense (the fused experts and router of a mixture-of-experts
    model), so a low overall sparsity is not mistaken for a failed prune."""
    if not dense:
        return
    by_reason: dict[str, int] = {}
    for entry in dense.values():
        by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + entry["matrices"]
    summary = "; ".join(f"{count} matrices: {reason}" for reason, count in by_reason.items())
    log.warning("weight matrices left dense (counted in the sparsity report): %s", summary)


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
    device, offload = resolve_device(config.device), torch.device(config.offload_device)
    model.eval()
    if config.dtype != "auto":
        model.to(_DTYPES[config.dtype])
    report = _new_report(model, data, config, path, len(blocks))
    checkpoint = Checkpoint(checkpoint_dir, fingerprint(model, data, config)) if checkpoint_dir is not None else None
    saved = checkpoint.load() if checkpoint is not None else None
    model_dtype = next(blocks[0].parameters()).dtype
    homes = [_module_device(block, offload) for block in blocks]  # taken before a restore moves any block
    if saved is None:
        start, window = 0, _Window()
        sparse_in, replay = capture_block_inputs(model, data.all_ids(), device=device, offload_device=offload)
        sparse_in = sparse_in.float()
        dense_in = sparse_in.clone()
    else:
        start = saved["next_block"]
        _, replay = capture_block_inputs(model, data.all_ids()[:1], device=device, offload_device=offload)
        sparse_in, dense_in, window = _restore(saved, blocks, path, config, report, offload)
        log.info("resuming from checkpoint %s at block %d", checkpoint_dir, start)
    run = _Run(
        config=config,
        hparams=config.hparams(report.model_type),
        blocks=blocks,
        path=path,
        replay=replay.to(device),
        report=report,
        checkpoint=checkpoint,
        device=device,
        offload=offload,
        num_real=data.num_real,
        homes=homes,
        model_dtype=model_dtype,
    )
    desc = f"pruning ({config.method}, {config.reconstruction})"
    for i in progress(range(start, len(blocks)), desc=desc, total=len(blocks) - start):
        sparse_in, dense_in, window = _prune_block(run, i, sparse_in, dense_in, window)
        report.elapsed_s = time.perf_counter() - started
        log.info("block %d/%d: error %.4g", i + 1, len(blocks), report.block_errors[i])
        if block_callback is not None:
            block_callback(i, report)
    report.sparsity = sparsity_report(model)
    _warn_left_dense(report.sparsity["dense"])
    attach_sparsity_record(model, report)  # config.json then says what was done (docs: the sparsity record)
    report.elapsed_s = time.perf_counter() - started
    return report
