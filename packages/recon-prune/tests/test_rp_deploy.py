"""What a user does with the pruned model: the sparsity record in config.json, ``oneshot``, and the 2:4
semi-structured conversion (its CPU-side checks here; the CUDA kernels where a GPU is present)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from rp_models import make_model, save_byte_llama
from transformers import AutoConfig, AutoModelForCausalLM

import recon_prune
from recon_prune import PruneConfig, oneshot, prune, to_semi_structured
from recon_prune.deploy import SPARSITY_RECORD_KEY, check_two_four
from recon_prune.model_adapter import find_decoder_blocks, find_linears

TINY = {"nsamples": 8, "seq_len": 16, "epochs": 1, "blocksize": 16}


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    path, blocks = find_decoder_blocks(model)
    return {
        f"{path}.{i}.{name}": module.weight.detach()
        for i, block in enumerate(blocks)
        for name, module in find_linears(block).items()
    }


def test_sparsity_record_is_in_config_json_and_round_trips(tmp_path, calib_ids) -> None:
    model = make_model("llama")
    config = PruneConfig(method="sparsegpt", pattern="2:4", reconstruction="br", seed=3, **TINY)
    prune(model, calib_ids, config)
    record = getattr(model.config, SPARSITY_RECORD_KEY)
    assert (record["method"], record["pattern"], record["sparsity"], record["reconstruction"], record["seed"]) == (
        "sparsegpt",
        "2:4",
        0.5,
        "br",
        3,
    )
    assert record["calibration"]["real_samples"] == 8 and record["calibration"]["seq_len"] == 16
    assert record["reconstruction_hparams"]["epochs"] == 1
    assert record["package"]["name"] == "recon-prune" and record["package"]["version"] == recon_prune.__version__
    git = record["package"]["git"]
    assert git is None or (re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool))
    weights = _linear_weights(model)  # the measured sparsity, counted independently
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert record["measured_sparsity"] == zeros / sum(w.numel() for w in weights.values())
    assert (
        record["pruned_layers"] == {"blocks": "model.layers", "matrices": len(weights)} and record["left_dense"] == {}
    )
    expected = json.loads(json.dumps(record))  # as JSON stores it (tuples become lists)
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())[SPARSITY_RECORD_KEY] == expected
    assert getattr(AutoConfig.from_pretrained(tmp_path / "a"), SPARSITY_RECORD_KEY) == expected
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert getattr(reloaded.config, SPARSITY_RECORD_KEY) == expected
    reloaded.save_pretrained(tmp_path / "b")  # and survives a second save
    assert getattr(AutoConfig.from_pretrained(tmp_path / "b"), SPARSITY_RECORD_KEY) == expected
    for name, weight in _linear_weights(reloaded).items():
        assert torch.equal(weight, weights[name])


def test_the_record_says_what_was_left_dense(calib_ids) -> None:
    model = make_model("mixtral")
    prune(model, calib_ids, PruneConfig(method="magnitude", reconstruction="none", **TINY))
    record = getattr(model.config, SPARSITY_RECORD_KEY)
    assert record["left_dense"] and all(isinstance(reason, str) for reason in record["left_dense"].values())
    assert record["measured_sparsity"] < 0.5


def test_oneshot_prunes_saves_and_returns_the_model(tmp_path, calib_ids) -> None:
    model = make_model("llama")
    out = tmp_path / "out"
    config = {"method": "wanda", "pattern": "2:4", "reconstruction": "br", **TINY}
    returned = oneshot(model, calib_ids, config, output_dir=out)
    assert returned is model
    expected = make_model("llama")  # the same model through prune() directly
    prune(expected, calib_ids, PruneConfig(**config))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, weight in _linear_weights(reloaded).items():
        assert torch.equal(weight, _linear_weights(expected)[name])
        check_two_four(name, weight)
    assert getattr(reloaded.config, SPARSITY_RECORD_KEY)["pattern"] == "2:4"
    report = json.loads((out / "prune_report.json").read_text())
    assert set(report["sparsity"]["layers"]) == set(_linear_weights(model)) and report["block_errors"][-1] > 0
    with pytest.raises(TypeError, match="config must be a PruneConfig or a mapping"):
        oneshot(model, calib_ids, "wanda")
    with pytest.raises(ValueError, match="is a text source; pass tokenizer="):
        oneshot(model, "stdlib", config)


def test_readme_oneshot_example_runs(tmp_path, monkeypatch) -> None:
    """The README's oneshot example, on a tiny saved model instead of stdlib-tiny."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    example = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "oneshot(" in block)
    assert len(example.strip().splitlines()) <= 10
    model_dir = save_byte_llama(tmp_path / "dense")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recon_prune.config, "PRESETS", {"cpu": {**recon_prune.config.PRESETS["cpu"], **TINY}})
    code = example.replace('"stdlib-tiny"', repr(str(model_dir)))
    exec(compile(code, "README.md", "exec"), {})  # the README's own example
    out = re.search(r'output_dir="([^"]+)"', example).group(1)
    saved = json.loads((tmp_path / out / "config.json").read_text())
    assert saved[SPARSITY_RECORD_KEY]["pattern"] == "2:4"


def test_two_four_check_matches_a_brute_force_count() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        weight = torch.randn(6, 16, generator=generator) * (torch.rand(6, 16, generator=generator) < 0.55)
        brute = all(
            sum(int(weight[r, c] != 0) for c in range(g, g + 4)) <= 2 for r in range(6) for g in range(0, 16, 4)
        )
        if brute:
            check_two_four("w", weight)
        else:
            with pytest.raises(ValueError, match=r"^w is not 2:4 sparse: row \d+, columns \d+\.\.\d+ keep [34] of 4"):
                check_two_four("w", weight)
    with pytest.raises(ValueError, match=r"w: weight of shape \(2, 6\) cannot be 2:4; expected in_features % 4 == 0"):
        check_two_four("w", torch.zeros(2, 6))


def test_semi_structured_refuses_in_one_line_on_cpu(calib_ids) -> None:
    dense = make_model("llama")
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj is not 2:4 sparse: row 0") as info:
        to_semi_structured(dense)
    assert "\n" not in str(info.value)
    unstructured = make_model("llama")
    prune(unstructured, calib_ids, PruneConfig(method="magnitude", sparsity=0.5, reconstruction="none", **TINY))
    with pytest.raises(ValueError, match="is not 2:4 sparse"):
        to_semi_structured(unstructured)
    two_four = make_model("llama")
    prune(two_four, calib_ids, PruneConfig(method="magnitude", pattern="2:4", reconstruction="none", **TINY))
    before = {name: w.clone() for name, w in _linear_weights(two_four).items()}
    with pytest.raises(ValueError, match=r"q_proj is on cpu; semi-structured sparse kernels run on CUDA only"):
        to_semi_structured(two_four)
    for name, weight in _linear_weights(two_four).items():  # nothing was converted
        assert weight.layout == torch.strided and torch.equal(weight, before[name])


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: PyTorch's semi-structured sparse kernels run on CUDA only"
)
def test_semi_structured_conversion_keeps_the_outputs_on_cuda() -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    prune(model, calib, PruneConfig(method="magnitude", pattern="2:4", reconstruction="none", nsamples=8, seq_len=32))
    model.to("cuda", torch.float16)
    ids = calib[:2].cuda()
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        converted = to_semi_structured(model)
        got = model(input_ids=ids).logits.float()
    assert len(converted) == 2 * 7
    assert all(isinstance(w, torch.sparse.SparseSemiStructuredTensor) for w in _linear_weights(model).values())
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
