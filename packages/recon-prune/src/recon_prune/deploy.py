"""What a pruned model carries and where its sparsity can pay off.

The output of a prune is the dense ``save_pretrained`` checkpoint: every engine loads it, and no
compressed storage format is invented here (compressed-tensors, llm-compressor and vLLM dropped their
sparse-only formats and 2:4 kernels in March 2026, so no engine would read one). Two things are added:

* :func:`sparsity_record`: what was done to the weights, stored in ``config.json`` under
  :data:`SPARSITY_RECORD_KEY` by :func:`recon_prune.prune`, so a checkpoint says what it is after
  ``save_pretrained`` / ``AutoConfig.from_pretrained``.
* :func:`to_semi_structured`: for a 2:4 model on CUDA, the pruned linear layers' weights as PyTorch
  semi-structured sparse tensors (``torch.sparse.to_sparse_semi_structured``), whose matmuls skip the
  zeros. Unstructured sparsity has no such kernel: stored densely it saves neither memory nor time.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from recon_prune.model_adapter import find_decoder_blocks, find_linears

log = logging.getLogger(__name__)

SPARSITY_RECORD_KEY = "sparsity_record"
SPARSITY_RECORD_FORMAT = "recon-prune/sparsity-record/1"


def sparsity_record(report: Any) -> dict[str, Any]:
    """The documented record of a prune (docs/recon-prune.md, "The sparsity record"), JSON-ready.

    ``report`` is the :class:`~recon_prune.report.PruneReport` of the run. Keys: ``format``,
    ``method``, ``sparsity`` (the target fraction), ``pattern`` (``unstructured`` or ``N:M``),
    ``reconstruction`` (with ``reconstruction_hparams`` and ``cr_target``), ``calibration`` (real and
    self-generated sample counts, length, sources), ``seed``, ``measured_sparsity`` (zeros over every
    weight matrix of the decoder blocks), ``pruned_layers`` (the blocks' path and count of pruned
    matrices), ``left_dense`` (matrices not pruned, with the reason), and ``package`` (name, version
    and git revision of the code that pruned).
    """
    from recon_prune import __version__
    from shin_common.records import package_source_revision

    config = report.config
    sparsity = report.sparsity or {}
    return {
        "format": SPARSITY_RECORD_FORMAT,
        "method": config["method"],
        "sparsity": config["sparsity"],
        "pattern": config["pattern"],
        "reconstruction": config["reconstruction"],
        "reconstruction_hparams": config.get("hparams"),
        "cr_target": config.get("cr_target"),
        "calibration": report.calibration,
        "seed": config.get("seed"),
        "measured_sparsity": sparsity.get("overall"),
        "pruned_layers": {"blocks": report.blocks_path, "matrices": len(sparsity.get("layers", {}))},
        "left_dense": {name: entry["reason"] for name, entry in sparsity.get("dense", {}).items()},
        "package": {"name": "recon-prune", "version": __version__, "git": package_source_revision("recon-prune")},
    }


def attach_sparsity_record(model: nn.Module, report: Any) -> dict[str, Any] | None:
    """Store :func:`sparsity_record` on ``model.config`` (saved in ``config.json`` by ``save_pretrained``)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    record = sparsity_record(report)
    setattr(config, SPARSITY_RECORD_KEY, record)
    return record


def check_two_four(name: str, weight: torch.Tensor) -> None:
    """Raise ValueError unless every group of 4 consecutive input weights of every row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} cannot be 2:4; expected in_features % 4 == 0")
    kept = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    bad = (kept > 2).nonzero()
    if len(bad):
        row, group = (int(v) for v in bad[0])
        raise ValueError(
            f"{name} is not 2:4 sparse: row {row}, columns {4 * group}..{4 * group + 3} keep {int(kept[row, group])} "
            "of 4 weights; prune with pattern='2:4' first"
        )


def to_semi_structured(model: nn.Module) -> list[str]:
    """Replace the weight of every pruned ``nn.Linear`` of the decoder blocks by a semi-structured
    sparse tensor, in place, for faster inference on CUDA; returns the converted layers' names.

    Every layer is checked before any is converted: its weight must be 2:4 (at most 2 non-zeros in
    each group of 4 consecutive input weights, as ``pattern='2:4'`` prunes) and on a CUDA device, in a
    dtype PyTorch's kernels take (float16 or bfloat16; see ``torch.sparse.to_sparse_semi_structured``
    for the shape limits, which it checks). Move the model first, e.g. ``model.to("cuda", torch.float16)``.
    GPT-2's ``Conv1D`` layers are left as they are. The converted model is for inference: its weights
    can no longer be trained or saved with ``save_pretrained``; keep the dense checkpoint.
    """
    path, blocks = find_decoder_blocks(model)
    layers: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks):
        for name, module in find_linears(block).items():
            if isinstance(module, nn.Linear):
                layers[f"{path}.{i}.{name}"] = module
    for name, module in layers.items():
        check_two_four(name, module.weight)
    for name, module in layers.items():
        weight = module.weight
        if weight.device.type != "cuda":
            raise ValueError(
                f"{name} is on {weight.device}; semi-structured sparse kernels run on CUDA only "
                "(move the model with model.to('cuda', torch.float16) first)"
            )
        if weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name} has dtype {weight.dtype}; expected torch.float16 or torch.bfloat16")
    from torch.sparse import to_sparse_semi_structured

    for name, module in layers.items():
        try:
            sparse = to_sparse_semi_structured(module.weight.detach().contiguous())
        except RuntimeError as exc:  # e.g. a shape the kernels do not take
            raise ValueError(f"{name}: {str(exc).splitlines()[0]}") from exc
        module.weight = nn.Parameter(sparse, requires_grad=False)
    log.info("converted %d linear layers to semi-structured 2:4 sparse tensors", len(layers))
    return list(layers)
