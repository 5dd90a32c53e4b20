"""Calibration sampling, sources, mixtures and self-generated text."""

from __future__ import annotations

import json

import pytest
import torch
from rp_models import byte_llama

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


def _force_eos_from_length(model: torch.nn.Module, length: int) -> None:
    """Make EOS overwhelmingly likely as the next token once a sequence holds ``length`` tokens."""

    def hook(module, args, kwargs, output):
        positions = kwargs.get("position_ids")  # generate with a cache feeds one token at its position
        seen = int(positions[0, -1]) + 1 if positions is not None else kwargs["input_ids"].shape[1]
        if seen >= length:
            output.logits[:, -1, 256] = 1e4
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def _is_window_of(window: list[int], text: list[int]) -> int | None:
    for start in range(len(text) - len(window) + 1):
        if text[start : start + len(window)] == window:
            return start
    return None


def test_self_generated_windows_are_random_cuts_of_longer_generated_texts() -> None:
    model = byte_llama()
    out = generate_self_calibration(model, byte_tokenizer(), 4, 12, seed=0, max_length=40, language_filter="none")
    assert out.ids.shape == (4, 12) and out.ids.dtype == torch.long and len(out.texts) == 4
    starts = [_is_window_of(row, text) for row, text in zip(out.ids.tolist(), out.texts, strict=True)]
    assert None not in starts  # every window is a slice of the text it was cut from
    assert all(len(text) > 12 for text in out.texts)  # texts run past the calibration length (EOS aside)
    assert any(start > 0 for start in starts)  # not always the prefix
    assert out.recipe["max_length"] == 40 and out.recipe["max_length_used"] == 40
    again = generate_self_calibration(model, byte_tokenizer(), 4, 12, seed=0, max_length=40, language_filter="none")
    assert torch.equal(out.ids, again.ids)
    capped = generate_self_calibration(model, byte_tokenizer(), 1, 12, seed=0, language_filter="none")
    assert capped.recipe["max_length"] == 2048 and capped.recipe["max_length_used"] == 64  # the model's context
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate_self_calibration(model, None, 1, 65)


def test_self_generated_texts_may_end_with_eos_and_short_ones_are_dropped() -> None:
    model = byte_llama()
    _force_eos_from_length(model, 20)  # token 21 of every text is EOS
    out = generate_self_calibration(model, byte_tokenizer(), 3, 12, seed=0, max_length=40, language_filter="none")
    assert out.ids.shape == (3, 12)
    assert all(len(text) == 21 and text[-1] == 256 for text in out.texts)  # EOS ends the text, not suppressed
    assert all(_is_window_of(row, text) is not None for row, text in zip(out.ids.tolist(), out.texts, strict=True))
    assert out.recipe["ended_with_eos"] == out.recipe["generated"] >= 3 and out.recipe["eos_allowed"] is True

    early = byte_llama()
    _force_eos_from_length(early, 8)  # every text has 9 tokens, shorter than the calibration length 12
    none_kept = generate_self_calibration(
        early, byte_tokenizer(), 2, 12, seed=0, max_length=40, language_filter="none", max_generated=5
    )
    assert none_kept.ids.shape == (0, 12) and none_kept.texts == []
    recipe = none_kept.recipe
    assert (recipe["generated"], recipe["dropped_short"], recipe["kept"], recipe["requested"]) == (5, 5, 0, 2)


def test_self_generated_prefix_filter_is_applied_and_recorded() -> None:
    model = byte_llama()
    tok = byte_tokenizer()
    verdicts: list[tuple[str, bool]] = []

    def detector(prefix: str) -> bool:  # a fake detector: accepts every other prefix it is shown
        verdicts.append((prefix, len(verdicts) % 2 == 0))
        return verdicts[-1][1]

    out = generate_self_calibration(model, tok, 3, 12, seed=0, max_length=24, keep_prefix=detector)
    assert len(out.texts) == 3
    accepted = [prefix for prefix, verdict in verdicts if verdict]
    assert all(tok.decode(text[:5]) in accepted for text in out.texts)  # only accepted prefixes were continued
    recipe = out.recipe
    assert recipe["language_filter"] == "custom" and recipe["prefixes_drawn"] == len(verdicts)
    assert recipe["prefixes_rejected"] == len(verdicts) - len(accepted) > 0
    with pytest.raises(ValueError, match="language_filter must be one of"):
        generate_self_calibration(model, tok, 1, 12, language_filter="french")


def test_self_generated_recipe_without_langdetect_names_the_fallback(monkeypatch, caplog) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "langdetect", None)  # as if the extra were not installed
    model = byte_llama()
    with caplog.at_level("WARNING", logger="recon_prune.calibration"):
        data = build_calibration("stdlib:2,self:2", tokenizer=byte_tokenizer(), nsamples=4, seq_len=12, model=model)
    assert "printable-letter fallback" in caplog.text
    assert data.num_real == 2 and data.generated_ids.shape == (2, 12)
    recipe = data.describe()["sources"][-1]["recipe"]
    assert recipe["language_filter"] == "printable-letter" and recipe["kept"] == 2 and recipe["max_length_used"] == 64
    with pytest.raises(Exception, match=r"recon-prune\[langdetect\]"):
        generate_self_calibration(model, byte_tokenizer(), 1, 12, language_filter="langdetect")


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
