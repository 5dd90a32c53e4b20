"""The command line: train, intervene, demo (tiny configurations)."""

from __future__ import annotations

import json

import pytest

from cbm_intervene.cli import main

TINY = [
    "data.n_concepts=8",
    "data.n_features=8",
    "data.n_classes=4",
    "data.n_groups=2",
    "data.samples_per_class=20",
    "data.concept_group_size=2",
    "train.concept_hidden=[8]",
    "train.max_epochs=3",
]


def test_train_then_intervene(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(run),
                *[a for kv in TINY for a in ("--set", kv)],
                "--set",
                "train.strategy=SEQ",
            ]
        )
        == 0
    )
    record = json.loads((run / "train_record.json").read_text())
    assert record["config"]["train"]["strategy"] == "SEQ" and "test_task_error" in record["metrics"]
    assert (
        record["versions"]["torch"]
        and (run / "predictions.pt").is_file()
        and (run / "checkpoints" / "cbm.pt").is_file()
    )
    out = tmp_path / "tti"
    argv = ["intervene", "--predictions", str(run / "predictions.pt"), "--output-dir", str(out), "--seeds", "0", "1"]
    assert (
        main([*argv, "--criteria", "RAND", "LCP", "ECTP", "--budgets", "2", "--target-error", "0.5", "--tau-f", "0.1"])
        == 0
    )
    result = json.loads((out / "intervention.json").read_text())
    assert set(result["curves"]) == {"I+S", "G+S", "I+B", "G+B"}
    curve = result["curves"]["I+S"]["RAND"]
    assert curve["n_runs"] == 2 and len(curve["error_mean"]) == 9
    assert result["curves"]["I+S"]["ECTP"]["n_runs"] == 1
    assert "gap_to_reference_auc" in result["metrics"]["I+S"]["ECTP"]
    assert (out / "intervention.png").is_file() and (out / "intervention_cost.png").is_file()
    assert "results:" in capsys.readouterr().out
    # a rerun reuses every finished cell from cells.jsonl (here: all 12) and gives the same curves
    cells = (out / "cells.jsonl").read_text().splitlines()
    assert len(cells) == 12
    assert (
        main([*argv, "--criteria", "RAND", "LCP", "ECTP", "--budgets", "2", "--target-error", "0.5", "--tau-f", "0.1"])
        == 0
    )
    assert (out / "cells.jsonl").read_text().splitlines() == cells
    assert json.loads((out / "intervention.json").read_text())["curves"] == result["curves"]


def test_bad_cli_inputs(tmp_path):
    with pytest.raises(SystemExit):
        main(["intervene", "--predictions", "x.pt", "--output-dir", str(tmp_path), "--levels", "Z+Z"])
    with pytest.raises(SystemExit):
        main(["train", "--output-dir", str(tmp_path), "--set", "train.strategy=BOGUS"])


def test_demo_quick(tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path), "--quick", "--strategies", "IND", "JNT", "--seeds", "0"]) == 0
    record = json.loads((tmp_path / "demo_results.json").read_text())
    assert set(record["metrics"]) == {"IND", "JNT"}
    for level in ("I+S", "G+S", "I+B", "G+B"):
        assert set(record["metrics"]["IND"]["summary"][level]) == {"RAND", "UCP", "LCP", "CCTP", "ECTP", "EUDTP"}
    assert (tmp_path / "IND_intervention.png").is_file() and (tmp_path / "JNT" / "predictions.pt").is_file()
