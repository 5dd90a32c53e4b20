"""The package's shape: registries a test can extend end to end, the command grammar, the public API,
no import cycle, a light ``--help``, and the README's first example."""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import basisrot_pipeline
from basisrot_pipeline import OPTIMIZERS, SCHEDULES, OptimConfig, OptimizerVariant, staleness_schedule
from basisrot_pipeline.cli import build_parser, config_from_args, main
from basisrot_pipeline.plots import series_styles
from shin_common.imports import import_cycles

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = [
    *("--stages", "2"),
    *("--steps", "3"),
    *("--set", "data=random"),
    *("--set", "model.vocab_size=32"),
    *("--set", "model.block_size=8"),
    *("--set", "model.n_layer=2"),
    *("--set", "model.n_embd=16"),
    *("--set", "model.n_head=2"),
    *("--set", "batch_size=4"),
    *("--set", "eval_batches=1"),
]


def _plain_sgd(module, config, **_):
    return torch.optim.SGD(module.parameters(), lr=config.lr)


def _reversed_1f1b(num_stages, **_):
    """The last stage most stale: not a real pipeline, only a schedule no built-in one gives."""
    return tuple(range(num_stages))


@pytest.fixture
def toy_optimizer():
    OPTIMIZERS.add("toy-sgd", OptimizerVariant(_plain_sgd))
    yield "toy-sgd"
    OPTIMIZERS.remove("toy-sgd")


@pytest.fixture
def toy_schedule():
    SCHEDULES.add("toy-reversed", _reversed_1f1b)
    yield "toy-reversed"
    SCHEDULES.remove("toy-reversed")


def test_a_registered_optimizer_trains_through_the_command_line(tmp_path, toy_optimizer):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--optimizer", toy_optimizer, "--set", "optim.lr=0.05", "--output-dir", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["optim"]["name"] == toy_optimizer
    assert len(record["metrics"]["train_losses"]) == 3 and record["metrics"]["delays"] == [1, 0]
    assert toy_optimizer in _train_help()  # --optimizer's help lists the registered names


def test_a_registered_schedule_trains_through_the_command_line(tmp_path, toy_schedule):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--schedule", toy_schedule, "--optimizer", "adamw", "--output-dir", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["metrics"]["delays"] == [0, 1] and record["config"]["schedule"] == toy_schedule


def test_removed_variants_are_unknown_again():
    with pytest.raises(ValueError, match=r"unknown optimizer 'toy-sgd'; expected one of: adamw, pipedream-lr"):
        OptimConfig(name="toy-sgd")
    with pytest.raises(ValueError, match=r"unknown staleness schedule 'toy-reversed'; expected one of: async-1f1b"):
        staleness_schedule("toy-reversed", 2)


def test_a_schedule_giving_bad_delays_is_refused():
    SCHEDULES.add("toy-negative", lambda num_stages, **_: (-1,) * num_stages)
    try:
        with pytest.raises(ValueError, match=r"'toy-negative' gave \[-1, -1\], not 2 non-negative ints"):
            staleness_schedule("toy-negative", 2)
    finally:
        SCHEDULES.remove("toy-negative")


def _train_help() -> str:
    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices["train"].format_help()


def test_train_help_lists_every_config_key_with_its_default():
    text = _train_help()
    for key in ("optim.lr (float) = 0.001", "model.n_layer (int) = 4", 'schedule (str) = "async-1f1b"', "steps"):
        assert key in text
    assert "--config" in text and "--set" in text and "--no-weight-stashing" in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"stages": 4, "optim.name": "basis-rotation", "weight_stashing": True, "steps": 200}),
        (["--stages", "2", "--optimizer", "adamw"], {"stages": 2, "optim.name": "adamw"}),
        (["--no-weight-stashing", "--set", "optim.lr=3e-4"], {"weight_stashing": False, "optim.lr": 3e-4}),
    ],
)
def test_named_flags_and_set_build_the_config(args, expected):
    config = config_from_args(build_parser().parse_args(["train", *args, "--output-dir", "unused"]))
    for key, value in expected.items():
        holder = config
        for part in key.split("."):
            holder = getattr(holder, part)
        assert holder == value, key


def test_named_flags_override_the_config_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("stages: 3\nsteps: 9\noptim:\n  name: nesterov\n")
    args = build_parser().parse_args(["train", "--config", str(config_file), "--steps", "5", "--output-dir", "x"])
    config = config_from_args(args)
    assert (config.stages, config.steps, config.optim.name) == (3, 5, "nesterov")


def test_a_key_given_by_its_flag_and_by_set_is_refused(tmp_path, capsys):
    args = ["train", *TINY, "--set", "steps=4", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    assert re.search(r"steps is set twice", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_no_import_cycle():
    assert import_cycles("basisrot_pipeline") == []


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["demo", "--help"]], ids=" ".join)
def test_help_imports_neither_transformers_nor_datasets(argv):
    script = (
        "import sys\n"
        "from basisrot_pipeline.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage: basisrot-pipeline" in result.stdout
    modules = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert not [name for name in modules if name.split(".")[0] in ("transformers", "datasets")]


def test_public_api():
    for name in ("BasisRotation", "OptimConfig", "build_optimizer", "TrainConfig", "train", "build_emulator"):
        assert name in basisrot_pipeline.__all__ and hasattr(basisrot_pipeline, name)
    assert all(hasattr(basisrot_pipeline, name) for name in basisrot_pipeline.__all__)


def test_readme_first_example_uses_only_top_level_names_and_runs(capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL)[1]
    tree = ast.parse(block)
    imported = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    assert imported and all(
        isinstance(node, ast.ImportFrom) and node.module == "basisrot_pipeline" for node in imported
    )
    exec(compile(tree, str(README), "exec"), {})
    assert re.fullmatch(r"loss \d+\.\d{3} -> \d+\.\d{3}\n", capsys.readouterr().out)


def test_plot_series_differ_in_colour_and_line_style():
    styles = series_styles(8)
    assert len({s["color"] for s in styles}) == 8
    assert all(a["linestyle"] != b["linestyle"] for a, b in itertools.pairwise(styles))
