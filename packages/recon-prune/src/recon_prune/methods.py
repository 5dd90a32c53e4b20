"""The variants a pruning run chooses by name: mask methods and reconstruction techniques.

One registration line per variant, as PEFT maps a method's name to its code. ``PruneConfig``
validation, the command line's ``--method``/``--reconstruction`` help and :func:`recon_prune.prune`
all read these registries, so a variant registered anywhere before the run (a plugin, a test) is
usable everywhere without editing another file::

    MASK_METHODS.add("random", MaskMethod(select=lambda weight, stats, config, name: (weight, random_mask(weight))))

This module imports no torch: the command line lists and checks the names in a fraction of a
second, and each built-in method's code is imported when it first runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shin_common import Registry

if TYPE_CHECKING:
    import torch

    from recon_prune.config import PruneConfig


@dataclass(frozen=True, kw_only=True)
class MaskMethod:
    """How a pruning method chooses the mask of one linear layer.

    Attributes:
        select: ``select(weight, stats, config, name) -> (weight, mask)`` takes the layer's float32
            ``(out_features, in_features)`` weight, its statistics (None without a collector), the
            run's :class:`~recon_prune.config.PruneConfig` and the layer's name, and returns the
            weight to keep (updated or as given) and its boolean mask (``True`` = kept).
        collector: ``collector(in_features, device)`` makes the object whose ``add_batch(inputs)``
            sees every calibration input of the layer; None when the method needs no statistics.
        updates_weights: ``select`` may return an updated weight (SparseGPT's closed-form update, the
            paper's LR). It is kept unless ``reconstruction='none'``; without it ``'lr'`` does nothing.
    """

    select: Callable[[torch.Tensor, Any, PruneConfig, str], tuple[torch.Tensor, torch.Tensor]]
    collector: Callable[[int, torch.device], Any] | None = None
    updates_weights: bool = False


# Target kinds of a reconstruction technique (Shin et al. 2024, Sec. 3).
BLOCK_TARGET = "dense block"  # BR: the dense block (or window) applied to the sparse-path inputs
DENSE_PATH_TARGET = "dense path"  # GP: the dense model's own activations at this depth


@dataclass(frozen=True, kw_only=True)
class Reconstruction:
    """What happens to a block after its masks are chosen (masks stay frozen throughout).

    Attributes:
        target: what the block is trained towards: None (no training), :data:`BLOCK_TARGET` or
            :data:`DENSE_PATH_TARGET`.
        window: number of consecutive blocks trained together: 1, or 2 for CR (blocks ``i-1, i``
            from the sparse-path inputs of block ``i-1``, stride 1).
        keeps_weight_update: keep the mask method's own weight update (SparseGPT's LR); only
            ``'none'`` discards it.
    """

    target: str | None = None
    window: int = 1
    keeps_weight_update: bool = True

    def __post_init__(self) -> None:
        if self.target not in (None, BLOCK_TARGET, DENSE_PATH_TARGET):
            raise ValueError(f"target must be None, {BLOCK_TARGET!r} or {DENSE_PATH_TARGET!r}, got {self.target!r}")
        if self.window not in (1, 2) or (self.window == 2 and self.target is None):
            raise ValueError(f"window must be 1, or 2 with a training target, got {self.window!r}")


MASK_METHODS: Registry[MaskMethod] = Registry("mask method")
RECONSTRUCTIONS: Registry[Reconstruction] = Registry("reconstruction")


# ---------------------------------------------------------------- built-in mask methods
def _magnitude(weight: torch.Tensor, stats: Any, config: PruneConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from recon_prune.masks import magnitude_mask

    return weight, magnitude_mask(weight, config.sparsity, config.nm)


def _wanda_statistics(in_features: int, device: torch.device) -> Any:
    from recon_prune.masks import WandaStats

    return WandaStats(in_features, device)


def _wanda(weight: torch.Tensor, stats: Any, config: PruneConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from recon_prune.masks import wanda_mask

    return weight, wanda_mask(weight, stats.feature_norms(), config.sparsity, config.nm)


def _sparsegpt_statistics(in_features: int, device: torch.device) -> Any:
    from recon_prune.sparsegpt import SparseGPT

    return SparseGPT(in_features, device)


def _sparsegpt(weight: torch.Tensor, stats: Any, config: PruneConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return stats.prune(
        weight, config.sparsity, nm=config.nm, blocksize=config.blocksize, percdamp=config.percdamp, name=name
    )


MASK_METHODS.add("magnitude", MaskMethod(select=_magnitude))
MASK_METHODS.add("wanda", MaskMethod(select=_wanda, collector=_wanda_statistics))
MASK_METHODS.add("sparsegpt", MaskMethod(select=_sparsegpt, collector=_sparsegpt_statistics, updates_weights=True))

# ---------------------------------------------------------------- built-in reconstructions
RECONSTRUCTIONS.add("none", Reconstruction(keeps_weight_update=False))
RECONSTRUCTIONS.add("lr", Reconstruction())  # the mask method's closed-form update alone
RECONSTRUCTIONS.add("br", Reconstruction(target=BLOCK_TARGET))
RECONSTRUCTIONS.add("br+gp", Reconstruction(target=DENSE_PATH_TARGET))
RECONSTRUCTIONS.add("br+cr", Reconstruction(target=BLOCK_TARGET, window=2))
RECONSTRUCTIONS.add("br+gp+cr", Reconstruction(target=DENSE_PATH_TARGET, window=2))
