"""Frozen masks and block-wise reconstruction (BR / GP / CR) by gradient descent.

Shin et al. 2024 (arXiv 2406.15524), Sec. 3: after the masks are chosen they are frozen and the
remaining parameters of a block (weights, biases, norms) are trained to minimise the MSE between
the sparse block's output and a target: the dense block on the same sparse-path inputs (BR), the
dense model's output on the dense path (GP), or the output of a window of two consecutive blocks
(CR). Optimizer per the paper's Sec. 4: AdamW, linear decay to 0 with no warm-up, gradient
clipping, MSE loss.

Masks are applied as a parametrization ``W = W_orig * mask``: the forward only ever sees the masked
weight, the gradient of every pruned entry is exactly zero, and :func:`bake_masks` writes
``W_orig * mask`` back, so pruned weights stay exactly 0. The fused 3-d expert parameters of a
mixture-of-experts layer carry their ``(experts, out, in)`` mask the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from recon_prune.config import ReconstructionHParams
from recon_prune.model_adapter import BlockInputs, run_blocks

log = logging.getLogger(__name__)


class MaskParametrization(nn.Module):
    """``weight -> weight * mask`` with a fixed boolean mask in the weight's own layout."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def apply_mask(module: nn.Module, native_mask: torch.Tensor, name: str = "weight") -> None:
    """Zero the pruned entries of ``module.<name>`` and freeze the mask as its parametrization
    (``name`` is a fused experts parameter such as ``gate_up_proj`` for a mixture-of-experts layer)."""
    tensor = getattr(module, name)
    mask = native_mask.to(tensor.device, torch.bool)
    if mask.shape != tensor.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} {tuple(tensor.shape)}")
    with torch.no_grad():
        tensor.mul_(mask.to(tensor.dtype))
    parametrize.register_parametrization(module, name, MaskParametrization(mask))


def bake_masks(block: nn.Module) -> None:
    """Remove every mask parametrization of ``block``, leaving the plain masked tensors."""
    for module in list(block.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.mse_loss(a.float(), b.float()).item()


@torch.no_grad()
def evaluate_loss(
    blocks: Sequence[nn.Module],
    block_inputs: BlockInputs | Sequence[BlockInputs],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    device: torch.device | str,
    batch_size: int = 8,
) -> float:
    """Mean squared error of ``blocks`` on ``inputs`` against ``targets`` (token-weighted mean)."""
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device, torch.float32)
        y = targets[start : start + batch_size].to(device, torch.float32)
        out = run_blocks(blocks, block_inputs, x)
        total += torch.nn.functional.mse_loss(out, y, reduction="sum").item()
        count += y.numel()
    return total / max(count, 1)


def train_blocks(
    blocks: Sequence[nn.Module],
    block_inputs: BlockInputs | Sequence[BlockInputs],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    hparams: ReconstructionHParams,
    *,
    device: torch.device | str,
    seed: int,
) -> dict[str, float]:
    """Train every parameter of ``blocks`` (masks frozen) so that ``blocks(inputs) ~= targets``.

    ``inputs``/``targets`` are ``(n, seq, hidden)`` on any device; mini-batches move to ``device``.
    Shuffling uses a generator seeded by ``seed`` so a resumed run repeats it exactly.
    Returns the MSE before and after training and the number of optimizer steps.
    """
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
    params = [p for block in blocks for p in block.parameters()]
    # Every parameter is trained (the paper trains all of a block's weights, biases and norms), and
    # each one's own requires_grad flag is given back afterwards, frozen ones included, so a model
    # that is fine-tuned after pruning trains exactly what it trained before.
    own_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    loss_before = evaluate_loss(blocks, block_inputs, inputs, targets, device=device, batch_size=hparams.batch_size)
    n = inputs.shape[0]
    steps_per_epoch = -(-n // hparams.batch_size)
    total_steps = steps_per_epoch * hparams.epochs
    optimizer = torch.optim.AdamW(
        params, lr=hparams.lr, betas=hparams.betas, eps=hparams.eps, weight_decay=hparams.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    generator = torch.Generator().manual_seed(seed)
    # Blocks stay in eval mode: dropout would make the objective noisy and a resumed run differ.
    with torch.enable_grad():
        for _epoch in range(hparams.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, hparams.batch_size):
                index = order[start : start + hparams.batch_size]
                x = inputs[index].to(device, torch.float32)
                y = targets[index].to(device, torch.float32)
                # one masked copy of each parametrized tensor per forward: the experts module reads
                # its fused parameter once per expert
                with parametrize.cached():
                    loss = torch.nn.functional.mse_loss(run_blocks(blocks, block_inputs, x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, hparams.grad_clip)
                optimizer.step()
                scheduler.step()
    for p, flag in zip(params, own_flags, strict=True):
        p.requires_grad_(flag)
    loss_after = evaluate_loss(blocks, block_inputs, inputs, targets, device=device, batch_size=hparams.batch_size)
    log.debug("reconstruction: loss %.4g -> %.4g in %d steps", loss_before, loss_after, total_steps)
    return {"loss_before": loss_before, "loss_after": loss_after, "steps": float(total_steps)}
