"""Command-line round trip and bad input through the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from rp_models import save_byte_llama
from transformers import AutoModelForCausalLM

from recon_prune.cli import main
from recon_prune.tiny_model import byte_tokenizer

SMALL = ["--nsamples", "4", "--seq-len", "32", "--epochs", "1", "--set", "blocksize=16"]


@pytest.fixture
def model_dir(tmp_path):
    return save_byte_llama(tmp_path / "dense")


def test_cli_round_trip(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                "--model",
                str(model_dir),
                "--output-dir",
                str(out),
                "--method",
                "sparsegpt",
                "--reconstruction",
                "br+gp",
                "--eval-chunks",
                "2",
                "--eval-seq-len",
                "24",
                *SMALL,
            ]
        )
        == 0
    )
    assert "pruned perplexity" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["dense"]["seq_len"] == 24 and results["metrics"]["pruned"]["chunks"] == 2
    assert (results["config"]["nsamples"], results["config"]["seq_len"]) == (4, 32)
    assert results["config"]["method"] == "sparsegpt" and results["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert results["versions"]["recon-prune"] and results["report"]["block_errors"][-1] > 0
    saved = torch.load(out / "masks.pt", weights_only=True)
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    for name, mask in saved["masks"].items():
        assert torch.all(reloaded.get_submodule(name).weight[~mask] == 0)
    assert (
        main(["eval", "--model", str(out / "model"), "--max-chunks", "2", "--output", str(tmp_path / "eval.json")]) == 0
    )
    assert "sparsity 0.5" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["perplexity"]["chunks"] == 2
    gen = tmp_path / "gen.jsonl"
    assert (
        main(
            ["generate-calibration", "--model", str(model_dir), "--output", str(gen), "--count", "2", "--seq-len", "16"]
        )
        == 0
    )
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["token_ids"]) == 16 for r in rows)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--method", "obs"], "unknown method 'obs'"),
        (["--sparsity", "1.5"], r"sparsity must lie in \[0, 1\)"),
        (["--pattern", "4:2"], "0 < N < M"),
        (["--pattern", "two:four"], "malformed"),
        (
            ["--seq-len", "65"],
            r"seq_len 65 \(--seq-len, or seq_len in --config/--set\) exceeds the model's context of 64",
        ),
        # SMALL gives --seq-len: a key given by its flag and by --set is refused (the one config grammar)
        (["--set", "seq_len=65"], r"seq_len is set twice, by its own flag and by --set"),
        (["--device", "gpu"], "device='gpu' is not a device"),
        (["--offload-device", "cuda:7"], "offload_device='cuda:7' but"),
        (["--eval", "stdlib", "--eval-seq-len", "65"], "--eval-seq-len 65 exceeds the model's context of 64"),
        (["--eval", "stdlib", "--eval-chunks", "0"], "--eval-chunks must be a positive integer, got 0"),
    ],
)
def test_cli_bad_input_writes_nothing(model_dir, tmp_path, capsys, extra, match) -> None:
    out = tmp_path / "out"
    args = ["prune", "--model", str(model_dir), "--output-dir", str(out), "--eval", "none", *SMALL, *extra]
    assert main(args) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_cli_seq_len_from_set_is_named_as_such(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    args = ["prune", "--model", str(model_dir), "--output-dir", str(out), "--eval", "none", "--nsamples", "4"]
    assert main([*args, "--set", "blocksize=16", "--set", "seq_len=65"]) == 2
    assert re.search(r"seq_len 65 \(--seq-len, or seq_len in --config/--set\) exceeds", capsys.readouterr().err)
    assert not out.exists()


def test_cli_short_calibration_text_and_non_empty_output(model_dir, tmp_path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                "--model",
                str(model_dir),
                "--output-dir",
                str(out),
                "--calibration",
                str(short),
                "--eval",
                "none",
                *SMALL,
            ]
        )
        == 2
    )
    assert "shorter than one sequence of 32" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    # A directory of someone else's files is refused, with or without --overwrite (which used to
    # delete the whole directory), and left as it was.
    for extra in ([], ["--overwrite"]):
        assert main(["prune", "--model", str(model_dir), "--output-dir", str(out), *SMALL, *extra]) == 2
        assert "holds files recon-prune did not write (keep.txt)" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "x"


def test_cli_help_and_unsupported_model(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "--reconstruction" in capsys.readouterr().out
    assert (
        main(["prune", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"), "--eval", "none"])
        == 2
    )
    assert "missing" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_demo_on_a_small_model(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    args = [
        "demo",
        "--model",
        str(model_dir),
        "--output-dir",
        str(out),
        "--nsamples",
        "4",
        "--seq-len",
        "32",
        "--eval-chunks",
        "2",
        "--self-generated",
        "2",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| sparsegpt | br+gp+cr | " in printed and "| wanda | none | " in printed and "self-gen" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["metrics"]["runs"]) == 11
    baselines = {(run["method"], run["reduction_baseline"]) for run in results["metrics"]["runs"]}
    assert baselines == {("sparsegpt", "lr"), ("wanda", "none")}
    sparsegpt_lr = next(
        r for r in results["metrics"]["runs"] if r["method"] == "sparsegpt" and r["reconstruction"] == "lr"
    )
    assert sparsegpt_lr["error_reduction"] == 0.0
    assert (out / "demo_table.md").is_file() and (out / "error_per_block.png").is_file()


def test_config_file_and_overrides(model_dir, tmp_path) -> None:
    config_file = tmp_path / "prune.yaml"
    config_file.write_text("method: wanda\npattern: '4:8'\nreconstruction: br\nepochs: 1\n", encoding="utf-8")
    out = tmp_path / "out"
    args = [
        "prune",
        "--model",
        str(model_dir),
        "--output-dir",
        str(out),
        "--config",
        str(config_file),
        "--set",
        "seed=3",
        "--eval",
        "none",
        "--nsamples",
        "4",
        "--seq-len",
        "32",
    ]
    assert main(args) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["method"], config["pattern"], config["reconstruction"], config["seed"]) == ("wanda", "4:8", "br", 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: wanda\nsparsity_ratio: 0.5\n", encoding="utf-8")
    assert main(["prune", "--model", str(model_dir), "--output-dir", str(tmp_path / "o2"), "--config", str(bad)]) == 2


def test_cli_bad_device_fails_before_the_model_is_loaded(model_dir, tmp_path, capsys, monkeypatch) -> None:
    import recon_prune.runs as runs

    monkeypatch.setattr(
        runs, "load_model", lambda name: pytest.fail("the model was loaded before the device was checked")
    )
    cases = [("gpu", "device='gpu' is not a device")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "device='cuda' but CUDA is not available"))
    for device, match in cases:
        assert main(["prune", "--model", str(model_dir), "--output-dir", str(tmp_path / "o"), "--device", device]) == 2
        assert re.search(match, capsys.readouterr().err)


def test_cli_vocabulary_is_checked_before_the_dense_evaluation(tmp_path, capsys, monkeypatch) -> None:
    import recon_prune.runs as runs

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    path = tmp_path / "small-vocab"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    text = tmp_path / "calib.txt"
    text.write_text("zzzz " * 200, encoding="utf-8")  # byte 122 is outside a vocabulary of 100
    monkeypatch.setattr(
        runs, "heldout_perplexity", lambda *a, **k: pytest.fail("dense perplexity ran before the check")
    )
    args = ["prune", "--model", str(path), "--output-dir", str(tmp_path / "o"), "--calibration", str(text), *SMALL]
    assert main(args) == 2
    assert "calibration token id 122 is outside the model's vocabulary of 100" in capsys.readouterr().err


def test_cli_failed_save_is_resumed_by_the_same_command(model_dir, tmp_path, capsys, monkeypatch) -> None:
    """A save that fails half-way leaves an unfinished run, which the same command saves again."""
    import recon_prune.outputs as outputs

    real_save = outputs.save_pruned

    def failing_save(run, *args, **kwargs) -> None:
        run.begin()
        (run.path / "model").mkdir()
        (run.path / "model" / "model.safetensors").write_bytes(b"x")  # torn: the disk filled up
        raise OSError("No space left on device")

    monkeypatch.setattr(outputs, "save_pruned", failing_save)
    out = tmp_path / "out"
    args = ["prune", "--model", str(model_dir), "--output-dir", str(out), "--eval", "none", "--reconstruction", "none"]
    assert main([*args, *SMALL]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    assert not json.loads((out / ".run-manifest.json").read_text())["finished"]
    monkeypatch.setattr(outputs, "save_pruned", real_save)
    assert main([*args, *SMALL]) == 0
    assert json.loads((out / ".run-manifest.json").read_text())["finished"]
    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None  # the torn file was replaced
    assert not list(tmp_path.glob(".out.partial*"))


def test_cli_defaults_follow_the_recorded_pretraining_window(model_dir, tmp_path) -> None:
    """A model whose config records train_seq_len is calibrated and evaluated at that length."""
    config_file = model_dir / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"train_seq_len": 24}))
    out = tmp_path / "out"
    args = ["prune", "--model", str(model_dir), "--output-dir", str(out), "--nsamples", "4", "--epochs", "1"]
    assert main([*args, "--reconstruction", "none", "--eval-chunks", "2", "--set", "blocksize=16"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seq_len"] == 24 and results["metrics"]["dense"]["seq_len"] == 24
    assert main(["eval", "--model", str(out / "model"), "--max-chunks", "2", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["perplexity"]["seq_len"] == 24


def test_cli_warns_once_that_lr_without_sparsegpt_changes_nothing(model_dir, tmp_path, capsys) -> None:
    """The CLI rebuilds the config with the calibration's shape; the warning must still come once."""
    args = ["prune", "--model", str(model_dir), "--output-dir", str(tmp_path / "out"), "--eval", "none", *SMALL]
    assert main([*args, "--method", "wanda", "--reconstruction", "lr", "--set", "device=cpu"]) == 0
    assert capsys.readouterr().err.count("equals reconstruction='none'") == 1


@pytest.mark.parametrize(
    ("command", "keys"),
    [
        ("eval", ['dataset (str) = "stdlib"', "max_chunks", "tasks"]),
        ("generate-calibration", ["count (int) = 16", "seq_len (int) = 256", "seed (int) = 0"]),
        ("demo", ["nsamples (int) = 32", "eval_chunks (int) = 64", "self_generated (int) = 32"]),
    ],
)
def test_every_command_lists_its_config_keys_in_help(command, keys, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    printed = capsys.readouterr().out
    assert "--config FILE" in printed and "--set KEY=VALUE" in printed
    for key in keys:
        assert key in printed


def test_eval_and_generate_take_config_files_and_set(model_dir, tmp_path, capsys) -> None:
    config_file = tmp_path / "eval.yaml"
    config_file.write_text("dataset: stdlib\nmax_chunks: 3\n", encoding="utf-8")
    record = tmp_path / "eval.json"
    args = ["eval", "--model", str(model_dir), "--config", str(config_file), "--set", "seq_len=16"]
    assert main([*args, "--output", str(record)]) == 0
    saved = json.loads(record.read_text())
    assert (saved["config"]["max_chunks"], saved["config"]["seq_len"], saved["config"]["tasks"]) == (3, 16, [])
    assert saved["metrics"]["perplexity"]["chunks"] == 3 and saved["metrics"]["perplexity"]["seq_len"] == 16
    # a key given by its flag and by --set is refused, as for prune
    assert main(["eval", "--model", str(model_dir), "--max-chunks", "2", "--set", "max_chunks=3"]) == 2
    assert "max_chunks" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--set", "max_chunks=0"]) == 2
    assert "--max-chunks must be a positive integer, got 0 (config key max_chunks)" in capsys.readouterr().err
    gen = tmp_path / "gen.jsonl"
    gen_args = ["generate-calibration", "--model", str(model_dir), "--output", str(gen)]
    assert main([*gen_args, "--set", "count=3", "--set", "seq_len=12", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["token_ids"]) == 12 for r in rows)
    capsys.readouterr()
    assert main([*gen_args, "--overwrite", "--set", "seq_len=5"]) == 2
    err = capsys.readouterr().err
    assert "--seq-len must be at least 6, got 5 (config key seq_len)" in err and len(err.strip().splitlines()) == 1


def test_demo_takes_a_config_file_and_refuses_bad_keys_before_loading(model_dir, tmp_path, capsys) -> None:
    config_file = tmp_path / "demo.yaml"
    config_file.write_text("nsamples: 4\nseq_len: 32\nself_generated: 0\n", encoding="utf-8")
    out = tmp_path / "demo"
    args = ["demo", "--model", str(model_dir), "--output-dir", str(out), "--config", str(config_file)]
    assert main([*args, "--set", "eval_chunks=0"]) == 2
    assert "--eval-chunks must be a positive integer, got 0 (config key eval_chunks)" in capsys.readouterr().err
    assert main([*args, "--set", "eval_chunks=1", "--set", "self_generated=2", "--set", "seq_len=5"]) == 2
    assert "--seq-len must be at least 6, got 5" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--eval-chunks", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {k: results["config"][k] for k in ("nsamples", "seq_len", "eval_chunks", "self_generated")} == {
        "nsamples": 4,
        "seq_len": 32,
        "eval_chunks": 1,
        "self_generated": 0,
    }
    assert len(results["metrics"]["runs"]) == 10  # no self-generated run
