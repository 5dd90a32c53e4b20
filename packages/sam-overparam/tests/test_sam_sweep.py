"""The sharded sweep runner, its results store and figures, and the parameter-budget helper.

Two CPU processes share a tiny grid (as torchrun/accelerate would start them, through RANK and
WORLD_SIZE); a sweep killed with SIGKILL reruns only what is missing; the budget helper agrees with
a brute-force count over built and masked models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from sam_overparam import budget, cli, models
from sam_overparam.config import PlotConfig, SweepConfig, TrainConfig
from sam_overparam.sweep import summarize_store, sweep_configs
from shin_common import JsonlStore, config_to_dict, read_json, shard

TINY_TRAIN = {"epochs": 1, "num_train": 64, "num_test": 64, "batch_size": 32}


def _sweep_args(store: Path, **grid) -> list[str]:
    settings = {"widths": [4, 8], "optimizers": ["sgd", "sam"], "seeds": [0], "train": TINY_TRAIN, **grid}
    return [
        "sweep",
        "--store",
        str(store),
        *[a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")],
    ]


def _cli(argv: list[str], rank: int | None = None, world_size: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE"):
        env.pop(name, None)
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    return subprocess.Popen(
        [sys.executable, "-m", "sam_overparam", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ----------------------------------------------------------------------------- the grid


def test_grid_has_every_combination_once_and_sgd_once_per_cell():
    sweep = SweepConfig(
        models=["mlp", "resnet"], widths=[4, 8], optimizers=["sgd", "sam", "asam"], rhos=[0.05, 0.1],
        seeds=[0, 1], label_noise=[0.0, 0.2], sparsity=[0.0, 0.5], train={"epochs": 2},
    )  # fmt: skip
    configs = sweep_configs(sweep)
    cells = 2 * 2 * 2 * 2  # model x width x noise x sparsity
    assert len(configs) == cells * (1 + 2 + 2) * 2  # (sgd + sam at 2 rhos + asam at 2 rhos) x seeds
    keys = [json.dumps(config_to_dict(c), sort_keys=True) for c in configs]
    assert len(set(keys)) == len(keys)
    assert {c.rho for c in configs if c.optimizer == "sgd"} == {0.0}
    assert all(c.epochs == 2 for c in configs)
    assert {tuple(c.widths) for c in configs if c.model == "mlp"} == {(4, 1), (8, 2)}
    assert {c.filters for c in configs if c.model == "resnet"} == {4, 8}
    shares = [shard(configs, rank=r, world_size=3) for r in range(3)]
    assert sorted(k for s in shares for k in (json.dumps(config_to_dict(c), sort_keys=True) for c in s)) == sorted(keys)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"train": {"widths": [3]}}, "train sets widths, which the grid varies"),
        ({"train": {"epoch": 3}}, "unknown TrainConfig field(s) epoch"),
        ({"optimizers": ["sgd", "adamw"]}, "optimizers=['sgd', 'adamw']: expected a non-empty list of distinct"),
        ({"models": ["vit"]}, "models=['vit']"),
        ({"seeds": [0, 0]}, "seeds=[0, 0]: expected a non-empty list of distinct seeds"),
        ({"sparsity": [1.0]}, "sparsity=[1.0]: expected distinct fractions in [0, 1)"),
    ],
)
def test_bad_grids_are_refused_naming_the_key(settings, message):
    with pytest.raises(ValueError) as error:
        SweepConfig(**settings)
    assert message in str(error.value)


# ----------------------------------------------------------------------------- processes


def test_two_processes_share_the_grid_without_duplicates(tmp_path):
    store = tmp_path / "runs.jsonl"
    argv = _sweep_args(store)
    workers = [_cli(argv, rank, 2) for rank in range(2)]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    assert "rank 0 of 2: 2 runs in this share, 0 finished before, 2 trained" in outputs[0][0]
    assert "rank 1 of 2: 2 runs in this share, 0 finished before, 2 trained" in outputs[1][0]
    records = JsonlStore(store).records()
    grid = sweep_configs(SweepConfig(widths=[4, 8], optimizers=["sgd", "sam"], seeds=[0], train=TINY_TRAIN))
    expected = [json.dumps(config_to_dict(c), sort_keys=True) for c in grid]
    written = [json.dumps(r["config"], sort_keys=True) for r in records]
    assert sorted(written) == sorted(expected)  # every run once, none twice
    for record in records:
        index = expected.index(json.dumps(record["config"], sort_keys=True))
        assert record["shard"] == {"rank": index % 2, "world_size": 2}  # the run belonged to that share
        provenance = record["provenance"]
        assert provenance["package"]["name"] == "sam-overparam" and provenance["seed"] == record["config"]["seed"]
        assert provenance["versions"]["torch"] == torch.__version__ and "host" in provenance
        assert record["metrics"]["num_params"] > 0 and len(record["metrics"]["history"]) == 1


def test_a_killed_sweep_reruns_only_what_is_missing(tmp_path, capsys):
    store = tmp_path / "runs.jsonl"
    train = {"epochs": 2, "num_train": 500, "num_test": 100, "batch_size": 50}
    argv = _sweep_args(store, widths=[8, 16, 32], train=train)
    worker = _cli(argv)
    deadline = time.monotonic() + 180
    while not (store.exists() and store.read_bytes().count(b"\n") >= 1):
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[1]
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    before = store.read_bytes()
    finished = before.count(b"\n")
    assert 1 <= finished < 6, finished  # killed in the middle of the grid
    assert cli.main(argv) == 0
    assert f"6 runs in this share, {finished} finished before, {6 - finished} trained" in capsys.readouterr().out
    after = store.read_bytes()
    assert after.startswith(before[: before.rfind(b"\n") + 1])  # finished runs kept, not retrained
    keys = [r["key"] for r in JsonlStore(store).records()]
    assert len(keys) == len(set(keys)) == 6
    assert cli.main(argv) == 0  # a third run has nothing left to do
    assert "6 finished before, 0 trained" in capsys.readouterr().out


# ----------------------------------------------------------------------------- summary and figures


def _fake_store(path: Path, accuracy) -> None:
    store = JsonlStore(path)
    for width in (8, 32):
        for seed in (0, 1, 2):
            for optimizer, rho in (("sgd", 0.0), ("sam", 0.05), ("sam", 0.1)):
                config = TrainConfig(widths=[width, width // 3], optimizer=optimizer, rho=rho, seed=seed)
                value = accuracy(width, optimizer, rho, seed)
                metrics = {"best_test": value, "final_test": value - 0.01, "num_params": width * 50,
                           "num_effective_params": width * 50}  # fmt: skip
                store.append(config_to_dict(config), {"metrics": metrics})


def _accuracy(width, optimizer, rho, seed):
    gain = {"sgd": 0.0, "sam": (0.01 if rho == 0.05 else 0.02) if width == 32 else (0.01 if rho == 0.05 else -0.01)}
    return 0.7 + 0.001 * seed + gain[optimizer] + (0.003 * seed if optimizer == "sam" else 0.0)


def test_summary_pairs_by_seed_and_picks_the_best_rho(tmp_path):
    _fake_store(tmp_path / "runs.jsonl", _accuracy)
    summary = summarize_store(JsonlStore(tmp_path / "runs.jsonl").records(), PlotConfig())
    rows = {(r["width"], r["rho"]): r for r in summary["gains"]}
    # by hand: gain + 0.003 * seed over seeds 0, 1, 2, in points
    assert rows[(32, 0.1)]["gain_points_mean"] == pytest.approx(100 * (0.02 + 0.003))
    assert rows[(32, 0.1)]["gain_points_std"] == pytest.approx(0.3)
    assert rows[(8, 0.1)]["gain_points_min"] == pytest.approx(-1.0)
    assert rows[(8, 0.1)]["gain_points_max"] == pytest.approx(-1.0 + 0.6)
    assert {(r["width"], r["best_rho"]) for r in summary["best_rho"]} == {(8, 0.05), (32, 0.1)}


def test_plot_command_draws_the_standard_figures(tmp_path, capsys):
    _fake_store(tmp_path / "runs.jsonl", _accuracy)
    out = tmp_path / "figures"
    argv = ["plot", "--store", str(tmp_path / "runs.jsonl"), "--output-dir", str(out)]
    assert cli.main(argv) == 0
    assert "18 runs, 4 paired cells" in capsys.readouterr().out
    for name in ("gain_vs_params.png", "best_rho_vs_width.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    record = read_json(out / "results.json")
    assert record["metrics"]["records"] == 18 and len(record["metrics"]["best_rho"]) == 2
    assert cli.main(argv) == 0  # a grown store is drawn again, not reported from before
    assert cli.main(["plot", "--store", str(tmp_path / "missing.jsonl"), "--output-dir", str(out)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


# ----------------------------------------------------------------------------- parameter budgets


def _built_count(model: str, width: int, sparsity: float, method: str) -> int:
    torch.manual_seed(0)
    if model == "mlp":
        net = models.MLP(40, budget.mlp_widths(width), 10)
        batch = (torch.randn(8, 40), torch.randint(0, 10, (8,)))
    else:
        net = models.CifarResNet(width, blocks=[1, 1], num_classes=10, in_channels=1)
        batch = (torch.randn(8, 1, 1, 40), torch.randint(0, 10, (8,)))
    models.sparsify(
        net, method, sparsity, generator=torch.Generator().manual_seed(1), batch=batch,
        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
    )  # fmt: skip
    return models.count_parameters(net)


@pytest.mark.parametrize("method", ["random", "snip"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_width_for_budget_matches_a_brute_force_count_of_built_models(sparsity, method):
    counts, width = {}, 0
    while not counts or max(counts.values()) < 4_000:  # build and mask every width up to past the budgets
        width += 1
        counts[width] = _built_count("mlp", width, sparsity, method)
    for target in (700, 3_000):
        closest = min(counts, key=lambda w: (abs(counts[w] - target), w))
        assert budget.width_for_budget(target, model="mlp", sparsity=sparsity, method=method) == closest, target
    for w in (1, 5, width):
        assert budget.effective_parameters("mlp", w, sparsity=sparsity, method=method) == counts[w]


@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_resnet_parameter_count_matches_the_built_model(sparsity):
    for filters in (1, 3, 4):
        expected = _built_count("resnet", filters, sparsity, "random")
        assert budget.effective_parameters("resnet", filters, sparsity=sparsity, blocks=[1, 1]) == expected


def test_budget_errors_name_the_value():
    with pytest.raises(ValueError, match="budget=0: expected a parameter count >= 1"):
        budget.width_for_budget(0)
    with pytest.raises(ValueError, match="model='vit': parameter counts are known for mlp, resnet"):
        budget.width_for_budget(100, model="vit")


def test_param_budgets_replace_the_width_axis():
    sweep = SweepConfig(param_budgets=[3_000], sparsity=[0.0, 0.8], optimizers=["sgd"], seeds=[0])
    widths = {c.sparsity: c.widths[0] for c in sweep_configs(sweep)}
    assert widths[0.8] > widths[0.0]  # sparser: wider at the same parameter count
    for sparsity, width in widths.items():
        assert width == budget.width_for_budget(3_000, sparsity=sparsity)


@pytest.mark.parametrize(
    ("name", "runs"),
    [("findings_1_2_mlp_width_rho", 240), ("findings_1_2_resnet_width_rho", 80), ("finding_3_label_noise", 160)],
)
def test_the_findings_configurations_load_and_expand(name, runs):
    from shin_common import load_config

    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    assert len(sweep_configs(load_config(SweepConfig, path))) == runs
