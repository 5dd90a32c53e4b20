"""Calibration sampling, sources, mixtures and self-generated text."""

from __future__ import annotations

import json

import pytest
import torch
from rp_models import make_model

from recon_prune.calibration import (
    CalibrationData,
    build_calibration,
    generate_self_calibration,
    parse_mixture,
    sample_sequences,
)
from recon_prune.tiny_model import byte_tokenizer


def test_sample_sequences_are_windows_of_the_text_and_reproducible() -> None:
    text = "".join(chr(97 + i % 26) for i in range(5000))
    a = sample_sequences(text, None, 4, 32, seed=0)
    b = sample_sequences(text, None, 4, 32, seed=0)
    assert torch.equal(a, b) and a.shape == (4, 32)
    raw = text.encode()
    for row in a.tolist():
        assert bytes(row) in raw
    assert not torch.equal(a, sample_sequences(text, None, 4, 32, seed=1))


def test_text_shorter_than_one_sequence_is_an_error(tmp_path) -> None:
    (tmp_path / "short.txt").write_text("too short", encoding="utf-8")
    with pytest.raises(ValueError, match="shorter than one sequence of 64"):
        build_calibration(f"file:{tmp_path / 'short.txt'}", tokenizer=None, nsamples=2, seq_len=64)


def test_local_text_and_jsonl_sources_and_mixture(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 50, encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as handle:
        for i in range(20):
            handle.write(json.dumps({"text": f"document number {i} " * 5}) + "\n")
    tok = byte_tokenizer()
    data = build_calibration(
        f"{tmp_path / 'a.txt'}:3,file:{tmp_path / 'b.jsonl'}:2", tokenizer=tok, nsamples=99, seq_len=16, seed=0
    )
    assert data.input_ids.shape == (5, 16) and data.generated_ids is None
    assert [s["count"] for s in data.sources] == [3, 2]
    assert all(b"alpha" in bytes(row) or b"beta" in bytes(row) for row in data.input_ids[:3].tolist())
    assert all(b"docu" in bytes(row) or b"number" in bytes(row) for row in data.input_ids[3:].tolist())


def test_stdlib_default_source() -> None:
    data = build_calibration("stdlib", tokenizer=None, nsamples=3, seq_len=64, seed=0)
    assert data.input_ids.shape == (3, 64) and int(data.input_ids.max()) < 256


def test_mixture_parsing_errors() -> None:
    assert parse_mixture("stdlib", 7) == [("stdlib", 7)]
    assert parse_mixture("stdlib:5,self:3", 7) == [("stdlib", 5), ("self", 3)]
    with pytest.raises(ValueError, match="give a count for every source"):
        parse_mixture("stdlib,self:3", 7)
    with pytest.raises(ValueError, match="unknown calibration source 'nonsense'"):
        build_calibration("nonsense", tokenizer=None, nsamples=1, seq_len=8)
    with pytest.raises(ValueError, match="no real text"):
        build_calibration("self:4", tokenizer=None, nsamples=4, seq_len=8, model=object())


def test_self_generated_calibration_shape_and_prefix() -> None:
    model = make_model("llama")
    ids = generate_self_calibration(model, None, 3, 12, seed=0)
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    assert torch.equal(ids, generate_self_calibration(model, None, 3, 12, seed=0))
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate_self_calibration(model, None, 1, 65)
    data = build_calibration("stdlib:2,self:2", tokenizer=None, nsamples=4, seq_len=12, model=model)
    assert data.num_real == 2 and data.generated_ids.shape == (2, 12)


def test_calibration_data_validation() -> None:
    with pytest.raises(ValueError, match="integer token ids"):
        CalibrationData(input_ids=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least one real sample"):
        CalibrationData(input_ids=torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="generated_ids have length 3"):
        CalibrationData(
            input_ids=torch.zeros(1, 4, dtype=torch.long), generated_ids=torch.zeros(1, 3, dtype=torch.long)
        )


def test_online_loaders_join_text_like_the_references(monkeypatch) -> None:
    """wikitext2 test is joined with blank lines; C4 evaluation uses the first 1100 validation docs."""
    import datasets

    from recon_prune.calibration import source_text

    calls = []

    def fake_load(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        rows = [f"doc {i}" for i in range(1200)]
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert source_text("wikitext2", "test").startswith("doc 0\n\ndoc 1\n\n")
    assert calls[-1][0] == "wikitext" and calls[-1][1] == ("wikitext-2-raw-v1",) and calls[-1][2]["split"] == "test"
    c4 = source_text("c4", "test")
    assert c4.split(" doc ")[-1] == "1099" and calls[-1][0] == "allenai/c4"


def test_ptb_loader_joins_sentences_with_spaces_like_the_references(monkeypatch) -> None:
    import datasets

    from recon_prune.calibration import source_text
    from recon_prune.evaluate import default_eval_chunks

    calls = []

    def fake_load(path, *args, **kwargs):
        calls.append((path, args, kwargs["split"]))
        return datasets.Dataset.from_dict({"sentence": [f"{kwargs['split']} sentence {i}" for i in range(3)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert source_text("ptb", "test") == "test sentence 0 test sentence 1 test sentence 2"
    assert calls[-1] == ("ptb_text_only", ("penn_treebank",), "test")
    assert source_text("ptb", "train").startswith("train sentence 0 train") and calls[-1][2] == "train"
    assert default_eval_chunks("ptb") is None  # the whole test set, as for wikitext2


def _byte_tokenizer_adding_bos():
    """The byte tokenizer with a BOS (id 257) that ``tokenizer(text)`` prepends, as LLaMA's does."""
    from tokenizers import processors

    from recon_prune.tiny_model import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok, bos


def test_heldout_stream_starts_with_what_the_tokenizer_puts_first(tmp_path) -> None:
    from recon_prune.calibration import leading_special_ids
    from recon_prune.evaluate import heldout_ids
    from recon_prune.tiny_model import byte_tokenizer

    text = "def f(x):\n    return x\n" * 3
    (tmp_path / "held.txt").write_text(text, encoding="utf-8")
    source = f"file:{tmp_path / 'held.txt'}"
    with_bos, bos = _byte_tokenizer_adding_bos()
    ids = heldout_ids(source, with_bos).tolist()
    assert ids[0] == bos and ids[1:] == list(text.encode("utf-8")) and leading_special_ids(with_bos) == [bos]
    assert ids == with_bos(text)["input_ids"]  # the references' one call with the tokenizer's defaults
    # a tokenizer that names a BOS but does not put it before text (GPT-2's) gets none, as in the references
    plain = byte_tokenizer()
    plain.add_special_tokens({"bos_token": "<s>"})
    assert plain.bos_token_id is not None and heldout_ids(source, plain).tolist() == list(text.encode("utf-8"))
    assert leading_special_ids(None) == []
