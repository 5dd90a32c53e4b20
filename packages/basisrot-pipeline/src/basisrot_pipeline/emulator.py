"""Exact in-process emulation of an asynchronous pipeline's staleness.

For minibatch ``m``, stage ``s`` runs its forward with its own weights at version
``max(0, m - tau_s)`` (``torch.func.functional_call`` over stashed copies); the resulting gradient
of each stage is applied to that stage's *current* weights (version ``m``). With weight stashing
(PipeDream) the backward uses the same old weights as the forward; without it the backward
recomputes the stage on its stored input with the current weights, as a real pipeline without
stashing does. Each stage keeps at most ``tau_s + 1`` versions (a ring buffer of ``P - s`` for
asynchronous 1F1B). This matches a real multi-process 1F1B run step by step (see
:mod:`basisrot_pipeline.runtime` and the test suite), and is NOT the same as a FIFO of whole-model
gradients, which would evaluate every stage at one common old version (spec of arXiv 2602.03515's
setting, Section 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from basisrot_pipeline.model import GPT, ModelConfig, lm_loss, partition_model
from basisrot_pipeline.optim.factory import OptimConfig, build_optimizer, optimizer_step
from basisrot_pipeline.resume import check_same_config
from shin_common import config_to_dict


class StalenessEmulator:
    """Train ``stages`` (a partitioned model) one minibatch at a time with per-stage delays.

    Args:
        stages: the pipeline stages in order; the last one returns logits.
        optimizers: one optimizer per stage.
        delays: ``tau_s`` per stage (see :func:`basisrot_pipeline.staleness.staleness_schedule`).
        optim_config: lr schedule, clipping and PipeDream-LR settings.
        total_steps: length of the run (for the cosine schedule).
        weight_stashing: backward with the forward's weights (True) or the current ones (False).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        delays: Sequence[int],
        *,
        optim_config: OptimConfig,
        total_steps: int,
        weight_stashing: bool = True,
    ) -> None:
        if not (len(stages) == len(optimizers) == len(delays)):
            raise ValueError(
                f"need one optimizer and one delay per stage, got {len(stages)} stages, "
                f"{len(optimizers)} optimizers, {len(delays)} delays"
            )
        self.stages = list(stages)
        self.optimizers = list(optimizers)
        self.delays = tuple(delays)
        self.optim_config = optim_config
        self.total_steps = total_steps
        self.weight_stashing = weight_stashing
        self.updates = 0
        self.stash: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in self.stages]

    def _weights(self, s: int, version: int) -> dict[str, torch.Tensor]:
        if version == self.updates:
            return dict(self.stages[s].named_parameters())
        return self.stash[s][version]

    @staticmethod
    def _leaves(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: w.detach().requires_grad_() for name, w in weights.items()}

    def _gradients_stashed(self, versions, inputs, targets):
        leaves = [self._leaves(self._weights(s, v)) for s, v in enumerate(versions)]
        h = inputs
        for stage, weights in zip(self.stages, leaves, strict=True):
            h = functional_call(stage, weights, (h,))
        loss = lm_loss(h, targets)
        flat = torch.autograd.grad(loss, [w for weights in leaves for w in weights.values()])
        grads, offset = [], 0
        for weights in leaves:
            grads.append(list(flat[offset : offset + len(weights)]))
            offset += len(weights)
        return loss.detach(), grads

    def _gradients_unstashed(self, versions, inputs, targets):
        stage_inputs, h = [], inputs
        with torch.no_grad():
            for s, (stage, v) in enumerate(zip(self.stages, versions, strict=True)):
                stage_inputs.append(h)
                h = functional_call(stage, self._weights(s, v), (h,))
            loss = lm_loss(h, targets)
        grads: list[list[torch.Tensor]] = [[] for _ in self.stages]
        grad_output = None
        for s in reversed(range(len(self.stages))):
            weights = self._leaves(self._weights(s, self.updates))
            x = stage_inputs[s].detach().requires_grad_(s > 0)
            out = functional_call(self.stages[s], weights, (x,))
            wrt = [*weights.values(), x] if s > 0 else list(weights.values())
            if grad_output is None:
                result = torch.autograd.grad(lm_loss(out, targets), wrt)
            else:
                result = torch.autograd.grad(out, wrt, grad_outputs=grad_output)
            grads[s] = list(result[: len(weights)])
            grad_output = result[-1] if s > 0 else None
        return loss, grads

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Process minibatch number ``self.updates``; returns its training loss."""
        m = self.updates
        versions = [max(0, m - d) for d in self.delays]
        if self.weight_stashing:
            loss, grads = self._gradients_stashed(versions, inputs, targets)
        else:
            loss, grads = self._gradients_unstashed(versions, inputs, targets)
        for s, (stage, optimizer, delay) in enumerate(zip(self.stages, self.optimizers, self.delays, strict=True)):
            if delay > 0:  # version m is read by minibatches up to m + delay
                self.stash[s][m] = {name: p.detach().clone() for name, p in stage.named_parameters()}
            for p, g in zip(stage.parameters(), grads[s], strict=True):
                p.grad = g
            optimizer_step(stage, optimizer, self.optim_config, step=m, total_steps=self.total_steps, delay=delay)
            oldest_needed = m + 1 - delay
            for version in [v for v in self.stash[s] if v < oldest_needed]:
                del self.stash[s][version]
        self.updates += 1
        return float(loss)

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to continue: delays, stashing, run length, optimizer config."""
        return {
            "delays": list(self.delays),
            "weight_stashing": self.weight_stashing,
            "total_steps": self.total_steps,
            "optim": config_to_dict(self.optim_config),
        }

    def state_dict(self) -> dict[str, Any]:
        """Weights, stashed versions, the update counter and every optimizer's state (bases included)."""
        return {
            "settings": self.settings(),
            "updates": self.updates,
            "delays": list(self.delays),
            "weight_stashing": self.weight_stashing,
            "stages": [stage.state_dict() for stage in self.stages],
            "stash": [{v: dict(w) for v, w in stash.items()} for stash in self.stash],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses one saved with other delays, run length or optimizer settings
        (the optimizers' state would otherwise bring back the saved lr and refresh frequency)."""
        check_same_config(state.get("settings"), self.settings(), where="the emulator checkpoint")
        self.updates = int(state["updates"])
        for stage, weights in zip(self.stages, state["stages"], strict=True):
            stage.load_state_dict(weights)
        self.stash = [{int(v): dict(w) for v, w in stash.items()} for stash in state["stash"]]
        for optimizer, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(opt_state)


def build_emulator(
    model_config: ModelConfig,
    optim_config: OptimConfig,
    delays: Sequence[int],
    *,
    total_steps: int,
    weight_stashing: bool = True,
    seed: int = 0,
) -> tuple[GPT, StalenessEmulator]:
    """A freshly initialised decoder (seeded) split into ``len(delays)`` stages, and its emulator."""
    torch.manual_seed(seed)
    model = GPT(model_config)
    stages = partition_model(model, len(delays))
    delays = tuple(delays)
    optimizers = [build_optimizer(stage, optim_config, delays=delays, stage=s) for s, stage in enumerate(stages)]
    emulator = StalenessEmulator(
        stages,
        optimizers,
        delays,
        optim_config=optim_config,
        total_steps=total_steps,
        weight_stashing=weight_stashing,
    )
    return model, emulator
