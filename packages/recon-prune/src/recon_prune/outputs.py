"""Writing results: the pruned model, its masks, a results JSON with provenance, and a plot (:mod:`recon_prune.plots`).

Output directories follow the toolkit's run contract (``shin_common.RunDirectory``,
docs/run-contract.md): every file is recorded in the directory's manifest before it is written,
``results.json`` is written last and marks the run finished, and ``--overwrite`` deletes only the
files a previous run recorded. Nothing here ever deletes a directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from recon_prune.plots import plot_into_run
from shin_common import RunDirectory, save_torch_atomic
from shin_common.records import DEFAULT_PACKAGES

log = logging.getLogger(__name__)

TOOL = "recon-prune"
PACKAGES = (*DEFAULT_PACKAGES, TOOL)


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """Refuse, before any work, a file output that is a directory, lies under a file or cannot be written."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; expected a file path")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r} lies under the file {str(existing)!r}; expected a file path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r} cannot be written in {str(existing)!r}: permission denied")
    return target


def save_pruned(
    run: RunDirectory,
    model: Any,
    tokenizer: Any,
    report: Any,
    *,
    metrics: dict[str, Any],
    config: Any,
    seed: int,
    plot_title: str,
) -> dict[str, Any]:
    """Model (``save_pretrained``), ``masks.pt``, ``error_per_block.png``, then ``results.json``.

    ``results.json`` comes last: it marks the run finished, so a run killed while saving is
    resumed (saved again) by the same command instead of being reported as done.
    """
    run.begin()
    model_dir = run.path / "model"
    model.save_pretrained(model_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    run.claim_tree("model")
    save_torch_atomic({"pattern": report.config["pattern"], "masks": report.masks}, run.file("masks.pt"))
    plot_into_run(run, {report.config["reconstruction"]: report.block_errors}, title=plot_title)
    return run.finish(metrics=metrics, config=config, seed=seed, packages=PACKAGES, extra={"report": report.to_dict()})
