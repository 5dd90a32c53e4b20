"""Width-scalable models and sparsity masks fixed at initialisation.

The workloads of Shin et al. (arXiv 2311.17539, Fig. 1 and Sec. 4): an MLP whose hidden widths
scale (MNIST ``[75, 25]`` ... ``[3000, 1000]``), a CIFAR-style ResNet-18 whose first-stage filter
count ``k`` scales (stages ``k, 2k, 4k, 8k``; He et al. 2016 with the 3x3 CIFAR stem), and a
one-hidden-layer ReLU network on 1-D regression (their Sec. 4.1, 10 vs 100 neurons).

Sparsity (their Sec. 4.3): masks are drawn once at initialisation and multiplied into the weights
in every forward pass (a ``torch.nn.utils.parametrize`` parametrisation), so masked weights
receive zero gradient, zero SAM perturbation and stay zero. Methods:

* ``random`` -- per layer, each layer keeps ``round((1 - s) n)`` uniformly chosen weights (Liu et
  al., "The unreasonable effectiveness of random pruning", ICLR 2022, uniform variant);
* ``snip`` -- global, keep the largest ``|g * w|`` on one batch (Lee, Ajanthan & Torr, ICLR 2019);
* ``magnitude`` -- per layer, keep the largest ``|w|`` at initialisation.

Only weights of ``nn.Linear`` and ``nn.Conv*`` layers are masked; biases and norms stay dense.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from sam_overparam.optim import frozen_batchnorm_stats

log = logging.getLogger(__name__)

SparsityMethod = Literal["random", "snip", "magnitude"]
SPARSITY_METHODS: tuple[str, ...] = ("random", "snip", "magnitude")


class MLP(nn.Module):
    """``in_features -> widths[0] -> ... -> widths[-1] -> num_classes`` with ReLU."""

    def __init__(self, in_features: int, widths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features} and {num_classes}")
        if any(int(w) < 1 for w in widths):
            raise ValueError(f"every hidden width must be >= 1, got {list(widths)}")
        layers: list[nn.Module] = []
        previous = in_features
        for width in widths:
            layers += [nn.Linear(previous, int(width)), nn.ReLU()]
            previous = int(width)
        layers.append(nn.Linear(previous, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, no max-pool) with ``filters`` channels in the first stage.

    ``blocks=(2, 2, 2, 2)`` is ResNet-18; the paper scales ``filters`` from 4 to 256 (64 is the
    usual ResNet-18). Global average pooling makes any input size work.
    """

    def __init__(
        self, filters: int = 64, *, blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if filters < 1:
            raise ValueError(f"filters must be >= 1, got {filters}")
        if not blocks or any(b < 1 for b in blocks):
            raise ValueError(f"blocks must be a non-empty list of positive counts, got {list(blocks)}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, filters, 3, 1, 1, bias=False), nn.BatchNorm2d(filters), nn.ReLU()
        )
        stages: list[nn.Module] = []
        in_planes = filters
        for index, count in enumerate(blocks):
            planes = filters * 2**index
            for block in range(count):
                stages.append(_BasicBlock(in_planes, planes, 2 if index > 0 and block == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return self.head(out.mean(dim=(2, 3)))


class ReLUNet1D(nn.Module):
    """``f(x) = sum_j a_j relu(w_j x + b_j) + c``: one hidden ReLU layer for 1-D regression."""

    def __init__(self, hidden: int, in_features: int = 1) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x))).squeeze(-1)


# --------------------------------------------------------------------------- sparsity


class _FixedMask(nn.Module):
    """Parametrisation ``weight = original * mask``; the mask is a buffer saved with the model."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def prunable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """``{module_name: module}`` for every Linear/Conv layer whose ``weight`` may be masked."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    }


def _check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r} (1 would remove every weight)")


def _top_fraction(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[torch.topk(scores.reshape(-1), keep, sorted=False).indices] = True
    return mask.view_as(scores)


def _current_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


def compute_masks(
    model: nn.Module,
    method: SparsityMethod,
    sparsity: float,
    *,
    generator: torch.Generator | None = None,
    batch: Any = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks ``{module_name: mask}`` with exactly ``round((1 - sparsity) n)`` kept
    weights per layer (``random``, ``magnitude``) or over all prunable weights (``snip``).

    ``snip`` needs ``batch`` and ``loss_fn(model, batch)``; the score is ``|dL/dw * w|``. Its
    scoring pass normalises with batch statistics (in training mode) but leaves BatchNorm running
    statistics untouched, so computing masks does not change the model.
    """
    _check_sparsity(sparsity)
    if method not in SPARSITY_METHODS:
        raise ValueError(f"unknown sparsity method {method!r}; expected one of {', '.join(SPARSITY_METHODS)}")
    layers = prunable_weights(model)
    density = 1.0 - sparsity
    if method == "random":
        masks = {}
        for name, module in layers.items():
            weight = _current_weight(module)
            scores = torch.rand(weight.shape, generator=generator, dtype=torch.float64).to(weight.device)
            masks[name] = _top_fraction(scores, round(density * weight.numel()))
        return masks
    if method == "magnitude":
        return {
            name: _top_fraction(_current_weight(m).abs(), round(density * m.weight.numel()))
            for name, m in layers.items()
        }
    if batch is None or loss_fn is None:
        raise ValueError("snip masks need a batch and loss_fn(model, batch) to score |grad * weight|")
    weights = [module.weight for module in layers.values()]
    with torch.enable_grad(), frozen_batchnorm_stats(model):
        grads = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
    scores = [
        (torch.zeros_like(w) if g is None else (g * w).abs()).detach() for g, w in zip(grads, weights, strict=True)
    ]
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep_flat = _top_fraction(flat, round(density * flat.numel()))
    masks, offset = {}, 0
    for name, score in zip(layers, scores, strict=True):
        masks[name] = keep_flat[offset : offset + score.numel()].view_as(score)
        offset += score.numel()
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Fix ``masks`` on the model: every forward uses ``weight * mask``; masked entries are zeroed."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None:
            raise KeyError(f"mask for unknown module {name!r}")
        if mask.shape != module.weight.shape:
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, weight has {tuple(module.weight.shape)}"
            )
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"module {name!r} already has a parametrised weight (masks applied twice?)")
        with torch.no_grad():
            module.weight.mul_(mask.to(module.weight.dtype))
        parametrize.register_parametrization(module, "weight", _FixedMask(mask.to(module.weight.dtype)))
    return model


def sparsify(
    model: nn.Module,
    method: SparsityMethod,
    sparsity: float,
    *,
    generator: torch.Generator | None = None,
    batch: Any = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> nn.Module:
    """:func:`compute_masks` then :func:`apply_masks`; ``sparsity = 0`` leaves the model dense."""
    _check_sparsity(sparsity)
    if sparsity == 0:
        return model
    masks = compute_masks(model, method, sparsity, generator=generator, batch=batch, loss_fn=loss_fn)
    return apply_masks(model, masks)


def count_parameters(model: nn.Module, *, effective: bool = True) -> int:
    """Trainable parameter count; with ``effective`` masked-out weights are not counted."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if effective:
        for module in model.modules():
            if parametrize.is_parametrized(module, "weight"):
                for param in module.parametrizations.weight:
                    if isinstance(param, _FixedMask):
                        total -= int((param.mask == 0).sum())
    return total


def mlp_for_budget(in_features: int, num_classes: int, width: int, depth: int = 2) -> MLP:
    """An MLP with hidden widths ``[width, width // 3, ...]``: the paper's 3:1 MNIST shape."""
    widths = [max(1, width // 3**i) for i in range(depth)]
    return MLP(in_features, widths, num_classes)
