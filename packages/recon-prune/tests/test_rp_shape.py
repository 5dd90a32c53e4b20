"""The package's shape: registries usable from the command line, no import cycle, a light ``--help``,
a README example that needs only top-level names."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from rp_models import save_byte_llama

import recon_prune
from recon_prune import MASK_METHODS, RECONSTRUCTIONS, MaskMethod, PruneConfig, Reconstruction
from recon_prune.cli import main
from shin_common.imports import import_cycles

SMALL = ["--nsamples", "4", "--seq-len", "32", "--epochs", "1", "--set", "blocksize=16"]


@pytest.fixture
def model_dir(tmp_path):
    return save_byte_llama(tmp_path / "dense")


def _negated_magnitude(weight, stats, config, name):
    """Keeps the smallest weights: the opposite of magnitude pruning, easy to recognise in the output."""
    keep = round(weight.numel() * (1 - config.sparsity))
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[torch.topk(weight.abs().flatten(), keep, largest=False).indices] = True
    return weight, mask.reshape(weight.shape)


class _ColumnCounts:
    """A statistics collector: counts the calibration tokens each layer saw."""

    def __init__(self, in_features, device):
        self.tokens = 0

    def add_batch(self, inputs):
        self.tokens += inputs.reshape(-1, inputs.shape[-1]).shape[0]


@pytest.fixture
def toy_method():
    seen: list[int] = []

    def select(weight, stats, config, name):
        seen.append(stats.tokens)
        return _negated_magnitude(weight, stats, config, name)

    MASK_METHODS.add("negated-magnitude", MaskMethod(select=select, collector=_ColumnCounts))
    RECONSTRUCTIONS.add("toy-br", Reconstruction(target="dense block"))
    yield seen
    MASK_METHODS.remove("negated-magnitude")
    RECONSTRUCTIONS.remove("toy-br")


def test_a_registered_mask_method_runs_through_the_command_line(toy_method, model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["prune", "--model", str(model_dir), "--output-dir", str(out), "--eval", "none", *SMALL]
    assert main([*argv, "--method", "negated-magnitude", "--reconstruction", "toy-br", "--sparsity", "0.5"]) == 0
    assert toy_method and set(toy_method) == {4 * 32}  # every layer's collector saw the 4 x 32 real tokens
    results = json.loads((out / "results.json").read_text())
    assert (results["config"]["method"], results["config"]["reconstruction"]) == ("negated-magnitude", "toy-br")
    assert results["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    masks = torch.load(out / "masks.pt", weights_only=True)["masks"]
    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    for name, mask in masks.items():  # the kept weights are the small ones
        weight = dense.get_submodule(name).weight.abs()
        assert weight[mask].max() <= weight[~mask].min()
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    help_text = re.sub(r"-\s+", "-", capsys.readouterr().out)  # argparse may wrap a line after a hyphen
    assert "negated-magnitude" in help_text and "toy-br" in help_text  # --help lists what is registered


def test_unknown_names_list_the_registered_ones(toy_method) -> None:
    with pytest.raises(ValueError, match=r"unknown method 'obs'; expected one of .*negated-magnitude"):
        PruneConfig(method="obs")
    with pytest.raises(ValueError, match=r"unknown reconstruction 'xx'; expected one of .*toy-br"):
        PruneConfig(reconstruction="xx")


def test_reconstruction_entries_are_checked() -> None:
    with pytest.raises(ValueError, match="target must be"):
        Reconstruction(target="dense")
    with pytest.raises(ValueError, match="window must be 1, or 2 with a training target"):
        Reconstruction(window=2)


def test_no_import_cycle() -> None:
    assert import_cycles("recon_prune") == []


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["eval", "--help"], ["demo", "--help"]])
def test_help_imports_neither_transformers_nor_datasets(argv) -> None:
    code = (
        "import sys\nfrom recon_prune.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    heavy = [m for m in modules if m.split(".")[0] in ("transformers", "datasets", "torch")]
    assert heavy == []


def test_readme_example_uses_only_top_level_names() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert readme.index("## Install") < readme.index("```python") < readme.index("Command line")
    for node in ast.walk(ast.parse(example)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert isinstance(node, ast.ImportFrom) and node.module == "recon_prune", ast.unparse(node)
            assert all(alias.name in recon_prune.__all__ for alias in node.names), ast.unparse(node)
    assert len(example.strip().splitlines()) <= 12
