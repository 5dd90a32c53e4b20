"""The package's shape: registries a test can extend, one command grammar, no import cycle, a light
``--help``, and a README example that uses only top-level names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cbm_tiny import TINY
from torch.nn import functional as F

import cbm_intervene
from cbm_intervene import (
    CRITERIA,
    TRAINING_STRATEGIES,
    TargetModelSpec,
    TrainingStrategy,
    register_criterion,
    save_predictions,
)
from cbm_intervene.cli import main
from shin_common.imports import import_cycles

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def predictions_file(tmp_path, predictions_factory) -> Path:
    spec = TargetModelSpec(n_concepts=6, n_classes=4)
    torch.manual_seed(0)
    return save_predictions(tmp_path / "p.pt", predictions_factory("prob"), target_model=spec.build(), target_spec=spec)


def test_a_criterion_registered_in_a_test_runs_through_the_command_line(tmp_path, predictions_file):
    @register_criterion("TEST_LAST_CONCEPT_FIRST")
    def last_concept_first(ctx):
        return torch.arange(ctx.values.shape[1], dtype=torch.float32).expand_as(ctx.values)

    out = tmp_path / "tti"
    try:
        argv = ["intervene", "--predictions", str(predictions_file), "--output-dir", str(out), "--no-plot"]
        assert main([*argv, "--criteria", "test_last_concept_first", "UCP", "--levels", "I+S", "--max-steps", "1"]) == 0
    finally:
        CRITERIA.remove("TEST_LAST_CONCEPT_FIRST")
    assert "TEST_LAST_CONCEPT_FIRST" not in CRITERIA
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["criteria"] == ["TEST_LAST_CONCEPT_FIRST", "UCP"]
    curve = record["curves"]["I+S"]["TEST_LAST_CONCEPT_FIRST"]
    assert curve["concepts_per_sample"] == [0.0, 1.0]


def test_a_training_strategy_registered_in_a_test_trains_through_the_command_line(tmp_path):
    def target_only(run):
        """f alone, on the true concepts; g stays as initialised."""
        (_, concepts, labels), (_, val_concepts, val_labels) = run.train_split, run.val_split
        f = run.target_model
        return {
            "target": run.fit_stage(
                f,
                lambda i: F.cross_entropy(f(concepts[i]), labels[i]),
                lambda: F.cross_entropy(f(val_concepts), val_labels).item(),
                "target_model",
            )
        }

    TRAINING_STRATEGIES.add("TEST_TARGET_ONLY", TrainingStrategy("prob", ("target_model",), target_only))
    run = tmp_path / "run"
    try:
        sets = [a for kv in [*TINY, "train.strategy=TEST_TARGET_ONLY"] for a in ("--set", kv)]
        assert main(["train", "--output-dir", str(run), *sets]) == 0
    finally:
        TRAINING_STRATEGIES.remove("TEST_TARGET_ONLY")
    assert "TEST_TARGET_ONLY" not in TRAINING_STRATEGIES
    record = json.loads((run / "results.json").read_text())
    assert record["config"]["train"]["strategy"] == "TEST_TARGET_ONLY" and list(record["history"]) == ["target"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "cbm.pt",
        "target_model.progress.pt",
        "target_model.pt",
    ]


def test_intervene_takes_a_config_file_and_its_flags_override_it(tmp_path, predictions_file, capsys):
    config = tmp_path / "tti.yaml"
    config.write_text(
        f"predictions: [{json.dumps(str(predictions_file))}]\ncriteria: [UCP]\nlevels: [I+S]\n"
        "budgets: []\nplot: false\nordering: adaptive\n"
    )
    out = tmp_path / "tti"
    assert main(["intervene", "--config", str(config), "--output-dir", str(out), "--ordering", "static"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["intervention"]["ordering"] == "static"
    assert list(record["curves"]["I+S"]) == ["UCP"]
    capsys.readouterr()
    both = ["intervene", "--config", str(config), "--output-dir", str(tmp_path / "b"), "--max-steps", "1"]
    assert main([*both, "--set", "max_steps=2"]) == 2
    assert "max_steps is set twice" in capsys.readouterr().err
    assert (
        main(["intervene", "--config", str(config), "--output-dir", str(tmp_path / "c"), "--set", "n_samples=0"]) == 2
    )
    assert "--n-samples 0 is out of range" in capsys.readouterr().err
    assert main(["intervene", "--output-dir", str(tmp_path / "d")]) == 2
    assert "no predictions files" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "bcd")


@pytest.mark.parametrize("command", ["train", "intervene", "demo"])
def test_help_lists_every_config_key_with_its_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--config" in text and "--set" in text and "config keys" in text
    expected = {"train": 'train.strategy (str) = "IND"', "intervene": "n_samples (int) = 16", "demo": "quick (bool)"}
    assert expected[command] in text


def test_no_import_cycle():
    assert import_cycles("cbm_intervene") == []


def test_help_imports_neither_transformers_nor_datasets():
    script = (
        "import sys\nfrom cbm_intervene.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['intervene', '--help'], ['demo', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('MODULES', sorted(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modules = result.stdout.rsplit("MODULES", 1)[1]
    assert "'transformers'" not in modules and "'datasets'" not in modules


def test_readme_example_uses_only_top_level_names():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    imported = re.findall(r"^from cbm_intervene import (.+)$", block, re.M)
    assert imported, "the README's first example imports from cbm_intervene"
    names = {name.strip() for line in imported for name in line.split(",")}
    assert names <= set(cbm_intervene.__all__)
    assert "import cbm_intervene." not in block and "from cbm_intervene." not in block
