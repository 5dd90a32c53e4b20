"""The networks of a CBM, known to both training and the predictions file format.

:func:`mlp` builds the default concept model g and target model f, :class:`TargetModelSpec`
describes f so that a predictions file can rebuild it, and :func:`check_module_widths` refuses a
module of the wrong input or output width in one line. Training (:mod:`cbm_intervene.models`)
and the predictions format (:mod:`cbm_intervene.data.predictions`) both import this module, so
neither imports the other for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def mlp(sizes: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them (none after the last)."""
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise ValueError(f"mlp needs at least two positive layer sizes, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@dataclass(kw_only=True)
class TargetModelSpec:
    """Architecture of the concept-to-target model f: linear (``hidden=()``, default) or an MLP."""

    n_concepts: int
    n_classes: int
    hidden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.n_concepts <= 0 or self.n_classes <= 1:
            raise ValueError(
                f"target model needs n_concepts >= 1 and n_classes >= 2, got {self.n_concepts}, {self.n_classes}"
            )

    def build(self) -> nn.Module:
        return mlp([self.n_concepts, *self.hidden, self.n_classes])

    def load(self, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """Build f and fill it with ``state_dict``, checked strictly against this spec.

        :meth:`build` returns an ``nn.Sequential`` (keys ``0.weight``, ``0.bias``, ``2.weight``, ...);
        for a linear spec the keys of a bare ``nn.Linear`` (``weight``, ``bias``) are accepted too.
        Raises ``ValueError`` naming missing, unexpected or wrongly shaped weights.
        """
        model = self.build()
        state = dict(state_dict)
        if not self.hidden and set(state) == {"weight", "bias"}:
            state = {f"0.{name}": value for name, value in state.items()}
        expected = model.state_dict()
        problems = []
        if missing := sorted(set(expected) - set(state)):
            problems.append(f"missing {missing}")
        if unexpected := sorted(set(state) - set(expected)):
            problems.append(f"unexpected {unexpected}")
        for name in sorted(set(expected) & set(state)):
            if tuple(state[name].shape) != tuple(expected[name].shape):
                problems.append(f"{name} has shape {tuple(state[name].shape)}, expected {tuple(expected[name].shape)}")
        if problems:
            architecture = " -> ".join(str(size) for size in (self.n_concepts, *self.hidden, self.n_classes))
            raise ValueError(
                f"target model weights do not fit the spec (an MLP {architecture}; keys {sorted(expected)}): "
                + "; ".join(problems)
            )
        model.load_state_dict(state)
        return model.eval()


def check_module_widths(
    module: nn.Module,
    role: str,
    n_inputs: int,
    n_outputs: int,
    *,
    source: str,
    outputs: str,
    probe: torch.Tensor | None = None,
) -> None:
    """Fail early, naming both widths, when ``module`` cannot read ``(B, n_inputs)`` inputs or does
    not return a ``(B, n_outputs)`` tensor of ``outputs``; ``source`` says where ``n_inputs`` comes
    from (e.g. "the predictions have 6 concepts").

    The probe (default: two rows of zeros) runs under ``torch.no_grad()`` in eval mode, so modules
    with running statistics (BatchNorm) are left as they were; every submodule's training flag is
    restored afterwards.
    """
    probe = torch.zeros(2, n_inputs) if probe is None else probe
    flags = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as exc:  # any failure on a correctly sized probe is a width or interface problem
        first_linear = next((layer for layer in module.modules() if isinstance(layer, nn.Linear)), None)
        if first_linear is not None and first_linear.in_features != n_inputs:
            raise ValueError(
                f"{role} expects {first_linear.in_features} inputs (its first nn.Linear layer), but {source}"
            ) from exc
        raise ValueError(f"{role} cannot read inputs of width {n_inputs} ({source}): {exc}") from exc
    finally:
        for submodule, training in flags:
            submodule.training = training
    expected = (probe.shape[0], n_outputs)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ValueError(
            f"{role} maps {tuple(probe.shape)} inputs to {got}, expected a tensor of shape {expected} ({outputs})"
        )


def mlp_sizes(module: nn.Module) -> list[int] | None:
    """The layer sizes ``s`` with ``mlp(s)`` of the same architecture as ``module``, or ``None`` when
    ``module`` is not such an MLP (an ``nn.Sequential`` of Linear layers with ReLU between them)."""
    if not isinstance(module, nn.Sequential) or not len(module) or not isinstance(module[0], nn.Linear):
        return None
    linears = [layer for layer in module if isinstance(layer, nn.Linear)]
    sizes = [layer.in_features for layer in linears] + [linears[-1].out_features]
    rebuilt = mlp(sizes)
    same_layers = [type(layer) for layer in rebuilt] == [type(layer) for layer in module]
    same_bias = all((a.bias is None) == (b.bias is None) for a, b in zip(linears, rebuilt[::2], strict=True))
    return sizes if same_layers and same_bias else None
