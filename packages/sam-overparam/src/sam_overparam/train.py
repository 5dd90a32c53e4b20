"""Training a registered model with a registered optimizer (SGD, SAM, ...) on the paper's workloads,
with best-epoch tracking, per-epoch checkpoints and resumable sweeps.

Defaults follow Shin et al.'s MNIST recipe (arXiv 2311.17539, App. / authors' code): SGD with
momentum 0.9, batch 128, lr 0.1, weight decay 1e-4, step decay x0.1 at 25/50/75% of training,
rho 0.05, and the *best* test accuracy over epochs is reported (they use early stopping in this
form; their Sec. 4.4 shows the trend can vanish without it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sam_overparam import data as data_lib
from sam_overparam import models
from sam_overparam.config import TrainConfig
from sam_overparam.optim import SAM
from sam_overparam.registries import MODELS, OPTIMIZERS, model_inputs
from shin_common import (
    CorruptFileError,
    JsonlStore,
    config_to_dict,
    load_torch,
    progress,
    provenance,
    save_torch_atomic,
    seed_everything,
)

log = logging.getLogger(__name__)

__all__ = [
    "TOOL",
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "evaluate",
    "final_lr",
    "load_split",
    "loss_fn_for",
    "milestone_epochs",
    "model_inputs",
    "run_sweep",
    "summarize",
    "train",
]

TOOL = "sam-overparam"  # the distribution name: recorded as the writer of every results file


def load_split(config: TrainConfig) -> data_lib.Split:
    if config.dataset == "teacher":
        split, _ = data_lib.teacher_student_regression(
            config.num_train, config.num_test, teacher_width=config.teacher_width, seed=config.data_seed
        )
        return split
    split = data_lib.mnist1d(config.num_train, config.num_test, seed=config.data_seed)
    if config.label_noise:
        split = data_lib.with_label_noise(split, config.label_noise, seed=config.data_seed + 1)
    return split


def is_classification(config: TrainConfig) -> bool:
    return config.dataset != "teacher"


def loss_fn_for(config: TrainConfig):
    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out = model(x)
        return F.cross_entropy(out, y) if is_classification(config) else F.mse_loss(out, y)

    return loss_fn


def build_model(config: TrainConfig, split: data_lib.Split) -> nn.Module:
    """The model of ``config``, initialised from ``config.seed`` and sparsified at initialisation."""
    seed_everything(config.seed)
    in_features = int(split.x_train[0].numel())
    model = MODELS.get(config.model).build(config, in_features, split.num_classes or 1)
    if config.sparsity:
        batch = (model_inputs(config, split.x_train[: config.batch_size]), split.y_train[: config.batch_size])
        models.sparsify(
            model,
            config.sparsity_method,
            config.sparsity,
            generator=torch.Generator().manual_seed(config.seed + 7919),
            batch=batch,
            loss_fn=loss_fn_for(config),
        )
    return model


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer registered as ``config.optimizer``, on ``model``'s parameters."""
    return OPTIMIZERS.get(config.optimizer)(config, model)


@torch.no_grad()
def evaluate(model: nn.Module, config: TrainConfig, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), 1024):
        out = model(model_inputs(config, x[start : start + 1024]))
        target = y[start : start + 1024]
        if is_classification(config):
            loss_sum += float(F.cross_entropy(out, target, reduction="sum"))
            correct += int((out.argmax(dim=1) == target).sum())
        else:
            loss_sum += float(F.mse_loss(out, target, reduction="sum"))
    model.train(was_training)
    metrics = {"loss": loss_sum / len(y)}
    if is_classification(config):
        metrics["accuracy"] = correct / len(y)
    return metrics


def milestone_epochs(config: TrainConfig) -> list[int]:
    """The epochs after which the step schedule multiplies the lr by ``gamma``."""
    return sorted({max(1, round(f * config.epochs)) for f in config.milestones})


def final_lr(config: TrainConfig) -> float:
    """The lr of the last training epoch under the step schedule (``MultiStepLR``: epoch ``e``
    runs at ``lr * gamma^(number of milestones <= e)``)."""
    decays = sum(1 for m in milestone_epochs(config) if m <= config.epochs - 1)
    return config.lr * config.gamma**decays


def _train_step(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> float:
    loss_fn = loss_fn_for(config)

    if isinstance(optimizer, SAM):
        if config.m is not None and config.m < len(y):
            chunks = [(x[i : i + config.m], y[i : i + config.m]) for i in range(0, len(y), config.m)]

            def chunk_closure(chunk):
                loss = loss_fn(model, chunk)
                loss.backward()
                return loss

            return float(optimizer.step_chunked(chunk_closure, chunks, [len(c[1]) / len(y) for c in chunks]))

        def closure():
            loss = loss_fn(model, (x, y))
            loss.backward()
            return loss

        return float(optimizer.step(closure).detach())
    optimizer.zero_grad()
    loss = loss_fn(model, (x, y))
    loss.backward()
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def train(
    config: TrainConfig,
    split: data_lib.Split | None = None,
    *,
    checkpoint: str | Path | None = None,
    show_progress: bool | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one model; return it and its metrics.

    The metrics hold the per-epoch ``history``, the best test accuracy (or lowest test loss for
    regression) with its epoch, the final values and the parameter count. With ``checkpoint``,
    model, optimizer, scheduler and history are saved after every epoch and a rerun resumes there.
    """
    split = split if split is not None else load_split(config)
    model = build_model(config, split)
    optimizer = build_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestone_epochs(config), gamma=config.gamma)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    generator = torch.Generator().manual_seed(config.seed)
    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    if checkpoint_path is not None and checkpoint_path.exists():
        # weights_only: a checkpoint holds tensors and plain containers only, so a crafted file
        # dropped into an output directory is refused instead of run
        state = load_torch(checkpoint_path)
        history, start_epoch = _restore_checkpoint(
            state, checkpoint_path, config, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator
        )
        log.info("resumed %s at epoch %d", checkpoint_path, start_epoch)
    started = time.perf_counter()
    model.train()
    for epoch in progress(
        range(start_epoch, config.epochs),
        disable=None if show_progress is None else not show_progress,
        desc="epochs",
        leave=False,
    ):
        losses = []
        lr_this_epoch = optimizer.param_groups[0]["lr"]  # the scheduler steps after the epoch
        for x, y in data_lib.batches(
            split.x_train, split.y_train, config.batch_size, shuffle=True, generator=generator
        ):
            losses.append(_train_step(config, model, optimizer, model_inputs(config, x), y))
        scheduler.step()
        if not all(math.isfinite(v) for v in losses):
            log.warning("non-finite training loss in epoch %d", epoch + 1)
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            test = evaluate(model, config, split.x_test, split.y_test)
            entry = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "lr": lr_this_epoch}
            entry.update({f"test_{k}": v for k, v in test.items()})
            history.append(entry)
            log.debug("epoch %d: %s", epoch + 1, entry)
        if checkpoint_path is not None:
            save_torch_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "history": history,
                    "epoch": epoch + 1,
                    "config": config_to_dict(config),
                },
                checkpoint_path,
            )
    metrics = summarize(history, classification=is_classification(config))
    metrics.update(
        num_params=models.count_parameters(model, effective=False),
        num_effective_params=models.count_parameters(model),
        train=evaluate(model, config, split.x_train, split.y_train),
        seconds=time.perf_counter() - started,
        history=history,
    )
    return model, metrics


def _restore_checkpoint(
    state: Any,
    path: Path,
    config: TrainConfig,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
) -> tuple[list[dict[str, Any]], int]:
    """Load a checkpoint written by :func:`train` into the fresh run objects; return (history, epoch).

    Anything that does not fit (a foreign file, another model's weights) is reported as a corrupt
    file naming ``path``, not as a traceback from deep inside ``load_state_dict``.
    """
    expected = ("model", "optimizer", "scheduler", "generator", "history", "epoch", "config")
    if not isinstance(state, dict) or any(key not in state for key in expected):
        raise CorruptFileError(path, f"expected a training checkpoint with the entries {', '.join(expected)}")
    if state["config"] != config_to_dict(config):
        raise ValueError(
            f"checkpoint {str(path)!r} was written for a different config; "
            "use another output directory or delete the checkpoint"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history, epoch = list(state["history"]), int(state["epoch"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CorruptFileError(path, f"does not fit this run's model and optimizer ({reason})") from exc
    if not 0 <= epoch <= config.epochs or not all(isinstance(h, dict) for h in history):
        raise CorruptFileError(path, f"epoch {epoch} is outside 0..{config.epochs} or its history is malformed")
    return history, epoch


def summarize(history: list[dict[str, Any]], *, classification: bool) -> dict[str, Any]:
    """Best and final test metric from an epoch history (best = highest accuracy / lowest loss)."""
    key = "test_accuracy" if classification else "test_loss"
    pick = max if classification else min
    best = pick(history, key=lambda h: h[key])
    return {"best_test": best[key], "best_epoch": best["epoch"], "final_test": history[-1][key], "metric": key}


def run_sweep(configs: Iterable[TrainConfig], store_path: str | Path) -> list[dict[str, Any]]:
    """Train every config not yet in the JSON-lines store; a killed sweep resumes where it stopped."""
    store = JsonlStore(store_path)
    for config in configs:
        key = config_to_dict(config)
        if store.is_complete(key):
            log.info("skipping finished run %s/%s seed %d", config.optimizer, config.widths, config.seed)
            continue
        _, metrics = train(config)
        # every line says which code produced it, so a sweep resumed after an upgrade can be split
        store.append(key, {"metrics": metrics, "provenance": provenance(seed=config.seed, package=TOOL)})
        log.info(
            "%s widths=%s seed=%d: best %.4f at epoch %d",
            config.optimizer, config.widths, config.seed, metrics["best_test"], metrics["best_epoch"],
        )  # fmt: skip
    return store.records()
