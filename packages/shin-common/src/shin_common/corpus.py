"""An offline, reproducible text corpus with disjoint train/validation/test splits by document.

The default corpus is the running interpreter's standard library: every ``.py`` source outside the
test suites and ``site-packages`` (code, comments and docstrings), plus ``pydoc_data/topics.py``,
the English reference prose. Nobody in this project wrote it, every CPython install has it, and
its checksum pins exactly which text a result was computed on (it changes with the Python version).

The same interface covers a user's own text/JSONL files (:meth:`TextCorpus.from_files`).

Splits are assigned per document by a hash of its name, so a document's split never depends on
which other documents exist, and no text is shared between splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "validation", "test")
_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _split_of(name: str, validation_fraction: float, test_fraction: float) -> str:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    for label, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{label} must lie in [0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction must be < 1 (nothing left to train on), "
            f"got {validation_fraction} + {test_fraction}"
        )


class TextCorpus:
    """Named documents in three disjoint splits.

    >>> corpus = stdlib_corpus()
    >>> blocks = corpus.byte_blocks("train", block_size=256)   # int64 array (n_blocks, 256)
    >>> corpus.describe()["checksum"]                           # recorded with every result
    """

    def __init__(self, name: str, splits: Mapping[str, Sequence[Document]]) -> None:
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(f"corpus {name!r} lacks split(s) {missing}; expected {list(SPLITS)}")
        self.name = name
        self._splits = {s: list(splits[s]) for s in SPLITS}
        self._checksum: str | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_documents(
        cls,
        name: str,
        documents: Iterable[Document],
        *,
        validation_fraction: float = 0.05,
        test_fraction: float = 0.05,
    ) -> TextCorpus:
        """Assign documents to splits by a hash of their names (stable under adding documents)."""
        _check_fractions(validation_fraction, test_fraction)
        splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
        seen: set[str] = set()
        for doc in sorted(documents, key=lambda d: d.name):
            if doc.name in seen:
                raise ValueError(f"duplicate document name {doc.name!r} in corpus {name!r}")
            seen.add(doc.name)
            splits[_split_of(doc.name, validation_fraction, test_fraction)].append(doc)
        return cls(name, splits)

    @classmethod
    def from_files(
        cls,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        text_field: str = "text",
        validation_fraction: float = 0.05,
        test_fraction: float = 0.05,
    ) -> TextCorpus:
        """Plain-text files (one document each) and JSONL files (one document per line).

        Directories are searched recursively for ``.txt``, ``.md`` and ``.jsonl`` files.

        Documents are named by their path relative to a root, POSIX-style (``notes/a.txt``, and
        ``rows.jsonl:7`` for line 7): the root is the given directory, or the folder holding the
        given file, or the deepest folder common to several given paths. So the splits and the
        checksum do not depend on whether a path was spelled relative or absolute, nor on where
        the folder lies.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        given = [Path(os.path.abspath(raw)) for raw in paths]
        files: list[Path] = []
        folders: list[Path] = []
        for path in given:
            if path.is_dir():
                files.extend(sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md", ".jsonl"}))
                folders.append(path)
            elif path.is_file():
                files.append(path)
                folders.append(path.parent)
            else:
                raise FileNotFoundError(f"corpus path {str(path)!r} does not exist")
        if not files:
            raise ValueError(f"no .txt, .md or .jsonl files found under {[str(p) for p in given]}")
        root = Path(os.path.commonpath(folders))
        documents = []
        for file in files:
            relative = file.relative_to(root).as_posix()
            if file.suffix == ".jsonl":
                with open(file, encoding="utf-8") as handle:
                    for number, line in enumerate(handle, start=1):
                        if not line.strip():
                            continue
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"{file}:{number}: not valid JSON ({exc.msg})") from exc
                        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                            raise ValueError(f"{file}:{number}: expected an object with a string field {text_field!r}")
                        documents.append(Document(f"{relative}:{number}", row[text_field]))
            else:
                documents.append(Document(relative, file.read_text(encoding="utf-8", errors="replace")))
        return cls.from_documents(
            "files:" + ",".join(sorted({str(p) for p in given}))[:200],
            documents,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
        )

    # ------------------------------------------------------------------ access
    def documents(self, split: str) -> list[Document]:
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return list(self._splits[split])

    def text(self, split: str, joiner: str = "\n\n") -> str:
        """All documents of ``split`` joined by ``joiner`` (the wikitext convention is "\\n\\n")."""
        return joiner.join(doc.text for doc in self.documents(split))

    def bytes(self, split: str, joiner: str = "\n\n") -> bytes:
        return self.text(split, joiner).encode("utf-8")

    def byte_blocks(
        self,
        split: str,
        block_size: int,
        *,
        max_blocks: int | None = None,
        stride: int | None = None,
    ) -> np.ndarray:
        """Byte-level tokens (0..255) of ``split`` cut into blocks: int64 array ``(n, block_size)``.

        ``stride`` defaults to ``block_size`` (non-overlapping); the ragged tail is dropped.
        """
        return byte_blocks(self.bytes(split), block_size, max_blocks=max_blocks, stride=stride)

    def checksum(self) -> str:
        """SHA-256 over every split's document names and texts."""
        if self._checksum is None:
            digest = hashlib.sha256()
            for split in SPLITS:
                for doc in self._splits[split]:
                    for part in (split, doc.name, doc.text):
                        encoded = part.encode("utf-8")
                        digest.update(len(encoded).to_bytes(8, "big"))
                        digest.update(encoded)
            self._checksum = digest.hexdigest()
        return self._checksum

    def describe(self) -> dict[str, Any]:
        """Name, checksum and per-split sizes, for results records."""
        return {
            "name": self.name,
            "checksum": self.checksum(),
            "documents": {s: len(self._splits[s]) for s in SPLITS},
            "bytes": {s: sum(len(d.text.encode("utf-8")) for d in self._splits[s]) for s in SPLITS},
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self._splits[s])}" for s in SPLITS)
        return f"TextCorpus({self.name!r}, {sizes})"


def byte_blocks(
    data: bytes | str, block_size: int, *, max_blocks: int | None = None, stride: int | None = None
) -> np.ndarray:
    """Cut UTF-8 bytes into ``(n, block_size)`` int64 token blocks."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    stride = block_size if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if max_blocks is not None and max_blocks < 0:
        raise ValueError(f"max_blocks must be >= 0, got {max_blocks!r}")
    raw = np.frombuffer(data.encode("utf-8") if isinstance(data, str) else data, dtype=np.uint8)
    if raw.size < block_size:
        raise ValueError(f"text has {raw.size} bytes, fewer than one block of {block_size}")
    n = (raw.size - block_size) // stride + 1
    if max_blocks is not None:
        n = min(n, max_blocks)
    starts = np.arange(n) * stride
    return raw[starts[:, None] + np.arange(block_size)[None, :]].astype(np.int64)


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The standard-library source files of the corpus, sorted (tests and site-packages excluded)."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in base.rglob("*.py"):
        parts = path.relative_to(base).parts
        if any(p in _TEST_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith("test_") or parts[-1] == "conftest.py":
            continue
        files.append(path)
    return sorted(files)


_STDLIB_CACHE: dict[tuple[str, float, float], TextCorpus] = {}


def stdlib_corpus(
    *,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    root: str | os.PathLike[str] | None = None,
) -> TextCorpus:
    """The running interpreter's standard library as a corpus (cached per process)."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    key = (str(base), validation_fraction, test_fraction)
    if key not in _STDLIB_CACHE:
        _check_fractions(validation_fraction, test_fraction)
        docs = [
            Document(path.relative_to(base).as_posix(), path.read_text(encoding="utf-8", errors="replace"))
            for path in stdlib_files(base)
        ]
        if not docs:
            raise FileNotFoundError(f"no standard-library sources found under {str(base)!r}")
        _STDLIB_CACHE[key] = TextCorpus.from_documents(
            "python-stdlib", docs, validation_fraction=validation_fraction, test_fraction=test_fraction
        )
    return _STDLIB_CACHE[key]
