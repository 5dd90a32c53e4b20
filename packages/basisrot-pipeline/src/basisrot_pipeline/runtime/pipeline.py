"""One stage of a real asynchronous pipeline (PipeDream 1F1B without flushes) on torch.distributed.

Narayanan et al., "PipeDream: Generalized Pipeline Parallelism for DNN Training", SOSP 2019,
Section 3.3 (1F1B scheduling, weight stashing). Stage ``s`` of ``P`` does ``P-1-s`` warm-up
forwards and then alternates one forward and one backward + optimizer step per minibatch, so its
forward of minibatch ``m`` sees its weights after ``m - (P-1-s)`` updates (the staleness the
emulator reproduces). The forward runs without autograd, stashes ``(input, weight version)`` and
sends the activation; the backward recomputes the stage on the stashed input with the stashed
weights (or the current ones without stashing), backpropagates the gradient received from the
next stage, sends the input gradient back and steps. Stashed weights form a ring buffer of at
most ``P - s`` versions.

Message order: between stages ``s`` and ``s+1`` stage ``s`` posts (receive grad ``i``, send
activation ``i+P-1-s``) per steady-state iteration and stage ``s+1`` posts (send grad ``i``,
receive activation ``i+P-1-s``) in the same order, so the exchange is also valid where tags are
ignored (NCCL). Tags distinguish activations from gradients on gloo.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.func import functional_call

from basisrot_pipeline.data import TokenBatches
from basisrot_pipeline.model import GPT, ModelConfig, lm_loss, partition_model
from basisrot_pipeline.optim.factory import OptimConfig, build_optimizer, optimizer_step
from basisrot_pipeline.resume import check_same_config
from basisrot_pipeline.staleness import staleness_schedule
from shin_common import CorruptFileError, config_to_dict, load_torch, save_torch_atomic, write_json_atomic

logger = logging.getLogger(__name__)

ACTIVATION, GRADIENT = 0, 1
CHECKPOINT_KEYS = frozenset(
    {"stage", "optimizer", "stash", "in_flight", "pending_input", "version", "next_forward", "next_backward", "losses"}
)


def message_tag(minibatch: int, kind: int) -> int:
    return 2 * minibatch + kind


def checkpoint_path(directory: str | Path, step: int, stage: int) -> Path:
    return Path(directory) / f"step_{step:08d}" / f"stage_{stage}.pt"


def checkpoint_settings_path(directory: str | Path, step: int) -> Path:
    """The settings of the checkpoint at ``step`` as JSON, readable without loading any stage."""
    return Path(directory) / f"step_{step:08d}" / "settings.json"


def final_weights_path(directory: str | Path, stage: int) -> Path:
    """Where a finished run leaves stage ``stage``'s weights (for evaluating the assembled model)."""
    return Path(directory) / "final_weights" / f"stage_{stage}.pt"


# keys of a training run's config that PipelineJob fields hold too (``stages`` as ``num_stages``)
RUN_KEYS_COVERED_BY_JOB = frozenset({"model", "optim", "stages", "steps", "seed", "weight_stashing", "batch_size"})


@dataclass(kw_only=True)
class PipelineJob:
    """Everything one pipeline process needs (picklable, identical on every rank)."""

    model: ModelConfig
    optim: OptimConfig
    num_stages: int
    steps: int
    batches: TokenBatches
    seed: int = 0
    weight_stashing: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    stop_after: int | None = None
    resume_step: int | None = None
    device: str = "cpu"
    run_config: dict[str, Any] | None = None  # the training run's config, checked on resume
    threads: int = 1  # torch threads per stage process on CPU (TrainConfig.threads)

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to continue (the optimizer state brings back the saved lr,
        base lr and refresh frequency, and the cosine schedule depends on ``steps``).

        ``run`` holds the keys of ``run_config`` that the job's own fields do not already cover
        (data, schedule, ...), so each setting appears, and a difference is reported, once.
        """
        run = {k: v for k, v in (self.run_config or {}).items() if k not in RUN_KEYS_COVERED_BY_JOB}
        return {
            "model": config_to_dict(self.model),
            "optim": config_to_dict(self.optim),
            "num_stages": self.num_stages,
            "steps": self.steps,
            "seed": self.seed,
            "weight_stashing": self.weight_stashing,
            "batch_size": self.batches.batch_size,
            "block_size": self.batches.block_size,
            "run": run,
        }

    def __post_init__(self) -> None:
        if self.num_stages > self.model.n_layer:
            raise ValueError(
                f"num_stages ({self.num_stages}) is larger than the number of layers ({self.model.n_layer})"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        needs_dir = self.checkpoint_every or self.resume_step is not None or self.stop_after is not None
        if needs_dir and not self.checkpoint_dir:
            raise ValueError("checkpoint_every / resume_step / stop_after need a checkpoint_dir")


class AsyncPipelineWorker:
    """The stage of this rank, its optimizer, stashed weights and in-flight minibatches."""

    def __init__(self, job: PipelineJob, rank: int, device: torch.device) -> None:
        torch.manual_seed(job.seed)  # every rank builds the same full model, then keeps its stage
        stages = partition_model(GPT(job.model), job.num_stages)
        self.job, self.rank, self.device = job, rank, device
        self.num_stages = job.num_stages
        self.is_first, self.is_last = rank == 0, rank == job.num_stages - 1
        self.stage = stages[rank].to(device)
        self.delays = staleness_schedule("async-1f1b", job.num_stages)
        self.warmup = self.delays[rank]
        self.optimizer = build_optimizer(self.stage, job.optim, delays=self.delays, stage=rank)
        self.activation_shape = (job.batches.batch_size, job.batches.block_size, job.model.n_embd)
        self.version = 0
        self.next_forward = 0
        self.next_backward = 0
        self.stash: dict[int, dict[str, torch.Tensor]] = {}
        self.in_flight: dict[int, tuple[torch.Tensor, int]] = {}
        self.pending_input: tuple[int, torch.Tensor] | None = None
        self.losses: dict[int, float] = {}
        self._sends: deque[tuple[Any, torch.Tensor]] = deque()

    # -- communication -------------------------------------------------------------------------
    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, dst=dst, tag=tag), tensor))
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()

    def _wait_sends(self) -> None:
        while self._sends:
            self._sends.popleft()[0].wait()

    def _recv_activation(self, m: int) -> torch.Tensor:
        buffer = torch.empty(self.activation_shape, device=self.device)
        dist.recv(buffer, src=self.rank - 1, tag=message_tag(m, ACTIVATION))
        return buffer

    # -- compute -------------------------------------------------------------------------------
    def _current_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.stage.named_parameters())

    def _targets(self, m: int) -> torch.Tensor:
        return self.job.batches.batch(m)[1].to(self.device)

    def forward(self, m: int) -> None:
        if self.is_first:
            x = self.job.batches.batch(m)[0].to(self.device)
        elif self.pending_input is not None and self.pending_input[0] == m:
            x, self.pending_input = self.pending_input[1], None
        else:
            x = self._recv_activation(m)
        if self.job.weight_stashing and self.warmup > 0 and self.version not in self.stash:
            self.stash[self.version] = {k: w.detach().clone() for k, w in self._current_weights().items()}
        with torch.no_grad():
            out = functional_call(self.stage, self._current_weights(), (x,))
        if self.is_last:
            self.losses[m] = float(lm_loss(out, self._targets(m)))
        else:
            self._send(out, self.rank + 1, message_tag(m, ACTIVATION))
        self.in_flight[m] = (x, self.version)

    def backward(self, m: int, grad_request: Any, grad_buffer: torch.Tensor | None) -> None:
        x, version = self.in_flight.pop(m)
        stashed = self.job.weight_stashing and version != self.version
        weights = self.stash[version] if stashed else self._current_weights()
        leaves = {k: w.detach().requires_grad_() for k, w in weights.items()}
        x = x.detach().requires_grad_(not self.is_first)
        with torch.enable_grad():
            out = functional_call(self.stage, leaves, (x,))
            wrt = list(leaves.values()) + ([] if self.is_first else [x])
            if self.is_last:
                result = torch.autograd.grad(lm_loss(out, self._targets(m)), wrt)
            else:
                grad_request.wait()
                result = torch.autograd.grad(out, wrt, grad_outputs=grad_buffer)
        if not self.is_first:
            self._send(result[-1], self.rank - 1, message_tag(m, GRADIENT))
        for p, g in zip(self.stage.parameters(), result[: len(leaves)], strict=True):
            p.grad = g
        optimizer_step(
            self.stage,
            self.optimizer,
            self.job.optim,
            step=m,
            total_steps=self.job.steps,
            delay=self.warmup,
        )
        self.version += 1
        needed = {v for _, v in self.in_flight.values()}
        for v in [v for v in self.stash if v not in needed]:
            del self.stash[v]

    # -- schedule ------------------------------------------------------------------------------
    def run(self) -> dict[int, float]:
        """Run 1F1B until every minibatch is done (or ``stop_after``); returns the last stage's losses."""
        total, job = self.job.steps, self.job
        while self.next_forward < min(self.next_backward + self.warmup, total):
            self.forward(self.next_forward)
            self.next_forward += 1
        while self.next_backward < total:
            grad_request, grad_buffer = None, None
            if not self.is_last:  # post the receive first: same per-pair order as the next stage
                grad_buffer = torch.empty(self.activation_shape, device=self.device)
                tag = message_tag(self.next_backward, GRADIENT)
                grad_request = dist.irecv(grad_buffer, src=self.rank + 1, tag=tag)
            if self.next_forward < total:
                self.forward(self.next_forward)
                self.next_forward += 1
            self.backward(self.next_backward, grad_request, grad_buffer)
            self.next_backward += 1
            done = self.next_backward
            if done < total and job.checkpoint_every and done % job.checkpoint_every == 0:
                self.save_checkpoint(done)
            if job.stop_after is not None and done >= job.stop_after:
                if not (job.checkpoint_every and done % job.checkpoint_every == 0):
                    self.save_checkpoint(done)
                break
        self._wait_sends()
        return self.losses

    # -- checkpoint ----------------------------------------------------------------------------
    def save_final_weights(self, directory: str | Path) -> Path:
        path = final_weights_path(directory, self.rank)
        return save_torch_atomic({k: v.detach().cpu() for k, v in self.stage.state_dict().items()}, path)

    def save_checkpoint(self, step: int) -> Path:
        """Save after ``step`` backwards; first pull in the activation already sent to this stage."""
        if not self.is_first and self.next_forward < self.job.steps and self.pending_input is None:
            self.pending_input = (self.next_forward, self._recv_activation(self.next_forward))
        self._wait_sends()  # nothing of ours is left on the wire
        path = checkpoint_path(self.job.checkpoint_dir, step, self.rank)
        # tensors, numbers, strings, None and plain containers only: it loads with weights_only=True
        state = {
            "stage": self.stage.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stash": self.stash,
            "in_flight": self.in_flight,
            "pending_input": self.pending_input,
            "version": self.version,
            "next_forward": self.next_forward,
            "next_backward": self.next_backward,
            "losses": self.losses,
            "settings": self.job.settings(),
        }
        if self.is_first:  # before stage 0's file, so every complete checkpoint has its settings
            write_json_atomic(checkpoint_settings_path(self.job.checkpoint_dir, step), state["settings"])
        save_torch_atomic(state, path)
        logger.info("stage %d: checkpoint after %d minibatches at %s", self.rank, step, path)
        return path

    def load_checkpoint(self, step: int) -> None:
        self.restore(read_stage_checkpoint(self.job, step, self.rank, self.device), step)

    def restore(self, state: dict[str, Any], step: int) -> None:
        """Continue from ``state``, as :func:`read_stage_checkpoint` returns it for ``step``."""
        path = checkpoint_path(self.job.checkpoint_dir, step, self.rank)
        try:
            self.stage.load_state_dict(state["stage"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.stash = {int(v): dict(weights) for v, weights in state["stash"].items()}
            self.in_flight = {int(m): (x, int(v)) for m, (x, v) in state["in_flight"].items()}
            pending = state["pending_input"]
            self.pending_input = None if pending is None else (int(pending[0]), pending[1])
            self.version = int(state["version"])
            self.next_forward = int(state["next_forward"])
            self.next_backward = int(state["next_backward"])
            self.losses = {int(m): float(loss) for m, loss in state["losses"].items()}
        except (KeyError, TypeError, RuntimeError, IndexError, AttributeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CorruptFileError(path, f"its state does not fit stage {self.rank} of this run ({reason})") from exc


def read_stage_checkpoint(job: PipelineJob, step: int, rank: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Stage ``rank``'s checkpoint at ``step`` (``weights_only``), checked against ``job``'s settings.

    Read before the stage and its optimizer are built, so a corrupt file is reported quickly.
    """
    path = checkpoint_path(job.checkpoint_dir, step, rank)
    state = load_torch(path, map_location=device)
    if not isinstance(state, dict) or not state.keys() >= CHECKPOINT_KEYS:
        raise CorruptFileError(path, f"expected a mapping with {sorted(CHECKPOINT_KEYS)} (a pipeline stage checkpoint)")
    check_same_config(state.get("settings"), job.settings(), where=f"checkpoint {str(path)!r}")
    return state
