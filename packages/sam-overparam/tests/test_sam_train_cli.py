"""Trainer (best epoch, resume, sweeps) and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from sam_overparam import cli
from sam_overparam import train as train_lib
from sam_overparam.train import TrainConfig
from shin_common import ConfigError, load_config, read_json

SMALL = dict(num_train=200, num_test=200, widths=[16, 5], epochs=4, batch_size=50)


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match=r"rho=-0.1: expected >= 0"):
        TrainConfig(rho=-0.1)
    with pytest.raises(ValueError, match=r"sparsity=1.0: expected in \[0, 1\)"):
        TrainConfig(sparsity=1.0)
    with pytest.raises(ValueError, match=r"needs model='relu1d'"):
        TrainConfig(dataset="teacher", model="mlp")
    with pytest.raises(ConfigError, match=r"optimizer='adam'"):
        load_config(TrainConfig, overrides=["optimizer=adam"])


def test_summarize_picks_best_epoch():
    history = [
        {"epoch": 1, "test_accuracy": 0.5},
        {"epoch": 2, "test_accuracy": 0.7},
        {"epoch": 3, "test_accuracy": 0.6},
    ]
    assert train_lib.summarize(history, classification=True) == {
        "best_test": 0.7, "best_epoch": 2, "final_test": 0.6, "metric": "test_accuracy"
    }  # fmt: skip
    losses = [{"epoch": 1, "test_loss": 0.3}, {"epoch": 2, "test_loss": 0.1}, {"epoch": 3, "test_loss": 0.2}]
    assert train_lib.summarize(losses, classification=False)["best_epoch"] == 2


def test_training_is_seeded_and_tracks_best_epoch():
    config = TrainConfig(**SMALL, optimizer="sam", m=25)
    model_a, metrics_a = train_lib.train(config)
    model_b, metrics_b = train_lib.train(config)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    accuracies = [h["test_accuracy"] for h in metrics_a["history"]]
    assert metrics_a["best_test"] == max(accuracies) == metrics_b["best_test"]
    assert metrics_a["history"][metrics_a["best_epoch"] - 1]["test_accuracy"] == metrics_a["best_test"]
    # milestones at epochs 1, 2, 3: the lr each epoch was trained with
    assert [h["lr"] for h in metrics_a["history"]] == pytest.approx([0.1, 0.01, 0.001, 0.0001])


def test_weight_decay_in_ascent_reaches_sam():
    model = torch.nn.Linear(3, 2)
    inside = train_lib.build_optimizer(TrainConfig(weight_decay=0.01, weight_decay_in_ascent=True), model)
    outside = train_lib.build_optimizer(TrainConfig(weight_decay=0.01), model)
    assert inside.param_groups[0]["weight_decay_in_ascent"] is True
    assert outside.param_groups[0]["weight_decay_in_ascent"] is False
    assert inside.param_groups[0]["sam_weight_decay"] == outside.param_groups[0]["sam_weight_decay"] == 0.01
    assert inside.model is model
    # and it changes the update: the ascent sees wd * w
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    start = [p.detach().clone() for p in model.parameters()]
    updates = []
    for opt in (inside, outside):
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start, strict=True):
                p.copy_(p0)
        train_lib._train_step(TrainConfig(), model, opt, x, y)
        updates.append([p.detach().clone() for p in model.parameters()])
    assert not torch.allclose(updates[0][0], updates[1][0], rtol=0, atol=1e-9)


def test_sparse_and_regression_runs():
    _, sparse = train_lib.train(TrainConfig(**SMALL, sparsity=0.8, sparsity_method="snip"))
    assert sparse["num_effective_params"] < 0.35 * sparse["num_params"]
    config = TrainConfig(
        dataset="teacher", model="relu1d", hidden=20, num_train=16, num_test=64, epochs=3, batch_size=8
    )
    _, regression = train_lib.train(config)
    assert regression["metric"] == "test_loss" and regression["best_test"] >= 0
    resnet = TrainConfig(**{**SMALL, "epochs": 1}, model="resnet", filters=4, blocks=[1, 1])
    model, metrics = train_lib.train(resnet)
    assert metrics["num_params"] == sum(p.numel() for p in model.parameters())
    assert int(model.stem[1].num_batches_tracked) == 4  # one update per SAM step (4 batches), not two


def test_checkpoint_resume_equals_uninterrupted(tmp_path, monkeypatch):
    config = TrainConfig(**SMALL)
    reference_model, reference = train_lib.train(config)
    original_evaluate = train_lib.evaluate
    calls = {"n": 0}

    def crashing_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash in epoch 3")
        return original_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_lib, "evaluate", crashing_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(config, checkpoint=tmp_path / "ckpt.pt")
    monkeypatch.setattr(train_lib, "evaluate", original_evaluate)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["epoch"] == 2
    with pytest.raises(ValueError, match=r"written for a different config"):
        train_lib.train(TrainConfig(**{**SMALL, "lr": 0.2}), checkpoint=tmp_path / "ckpt.pt")
    resumed_model, resumed = train_lib.train(config, checkpoint=tmp_path / "ckpt.pt")
    assert resumed["history"] == reference["history"]
    for p, q in zip(reference_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sweep_resumes_without_rerunning(tmp_path, monkeypatch):
    configs = [TrainConfig(**{**SMALL, "epochs": 1}, optimizer=o) for o in ("sgd", "sam")]
    store = tmp_path / "sweep.jsonl"
    train_lib.run_sweep(configs[:1], store)

    real_train, trained = train_lib.train, []

    def counting_train(config, *args, **kwargs):
        trained.append(config.optimizer)
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(train_lib, "train", counting_train)
    records = train_lib.run_sweep(configs, store)
    assert trained == ["sam"] and len(records) == 2


def test_cli_train_analyze_and_errors(tmp_path, capsys):
    run_dir = tmp_path / "run"
    small = {**SMALL, "epochs": 2}
    overrides = [arg for k, v in small.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    assert cli.main(["train", "--output-dir", str(run_dir), *overrides]) == 0
    record = read_json(run_dir / "results.json")
    assert record["config"]["widths"] == [16, 5] and "torch" in record["versions"]
    assert record["metrics"]["best_epoch"] in (1, 2)
    assert cli.main(["analyze", "--run-dir", str(run_dir), "--num-examples", "64", "--batch-size", "32",
                     "--probes", "3", "--lanczos-steps", "8", "--density-probes", "1"]) == 0  # fmt: skip
    analysis = read_json(run_dir / "analysis.json")["metrics"]
    assert analysis["dim"] == record["metrics"]["num_params"]
    assert set(analysis["stability_lambda_max"]) == {"rho=0", "rho=0.05"}
    assert [m["power"] for m in analysis["moments"]] == [2, 3, 4]
    capsys.readouterr()
    assert cli.main(["train", "--output-dir", str(tmp_path / "bad"), "--set", "rho=-1"]) == 2
    assert capsys.readouterr().err == "sam-overparam train: error: TrainConfig: rho=-1.0: expected >= 0\n"
    assert not (tmp_path / "bad").exists()


def test_cli_demo_quick_writes_sweep_summary_and_plot(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    summary = read_json(tmp_path / "results.json")
    rows = summary["metrics"]["rows"]
    assert [r["widths"] for r in rows] == [[8, 2], [64, 21]] and all(r["seeds"] == 2 for r in rows)
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert len(lines) == 8
    for row in rows:  # the gain is the paired difference of the stored runs
        per_seed = {}
        for line in map(json.loads, lines):
            if line["config"]["widths"] == row["widths"]:
                per_seed.setdefault(line["config"]["seed"], {})[line["config"]["optimizer"]] = line["metrics"][
                    "best_test"
                ]
        gains = [100 * (v["sam"] - v["sgd"]) for v in per_seed.values()]
        assert row["gain_points_mean"] == pytest.approx(sum(gains) / len(gains))
    assert (tmp_path / "gain_vs_params.png").stat().st_size > 1000
    assert "runs in" in capsys.readouterr().out
