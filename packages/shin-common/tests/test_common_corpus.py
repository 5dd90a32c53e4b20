import json
import shutil

import numpy as np
import pytest

from shin_common import TextCorpus, byte_blocks, stdlib_corpus
from shin_common.corpus import SPLITS, Document, stdlib_files


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def test_stdlib_splits_are_disjoint_and_cover_every_file(corpus):
    names = {split: {d.name for d in corpus.documents(split)} for split in SPLITS}
    assert all(names[s] for s in SPLITS)
    assert not (
        names["train"] & names["validation"] or names["train"] & names["test"] or names["validation"] & names["test"]
    )
    assert set().union(*names.values()) == {p.relative_to(corpus_root()).as_posix() for p in stdlib_files()}
    every = set().union(*names.values())
    assert "pydoc_data/topics.py" in every
    assert not any("/test/" in f"/{n}" or n.split("/")[-1].startswith("test_") for n in every)
    assert not any("site-packages" in n for n in every)


def corpus_root():
    import sysconfig
    from pathlib import Path

    return Path(sysconfig.get_paths()["stdlib"])


def test_stdlib_is_deterministic(corpus):
    fresh = TextCorpus.from_documents("python-stdlib", [d for s in SPLITS for d in corpus.documents(s)])
    assert fresh.checksum() == corpus.checksum()
    assert corpus.describe()["bytes"]["train"] > 5_000_000
    blocks = corpus.byte_blocks("validation", 128, max_blocks=10)
    assert blocks.shape == (10, 128) and blocks.dtype == np.int64
    assert bytes(blocks[0].astype(np.uint8).tolist()) == corpus.bytes("validation")[:128]


def test_split_of_a_document_does_not_depend_on_the_others():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(200)]
    full = TextCorpus.from_documents("a", docs)
    half = TextCorpus.from_documents("b", docs[:100])
    for split in SPLITS:
        assert {d.name for d in half.documents(split)} <= {d.name for d in full.documents(split)}
    assert full.checksum() != half.checksum()


def test_byte_blocks_with_stride_and_errors():
    blocks = byte_blocks(b"abcdefgh", 4, stride=2)
    assert blocks.tolist() == [list(b"abcd"), list(b"cdef"), list(b"efgh")]
    with pytest.raises(ValueError, match="fewer than one block of 16"):
        byte_blocks(b"short", 16)
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        byte_blocks(b"abc", 0)


def test_from_files_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    rows = [{"text": f"row {i}"} for i in range(50)]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    corpus = TextCorpus.from_files(tmp_path, validation_fraction=0.2, test_fraction=0.2)
    texts = sorted(d.text for s in SPLITS for d in corpus.documents(s))
    assert texts == sorted(["hello world", *(r["text"] for r in rows)])
    assert corpus.documents("test") and corpus.documents("validation")
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with a string field 'text'"):
        TextCorpus.from_files(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextCorpus.from_files(tmp_path / "missing.txt")


def test_bad_fractions():
    with pytest.raises(ValueError, match="validation_fraction must lie in"):
        TextCorpus.from_documents("x", [], validation_fraction=1.5)
    with pytest.raises(ValueError, match="nothing left to train on"):
        TextCorpus.from_documents("x", [], validation_fraction=0.5, test_fraction=0.5)


def _write_sample_folder(folder):
    (folder / "notes").mkdir(parents=True)
    for i in range(30):
        (folder / "notes" / f"n{i}.txt").write_text(f"note {i}")
    (folder / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(30)))


def _splits(corpus):
    return {s: [d.name for d in corpus.documents(s)] for s in SPLITS}


def test_from_files_does_not_depend_on_how_or_where_the_folder_is_named(tmp_path, monkeypatch):
    first = tmp_path / "first" / "data"
    _write_sample_folder(first)
    moved = tmp_path / "elsewhere" / "deeper" / "copy"
    moved.parent.mkdir(parents=True)
    shutil.copytree(first, moved)
    absolute = TextCorpus.from_files(first, validation_fraction=0.3, test_fraction=0.3)
    monkeypatch.chdir(tmp_path / "first")
    relative = TextCorpus.from_files("data", validation_fraction=0.3, test_fraction=0.3)
    dotted = TextCorpus.from_files("./data/../data", validation_fraction=0.3, test_fraction=0.3)
    elsewhere = TextCorpus.from_files(moved, validation_fraction=0.3, test_fraction=0.3)
    for other in (relative, dotted, elsewhere):
        assert _splits(other) == _splits(absolute)
        assert other.checksum() == absolute.checksum()
    names = {name for split in _splits(absolute).values() for name in split}
    assert names == {f"notes/n{i}.txt" for i in range(30)} | {f"rows.jsonl:{i}" for i in range(1, 31)}


def test_from_files_names_given_files_relative_to_their_common_folder(tmp_path, monkeypatch):
    _write_sample_folder(tmp_path / "data")
    listed = TextCorpus.from_files([tmp_path / "data" / "rows.jsonl", tmp_path / "data" / "notes" / "n1.txt"])
    names = {d.name for s in SPLITS for d in listed.documents(s)}
    assert names == {"notes/n1.txt"} | {f"rows.jsonl:{i}" for i in range(1, 31)}
    monkeypatch.chdir(tmp_path / "data" / "notes")
    single = TextCorpus.from_files("n1.txt")
    assert [d.name for s in SPLITS for d in single.documents(s)] == ["n1.txt"]
    assert single.checksum() == TextCorpus.from_files(tmp_path / "data" / "notes" / "n1.txt").checksum()
