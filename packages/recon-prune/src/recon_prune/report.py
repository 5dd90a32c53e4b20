"""What a pruning run returns: :class:`PruneReport`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PruneReport:
    """Outcome of :func:`recon_prune.prune`. ``masks`` maps ``"<blocks path>.<i>.<linear>"`` to boolean
    masks in the module's own weight layout (``True`` = kept), and ``"<blocks path>.<i>.<experts>.<parameter>"``
    to the ``(experts, ...)`` mask of a fused mixture-of-experts parameter. ``experts`` maps each fused
    experts module to its experts' routed calibration token counts (``tokens``) and the experts whose
    statistics came from all tokens (``calibrated_on_all_tokens``)."""

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
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def final_block_error(self) -> float | None:
        return self.block_errors[-1] if self.block_errors else None

    def to_dict(self) -> dict[str, Any]:
        """Everything but the masks (for results JSON)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "masks"}
        data["final_block_error"] = self.final_block_error
        return data
