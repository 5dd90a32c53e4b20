"""Perplexity protocol, sparsity report, the byte tokenizer and the stdlib-tiny recipe (a few steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from rp_models import make_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from recon_prune.evaluate import perplexity, sparsity_report
from recon_prune.tiny_model import TinyRecipe, byte_tokenizer, load_model_and_tokenizer, pretrain, stdlib_tiny_path


def test_perplexity_over_non_overlapping_chunks_by_hand() -> None:
    model = make_model("llama")
    ids = torch.randint(0, 96, (50,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seq_len=16, batch_size=2)
    assert result["chunks"] == 3 and result["tokens"] == 45  # 50 // 16 chunks, 15 predictions each
    nll = 0.0
    with torch.no_grad():
        for c in range(3):
            chunk = ids[16 * c : 16 * (c + 1)].unsqueeze(0)
            logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1], -1)
            nll -= logp.gather(1, chunk[0, 1:, None]).sum().item()
    assert math.isclose(result["perplexity"], math.exp(nll / 45), rel_tol=1e-5)


def test_sparsity_report_counts_zeros() -> None:
    model = make_model("opt")
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[:, :16] = 0
    report = sparsity_report(model)
    assert report["layers"]["model.decoder.layers.0.fc1"] == 0.5
    assert report["zeros"] == 64 * 16 and 0 < report["overall"] < 0.1


def _zeros_over_every_block_matrix(model: torch.nn.Module) -> tuple[int, int]:
    """Zeros and entries of every parameter of two or more dimensions in the decoder blocks, counted
    without the package's layer discovery (a fused 3-d expert tensor is its experts' matrices)."""
    zeros = total = 0
    for block in model.model.layers:
        for parameter in block.parameters():
            if parameter.dim() >= 2:
                zeros += int((parameter == 0).sum())
                total += parameter.numel()
    return zeros, total


def test_sparsity_report_counts_each_fused_expert_and_names_the_router_dense() -> None:
    """transformers 5 stores Mixtral's experts as fused 3-d parameters and its router as a bare
    parameter: neither is an nn.Linear, yet both are weight matrices of the block; each expert's slice
    is a prunable matrix of its own, the router a matrix left dense."""
    model = make_model("mixtral")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, :16] = 0
        model.model.layers[1].mlp.experts.down_proj[2, :, :8] = 0  # part of one expert's matrix
    report = sparsity_report(model)
    zeros, total = _zeros_over_every_block_matrix(model)
    assert (report["zeros"], report["total"]) == (zeros, total)
    assert report["overall"] == zeros / total
    layers = report["layers"]
    assert layers["model.layers.1.mlp.experts.down_proj[2]"] == 8 / 64
    assert layers["model.layers.1.mlp.experts.down_proj[1]"] == 0
    assert layers["model.layers.0.self_attn.q_proj"] == 16 / 32
    assert len(layers) == 2 * (4 + 2 * 4)
    dense = report["dense"]
    for i in range(2):
        router = dense[f"model.layers.{i}.mlp.gate.weight"]
        assert router["reason"] == "router: kept dense" and router["matrices"] == 1
    assert len(dense) == 2 and not any(name in layers for name in dense)


def test_sparsity_report_of_a_dense_model_counts_its_linear_layers_and_leaves_nothing_dense() -> None:
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:10] = 0
    report = sparsity_report(model)
    assert (report["zeros"], report["total"]) == _zeros_over_every_block_matrix(model)
    assert report["zeros"] == 10 * 32 and report["dense"] == {}
    assert len(report["layers"]) == 2 * 7


def test_byte_tokenizer_maps_bytes_to_ids_and_round_trips(tmp_path) -> None:
    tok = byte_tokenizer()
    text = "def f(x):\n    return 'héllo ☃'"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids) == text and again.eos_token_id == 256


def test_pretraining_recipe_runs_saves_and_records(tmp_path, monkeypatch) -> None:
    recipe = TinyRecipe(
        layers=1,
        hidden=32,
        heads=2,
        intermediate=64,
        context=64,
        train_seq_len=32,
        batch_size=4,
        steps=3,
        eval_chunks=2,
        warmup_steps=1,
    )
    record = pretrain(recipe, tmp_path / "m", show_progress=False)
    assert record["train_tokens"] == 3 * 4 * 32 and record["heldout"]["chunks"] == 2
    assert math.isfinite(record["heldout"]["perplexity"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "llama" and model.config.vocab_size == 257
    assert model.config.train_seq_len == 32  # the pretraining window, the default evaluation length
    # a model cached before the window was recorded gets it from its record
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["train_seq_len"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert load_model_and_tokenizer(str(tmp_path / "m"))[0].config.train_seq_len == 32
    saved = json.loads((tmp_path / "m" / "stdlib_tiny_record.json").read_text())
    assert saved["metrics"]["heldout"]["perplexity"] == record["heldout"]["perplexity"]
    # a cached model is found (and not retrained) through RECON_PRUNE_CACHE
    monkeypatch.setenv("RECON_PRUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "m").rename(tmp_path / "cache" / "stdlib-tiny-v2")
    monkeypatch.setattr(
        "recon_prune.tiny_model.pretrain", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained"))
    )
    assert stdlib_tiny_path() == tmp_path / "cache" / "stdlib-tiny-v2"


def test_default_evaluation_protocol() -> None:
    from recon_prune.evaluate import default_eval_chunks, default_eval_seq_len

    assert default_eval_chunks("wikitext2") is None and default_eval_chunks("file:x.txt") is None  # whole text
    assert default_eval_chunks("c4") == 256 and default_eval_chunks("stdlib") == 64
    model = make_model("llama")  # context 64
    assert default_eval_seq_len(model) == 64
    # the model's context, as Wanda's seqlen = max_position_embeddings: OPT 2048, LLaMA-2 4096
    model.config.max_position_embeddings = 2048
    assert default_eval_seq_len(model) == 2048
    model.config.max_position_embeddings = 4096
    assert default_eval_seq_len(model) == 4096
    model.config.max_position_embeddings = 131072  # Llama-3.1-like context: capped at LLaMA-2's 4096
    assert default_eval_seq_len(model) == 4096
    model.config.train_seq_len = 256  # a recorded pretraining window wins
    assert default_eval_seq_len(model) == 256
    model.config.max_position_embeddings = 128  # ... but never beyond the context
    assert default_eval_seq_len(model) == 128


def test_recipe_keys_the_cache_and_the_window_is_recorded(tmp_path, monkeypatch) -> None:
    from recon_prune import tiny_model

    monkeypatch.setenv("RECON_PRUNE_CACHE", str(tmp_path))
    built = []

    def fake_pretrain(recipe, output_dir, **_kwargs):
        built.append(recipe)
        Path(output_dir).mkdir(parents=True)
        for name in ("config.json", "stdlib_tiny_record.json"):
            (Path(output_dir) / name).write_text("{}")

    monkeypatch.setattr(tiny_model, "pretrain", fake_pretrain)
    small = TinyRecipe(layers=1, steps=3)
    assert tiny_model.recipe_cache_name() == "stdlib-tiny-v2"
    assert tiny_model.recipe_cache_name(small) == tiny_model.recipe_cache_name(TinyRecipe(layers=1, steps=3))
    assert tiny_model.recipe_cache_name(small) != tiny_model.recipe_cache_name(TinyRecipe(layers=1, steps=4))
    default_path = stdlib_tiny_path()
    small_path = stdlib_tiny_path(recipe=small)
    assert default_path == tmp_path / "stdlib-tiny-v2" and small_path != default_path
    assert built == [TinyRecipe(), small]
    assert stdlib_tiny_path(recipe=small) == small_path and len(built) == 2  # cached now
    assert tiny_model.build_model(TinyRecipe(layers=1, train_seq_len=128)).config.train_seq_len == 128


def test_default_recipe_trains_in_float32_and_is_not_served_from_a_bf16_cache(tmp_path, monkeypatch) -> None:
    """The v1 recipe (bf16 autocast on CPU, ~8x slower there) must not be reused as the float32 default."""
    from recon_prune import tiny_model

    assert TinyRecipe().bf16 is False
    monkeypatch.setenv("RECON_PRUNE_CACHE", str(tmp_path))
    old = tmp_path / "stdlib-tiny-v1"  # a cache built by the bf16 recipe
    old.mkdir()
    for name in ("config.json", "stdlib_tiny_record.json"):
        (old / name).write_text("{}")
    built = []

    def fake_pretrain(recipe, output_dir, **_kwargs):
        built.append(recipe)
        Path(output_dir).mkdir(parents=True)
        for name in ("config.json", "stdlib_tiny_record.json"):
            (Path(output_dir) / name).write_text("{}")

    monkeypatch.setattr(tiny_model, "pretrain", fake_pretrain)
    assert stdlib_tiny_path() != old and built == [TinyRecipe()]
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "stdlib_tiny_record.json"]  # left alone
    assert tiny_model.recipe_cache_name(TinyRecipe(bf16=True)) != tiny_model.recipe_cache_name()


def test_pretraining_autocasts_only_when_the_recipe_asks(tmp_path, monkeypatch) -> None:
    from recon_prune import tiny_model

    seen: list[bool] = []
    build = tiny_model.build_model

    def recording_build(recipe):
        model = build(recipe)
        forward = model.forward

        def forward_recording_autocast(*args, **kwargs):
            if model.training:
                seen.append(torch.is_autocast_enabled("cpu"))
            return forward(*args, **kwargs)

        model.forward = forward_recording_autocast
        return model

    monkeypatch.setattr(tiny_model, "build_model", recording_build)
    small = dict(layers=1, hidden=32, heads=2, intermediate=64, context=64, train_seq_len=32, batch_size=2)
    small.update(steps=2, eval_chunks=1, warmup_steps=1)
    pretrain(TinyRecipe(**small), tmp_path / "fp32", show_progress=False)
    assert seen == [False, False]
    seen.clear()
    pretrain(TinyRecipe(**small, bf16=True), tmp_path / "bf16", show_progress=False)
    assert seen == [True, True]
