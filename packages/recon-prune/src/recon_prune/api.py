"""``oneshot``: the one-call entry point, shaped like llm-compressor's ``oneshot(model, dataset, recipe,
output_dir=...)``, for users coming from that toolkit. :func:`recon_prune.prune` remains the
building block (it returns the full :class:`~recon_prune.report.PruneReport`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recon_prune.calibration import CalibrationData
from recon_prune.config import PruneConfig


def oneshot(
    model: nn.Module | str,
    calibration: CalibrationData | torch.Tensor | str = "stdlib",
    config: PruneConfig | Mapping[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    output_dir: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Prune ``model`` in place with ``config`` on ``calibration``, save it to ``output_dir`` (if given)
    and return it.

    Args:
        model: a Hugging Face causal LM, or a name/path that :func:`recon_prune.load_model_and_tokenizer`
            loads (``"stdlib-tiny"``, a local directory, a Hub name) together with its tokenizer.
        calibration: :class:`~recon_prune.CalibrationData`, a ``(n, seq_len)`` tensor of token ids, or a
            source spec for :func:`recon_prune.build_calibration` (``"stdlib"``, ``"wikitext2"``,
            ``"c4"``, ``"file:PATH"``, mixtures such as ``"stdlib:48,self:16"``), which is sampled with
            the tokenizer to ``config``'s ``nsamples`` x ``seq_len`` (the preset's when unset).
        config: a :class:`~recon_prune.PruneConfig` or a mapping of its keys; default ``PruneConfig()``
            (SparseGPT, 50% unstructured, BR+GP, the ``cpu`` preset).
        tokenizer: needed for a source spec when ``model`` is a module; saved with the model.
        output_dir: where ``save_pretrained`` writes the pruned dense checkpoint (its ``config.json``
            carries the sparsity record) and the tokenizer, plus ``prune_report.json`` (every weight
            matrix's sparsity and the per-block errors).
        checkpoint_dir: per-block checkpoints; a rerun with the same arguments resumes there.
    """
    from recon_prune.driver import prune
    from recon_prune.runs import calibration_seq_len
    from shin_common import check_output_path, to_jsonable
    from shin_common.records import write_json_atomic

    if config is None:
        config = PruneConfig()
    elif isinstance(config, Mapping):
        config = PruneConfig(**config)
    elif not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig or a mapping of its keys, got {type(config).__name__}")
    if output_dir is not None:
        check_output_path(output_dir)  # before any work
    if isinstance(model, str):
        from recon_prune.tiny_model import load_model_and_tokenizer

        model, loaded_tokenizer = load_model_and_tokenizer(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if isinstance(calibration, str):
        if tokenizer is None:
            raise ValueError(f"calibration {calibration!r} is a text source; pass tokenizer= to tokenize it")
        from recon_prune.calibration import build_calibration

        calibration = build_calibration(
            calibration,
            tokenizer=tokenizer,
            nsamples=config.resolved_nsamples(),
            seq_len=calibration_seq_len(model, config),
            seed=config.seed,
            model=model,
        )
        config = dataclasses.replace(config, nsamples=calibration.num_real, seq_len=calibration.seq_len)
    report = prune(model, calibration, config, checkpoint_dir=checkpoint_dir)
    if output_dir is not None:
        out = Path(output_dir)
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        write_json_atomic(out / "prune_report.json", to_jsonable(report.to_dict()))
    return model
