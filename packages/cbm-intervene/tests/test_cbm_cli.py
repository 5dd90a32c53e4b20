"""The command line: train, intervene, demo (tiny configurations)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from cbm_tiny import TINY

from cbm_intervene.cli import main
from cbm_intervene.data import save_predictions
from cbm_intervene.experiments import file_sha256
from cbm_intervene.models import TargetModelSpec

# LCP reads the true concepts: the oracle must be asked for by name
ORACLE_GRID = ["--criteria", "RAND", "LCP", "ECTP", "--allow-oracle", "--budgets", "2", "--target-error", "0.5"]
ORACLE_GRID += ["--tau-f", "0.1"]


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
    record = json.loads((run / "results.json").read_text())
    assert record["config"]["train"]["strategy"] == "SEQ" and "test_task_error" in record["metrics"]
    assert (
        record["versions"]["torch"]
        and (run / "predictions.pt").is_file()
        and (run / "checkpoints" / "cbm.pt").is_file()
    )
    out = tmp_path / "tti"
    argv = ["intervene", "--predictions", str(run / "predictions.pt"), "--output-dir", str(out), "--seeds", "0", "1"]
    assert main([*argv, *ORACLE_GRID]) == 0
    result = json.loads((out / "results.json").read_text())
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
    assert main([*argv, *ORACLE_GRID]) == 0
    assert (out / "cells.jsonl").read_text().splitlines() == cells
    assert json.loads((out / "results.json").read_text())["curves"] == result["curves"]


def test_rewritten_predictions_are_not_served_from_a_finished_run(tmp_path, predictions_factory, capsys):
    """A run is identified by the predictions file's content, not only its path: after the file is
    rewritten, the old run's directory is refused (naming the digest) until --overwrite recomputes."""
    path = tmp_path / "p.pt"
    out = tmp_path / "tti"
    target = torch.nn.Linear(6, 4)
    spec = TargetModelSpec(n_concepts=6, n_classes=4)
    argv = ["intervene", "--predictions", str(path), "--output-dir", str(out), "--criteria", "UCP", "--no-plot"]
    argv += ["--levels", "i+s", "--budgets"]  # levels are matched case-insensitively, as in the engine

    def curve() -> list[float]:
        return json.loads((out / "results.json").read_text())["curves"]["I+S"]["UCP"]["error_mean"]

    save_predictions(path, predictions_factory("prob", seed=0), target_model=target, target_spec=spec)
    assert main(argv) == 0
    first, results = curve(), (out / "results.json").read_bytes()
    save_predictions(path, predictions_factory("prob", seed=1), target_model=target, target_spec=spec)
    capsys.readouterr()
    assert main(argv) == 2
    assert "differing: predictions_sha256" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == results  # refused: nothing changed
    assert main([*argv, "--overwrite"]) == 0
    assert curve() != first
    assert len((out / "cells.jsonl").read_text().splitlines()) == 1
    capsys.readouterr()
    assert main(argv) == 0  # unchanged file, finished run: reported, not recomputed
    assert "nothing recomputed" in capsys.readouterr().out
    assert len((out / "cells.jsonl").read_text().splitlines()) == 1


def test_bad_cli_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["intervene", "--predictions", "x.pt", "--output-dir", str(tmp_path), "--levels", "Z+Z"])
    assert main(["train", "--output-dir", str(tmp_path / "t"), "--set", "train.strategy=BOGUS"]) == 2
    capsys.readouterr()
    assert main(["intervene", "--predictions", str(tmp_path / "none.pt"), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"predictions file not found: {tmp_path / 'none.pt'}" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []  # refused before any directory was made


def test_demo_quick(tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path), "--quick", "--strategies", "IND", "JNT", "--seeds", "0"]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert set(record["metrics"]) == {"IND", "JNT"}
    for level in ("I+S", "G+S", "I+B", "G+B"):
        assert set(record["metrics"]["IND"]["summary"][level]) == {"RAND", "UCP", "LCP", "CCTP", "ECTP", "EUDTP"}
    assert (tmp_path / "IND_intervention.png").is_file() and (tmp_path / "JNT" / "predictions.pt").is_file()


def test_file_sha256_is_the_digest_of_the_whole_file(tmp_path):
    content = bytes(range(256)) * 5000  # over one read block
    (tmp_path / "blob").write_bytes(content)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(content).hexdigest()


def test_adaptive_skip_on_files_of_different_visibility_aligns_curves(tmp_path, predictions_factory, capsys):
    """Adaptive ordering stops once nothing is left to ask; with --not-visible skip a file whose
    concepts are partly not visible stops earlier. evaluate_grid holds such a run's last values (it
    has nothing left to ask, so nothing changes) until the longest run ends, then averages."""
    from dataclasses import replace

    from cbm_intervene.data import ConceptPredictions
    from cbm_intervene.intervention import InterventionConfig, run_intervention

    spec = TargetModelSpec(n_concepts=6, n_classes=4)
    torch.manual_seed(0)
    target = spec.build()
    seen = predictions_factory("prob", seed=0)
    hidden = predictions_factory("prob", seed=1)
    visibility = torch.ones(hidden.n_samples, hidden.n_concepts, dtype=torch.bool)
    visibility[:, 5] = False  # concept 5 (group c) is never visible in the second file
    hidden = ConceptPredictions(**{**hidden.__dict__, "visibility": visibility})
    paths = [
        save_predictions(tmp_path / name, predictions, target_model=target, target_spec=spec)
        for name, predictions in (("seen.pt", seen), ("hidden.pt", hidden))
    ]
    out = tmp_path / "tti"
    argv = ["intervene", "--predictions", *map(str, paths), "--output-dir", str(out), "--no-plot"]
    argv += ["--ordering", "adaptive", "--not-visible", "skip", "--criteria", "UCP", "--levels", "I+S", "G+S"]
    assert main(argv) == 0, capsys.readouterr().err
    curves = json.loads((out / "results.json").read_text())["curves"]
    for level, n_units in (("I+S", 6), ("G+S", 3)):
        config = InterventionConfig(criterion="UCP", level=level, ordering="adaptive", not_visible="skip")
        own = [run_intervention(p, target, replace(config)) for p in (seen, hidden)]
        assert [len(run.error) for run in own] == [n_units + 1, n_units]  # the crash: different lengths
        held = [np.concatenate([run.error, run.error[-1:].repeat(n_units + 1 - len(run.error))]) for run in own]
        curve = curves[level]["UCP"]
        np.testing.assert_allclose(curve["error_mean"], np.mean(held, axis=0), atol=1e-6)
        assert len(curve["concepts_per_sample"]) == n_units + 1
        assert curve["concepts_per_sample"][-1] == pytest.approx((6 + 5) / 2)


def test_intervene_refuses_the_oracle_unless_asked_for(tmp_path, predictions_factory, capsys):
    """--criteria LCP alone ends in one line naming the criterion and --allow-oracle, before any
    directory is made; with --allow-oracle it runs; the default criteria leave LCP out without it."""
    spec = TargetModelSpec(n_concepts=6, n_classes=4)
    path = save_predictions(tmp_path / "p.pt", predictions_factory("prob"), target_model=spec.build(), target_spec=spec)
    out = tmp_path / "tti"
    argv = ["intervene", "--predictions", str(path), "--output-dir", str(out), "--no-plot", "--levels", "I+S"]
    capsys.readouterr()
    assert main([*argv, "--criteria", "UCP", "LCP"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LCP" in err and "--allow-oracle" in err
    assert not out.exists()
    assert main([*argv, "--seeds", "0"]) == 0
    default = json.loads((out / "results.json").read_text())["curves"]["I+S"]
    assert set(default) == {"RAND", "UCP", "CCTP", "ECTP", "EUDTP"}
    assert main([*argv, "--criteria", "UCP", "LCP", "--allow-oracle", "--overwrite"]) == 0
    assert set(json.loads((out / "results.json").read_text())["curves"]["I+S"]) == {"UCP", "LCP"}
