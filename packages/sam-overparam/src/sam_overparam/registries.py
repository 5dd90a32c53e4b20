"""The trainer's extensible choices by name: optimizers and models, one registration per variant.

``TrainConfig.optimizer`` and ``TrainConfig.model`` are names in :data:`OPTIMIZERS` and
:data:`MODELS`; the config checks, ``sam-overparam train --help`` and the trainer read them from
here, so a new variant is one registration (in any module or test, before the config is built):

>>> @register_optimizer("adam")                       # doctest: +SKIP
... def adam(config, model):
...     return torch.optim.Adam(model.parameters(), lr=config.lr)

An optimizer entry is ``build(config, model) -> torch.optim.Optimizer``; a model entry is a
:class:`ModelEntry` whose ``build(config, in_features, num_outputs) -> nn.Module`` makes the
network and whose ``inputs`` reshapes a batch of flat examples for it (the ResNet reads mnist1d
sequences as one-channel images). Builders receive the whole ``TrainConfig`` and read the fields
they need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sam_overparam import models
from sam_overparam.optim import SAM
from shin_common import Registry

if TYPE_CHECKING:
    from sam_overparam.config import TrainConfig

__all__ = ["MODELS", "OPTIMIZERS", "ModelEntry", "model_inputs", "register_model", "register_optimizer"]

OptimizerBuilder = Callable[["TrainConfig", nn.Module], torch.optim.Optimizer]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")


def register_optimizer(name: str) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Decorator: ``build(config, model)`` becomes ``TrainConfig(optimizer=name)``."""
    return OPTIMIZERS.register(name)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: how to build it and how its inputs are shaped from flat examples."""

    build: Callable[[TrainConfig, int, int], nn.Module]
    inputs: Callable[[torch.Tensor], torch.Tensor] = _flat


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(
    name: str, *, inputs: Callable[[torch.Tensor], torch.Tensor] = _flat
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``build(config, in_features, num_outputs)`` becomes ``TrainConfig(model=name)``."""

    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.add(name, ModelEntry(build, inputs))
        return build

    return decorate


def model_inputs(config: TrainConfig, x: torch.Tensor) -> torch.Tensor:
    """A batch of flat examples ``x`` shaped for the model of ``config`` (training, evaluation, Hessian)."""
    return MODELS.get(config.model).inputs(x)


# ----------------------------------------------------------------------------- optimizers


def _base_kwargs(config: TrainConfig) -> dict[str, Any]:
    return dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


@register_optimizer("sgd")
def sgd(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # plain SGD has no ascent, so weight_decay_in_ascent changes nothing for it
    return torch.optim.SGD(model.parameters(), **_base_kwargs(config))


def _sam(config: TrainConfig, model: nn.Module, *, adaptive: bool, unnormalized: bool) -> SAM:
    # model= is always passed: it freezes BatchNorm statistics in the perturbed pass and gives
    # ASAM the parameter names
    return SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=config.rho,
        adaptive=adaptive,
        unnormalized=unnormalized,
        weight_decay_in_ascent=config.weight_decay_in_ascent,
        max_grad_norm=config.max_grad_norm,
        model=model,
        **_base_kwargs(config),
    )


@register_optimizer("sam")
def sam(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SAM around SGD; ``adaptive`` and ``unnormalized`` select ASAM and USAM."""
    return _sam(config, model, adaptive=config.adaptive, unnormalized=config.unnormalized)


@register_optimizer("asam")
def asam(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``optimizer=sam adaptive=true`` under its own name."""
    return _sam(config, model, adaptive=True, unnormalized=config.unnormalized)


@register_optimizer("usam")
def usam(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``optimizer=sam unnormalized=true`` under its own name."""
    return _sam(config, model, adaptive=config.adaptive, unnormalized=True)


# ----------------------------------------------------------------------------- models


def _single_channel_image(x: torch.Tensor) -> torch.Tensor:
    # mnist1d sequences become 1 x 40 single-channel "images" for the ResNet
    return x.view(x.shape[0], 1, 1, -1)


@register_model("mlp")
def mlp(config: TrainConfig, in_features: int, num_outputs: int) -> nn.Module:
    return models.MLP(in_features, config.widths, num_outputs)


@register_model("resnet", inputs=_single_channel_image)
def resnet(config: TrainConfig, in_features: int, num_outputs: int) -> nn.Module:
    return models.CifarResNet(config.filters, blocks=config.blocks, num_classes=num_outputs, in_channels=1)


@register_model("relu1d")
def relu1d(config: TrainConfig, in_features: int, num_outputs: int) -> nn.Module:
    return models.ReLUNet1D(config.hidden, in_features)
