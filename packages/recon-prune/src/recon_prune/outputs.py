"""Writing results: the pruned model, its masks, a results JSON with provenance, and a plot.

Output directories follow the toolkit's run contract (``shin_common.RunDirectory``,
docs/run-contract.md): every file is recorded in the directory's manifest before it is written,
``results.json`` is written last and marks the run finished, and ``--overwrite`` deletes only the
files a previous run recorded. Nothing here ever deletes a directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from shin_common import RunDirectory, import_pyplot, save_torch_atomic
from shin_common.records import DEFAULT_PACKAGES

log = logging.getLogger(__name__)

TOOL = "recon-prune"
PACKAGES = (*DEFAULT_PACKAGES, TOOL)
PLOT_NAME = "error_per_block.png"


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


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` so that ``path`` holds the old file or the complete new one, never a torn one.

    The temporary file is named as shin-common names its own (``.NAME.<hex>.tmp``), so a run
    directory recognises a killed write's leftover as its own and shin-common cleans it up.
    """
    # shin-common has no public text writer yet; these two are what write_json_atomic uses.
    from shin_common.records import _create_temporary, _remove_stale_temporaries

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(target)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _remove_stale_temporaries(target)
    return target


def plot_block_errors(errors: dict[str, list[float | None]], path: Path, title: str = "") -> Path | None:
    """Line plot of the per-block error (log scale), one line per run; None without matplotlib."""
    plt = import_pyplot()
    if plt is None:
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


def plot_into_run(run: RunDirectory, errors: dict[str, list[float | None]], title: str = "") -> Path | None:
    """The error plot as a file of ``run`` (recorded only when matplotlib can draw it)."""
    if import_pyplot() is None:
        log.info("matplotlib is not installed (pip install 'recon-prune[plot]'); skipping %s", PLOT_NAME)
        return None
    return plot_block_errors(errors, run.file(PLOT_NAME), title=title)


def save_pruned(
    run: RunDirectory,
    model: Any,
    tokenizer: Any,
    report: Any,
    *,
    metrics: dict[str, Any],
    config: Any,
    seed: int,
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
    plot_into_run(run, {report.config["reconstruction"]: report.block_errors})
    return run.finish(metrics=metrics, config=config, seed=seed, packages=PACKAGES, extra={"report": report.to_dict()})
