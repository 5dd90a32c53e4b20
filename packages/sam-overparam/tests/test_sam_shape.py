"""The package's shape: registries extended from outside, no import cycle, a light --help, the README example."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sam_overparam
from sam_overparam import MODELS, OPTIMIZERS, cli, register_model, register_optimizer
from shin_common import read_json
from shin_common.imports import import_cycles

SMALL = dict(num_train=120, num_test=120, widths=[8, 3], epochs=2, batch_size=40)
SMALL_ARGS = [arg for k, v in SMALL.items() for arg in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture
def toy_optimizer():
    built = []

    @register_optimizer("toy-adam")
    def toy_adam(config, model):
        built.append(config.lr)
        return torch.optim.Adam(model.parameters(), lr=config.lr)

    yield built
    OPTIMIZERS.remove("toy-adam")


@pytest.fixture
def toy_model():
    @register_model("toy-linear", inputs=lambda x: x * 2)
    def toy_linear(config, in_features, num_outputs):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_outputs))

    yield
    MODELS.remove("toy-linear")


def test_a_registered_optimizer_trains_through_the_command_line(toy_optimizer, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--output-dir", str(out), "--optimizer", "toy-adam", "--lr", "0.01", *SMALL_ARGS]) == 0
    assert toy_optimizer == [0.01]
    record = read_json(out / "results.json")
    assert record["config"]["optimizer"] == "toy-adam" and len(record["metrics"]["history"]) == 2
    assert "toy-adam" in capsys.readouterr().out
    # and the Hessian analysis of that run works as for any other
    assert cli.main(["analyze", "--run-dir", str(out), "--num-examples", "40", "--probes", "1",
                     "--lanczos-steps", "4", "--density-probes", "1"]) == 0  # fmt: skip
    assert read_json(out / "analysis.json")["metrics"]["dim"] == record["metrics"]["num_params"]


def test_a_registered_model_trains_through_the_command_line(toy_model, tmp_path):
    out = tmp_path / "run"
    assert (
        cli.main(["train", "--output-dir", str(out), "--model", "toy-linear", "--optimizer", "sgd", *SMALL_ARGS]) == 0
    )
    record = read_json(out / "results.json")
    assert record["metrics"]["num_params"] == 40 * 10 + 10  # mnist1d: 40 features, 10 classes


def test_unknown_names_are_one_line_errors_listing_the_registered_ones(tmp_path, capsys):
    assert cli.main(["train", "--output-dir", str(tmp_path / "x"), "--optimizer", "adamw"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer='adamw'" in err and "sgd, sam, asam, usam" in err
    assert cli.main(["train", "--output-dir", str(tmp_path / "x"), "--set", "model=vit"]) == 2
    assert "model='vit'" in capsys.readouterr().err
    assert cli.main(["train", "--output-dir", str(tmp_path / "x"), "--rho", "0.1", "--set", "rho=0.2"]) == 2
    assert "rho is set twice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_asam_and_usam_are_sam_with_their_switch():
    from sam_overparam.train import TrainConfig, build_optimizer

    model = nn.Linear(3, 2)
    asam = build_optimizer(TrainConfig(optimizer="asam"), model)
    usam = build_optimizer(TrainConfig(optimizer="usam"), model)
    assert asam.param_groups[0]["adaptive"] and not asam.param_groups[0]["unnormalized"]
    assert usam.param_groups[0]["unnormalized"] and not usam.param_groups[0]["adaptive"]
    assert isinstance(build_optimizer(TrainConfig(optimizer="sgd"), model), torch.optim.SGD)


def test_no_import_cycle():
    assert import_cycles("sam_overparam") == []


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["analyze", "--help"], ["demo", "--help"]])
def test_help_lists_the_keys_and_imports_no_transformers_or_datasets(argv):
    code = (
        "import sys\nfrom sam_overparam.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modules = set(eval(result.stdout.strip().splitlines()[-1]))
    assert not {"transformers", "datasets"} & modules
    if argv != ["--help"]:
        assert "config keys" in result.stdout and "--set KEY=VALUE" in result.stdout


def test_readme_example_runs_with_top_level_names_only():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    imported = re.findall(r"from sam_overparam import ([\w, ]+)", block)
    assert imported and all(name.strip() in sam_overparam.__all__ for line in imported for name in line.split(","))
    exec(compile(block, "README.md", "exec"), {})
