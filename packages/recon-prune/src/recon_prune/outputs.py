"""Writing results: the pruned model, its masks, a results JSON with provenance, and a plot.

Output directories are filled in a sibling staging directory and moved into place only when
everything is written, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from shin_common import write_run_record
from shin_common.records import DEFAULT_PACKAGES

log = logging.getLogger(__name__)

PACKAGES = (*DEFAULT_PACKAGES, "recon-prune")


def check_output_dir(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless ``overwrite`` (checked before any work)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"output path {str(target)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"output directory {str(target)!r} is not empty; pass --overwrite to replace it")
    return target


def staging_dir(target: Path) -> Path:
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def commit_dir(staging: Path, target: Path) -> Path:
    """Move the finished ``staging`` directory to ``target`` (replacing it)."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


@contextmanager
def staged_output(target: Path) -> Iterator[Path]:
    """Yield a fresh staging directory; move it to ``target`` if the block succeeds, delete it if not."""
    staging = staging_dir(target)
    try:
        yield staging
        commit_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def plot_block_errors(errors: dict[str, list[float | None]], path: Path, title: str = "") -> Path | None:
    """Line plot of the per-block error (log scale), one line per run; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install 'recon-prune[plot]'); skipping %s", path.name)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in errors.items():
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[i] for i in xs], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("MSE(sparse path, dense path)")
    ax.set_title(title or "reconstruction error per block")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_pruned(
    directory: Path,
    model: Any,
    tokenizer: Any,
    report: Any,
    *,
    metrics: dict[str, Any],
    config: Any,
    seed: int,
) -> None:
    """Model (``save_pretrained``), masks (``masks.pt``), ``results.json`` and ``error_per_block.png``."""
    model_dir = directory / "model"
    model.save_pretrained(model_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    torch.save({"pattern": report.config["pattern"], "masks": report.masks}, directory / "masks.pt")
    write_run_record(
        directory / "results.json",
        config=config,
        metrics=metrics,
        seed=seed,
        packages=PACKAGES,
        extra={"report": report.to_dict()},
    )
    plot_block_errors({report.config["reconstruction"]: report.block_errors}, directory / "error_per_block.png")
