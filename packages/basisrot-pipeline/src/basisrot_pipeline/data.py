"""Byte-level language-modelling batches, deterministic per minibatch index.

Minibatch ``m`` is drawn from a generator seeded with ``(seed, m)``, so every pipeline process
(and a resumed run) reads the same batch for the same ``m`` without sharing any state.
"""

from __future__ import annotations

import numpy as np
import torch

from shin_common import stdlib_corpus


def _storage_dtype(blocks: np.ndarray) -> type:
    largest = int(blocks.max()) if blocks.size else 0
    for dtype in (np.uint8, np.int16, np.int32):
        if largest <= np.iinfo(dtype).max:
            return dtype
    return np.int64


class TokenBatches:
    """Random minibatches of ``(inputs, targets)`` from token blocks of length ``block_size + 1``."""

    def __init__(self, blocks: np.ndarray, *, batch_size: int, seed: int = 0) -> None:
        if blocks.ndim != 2 or blocks.shape[1] < 2:
            raise ValueError(f"blocks must be a 2-D array with rows of length >= 2, got shape {blocks.shape}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if blocks.size and blocks.min() < 0:
            raise ValueError(f"token ids must be >= 0, got a minimum of {blocks.min()}")
        # Stored in the narrowest integer type that holds the ids (uint8 for bytes): the blocks travel
        # inside every spawned pipeline worker's arguments; batches are widened to int64 on the way out.
        self.blocks = torch.from_numpy(np.ascontiguousarray(blocks, dtype=_storage_dtype(blocks)))
        self.batch_size = batch_size
        self.seed = seed

    @property
    def block_size(self) -> int:
        return self.blocks.shape[1] - 1

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        rows = torch.from_numpy(rng.integers(0, self.blocks.shape[0], size=self.batch_size))
        chosen = self.blocks[rows].long()
        return chosen[:, :-1], chosen[:, 1:]

    def sequential(self, max_batches: int | None = None):
        """Non-overlapping batches in order (for evaluation)."""
        count = self.blocks.shape[0] // self.batch_size
        if max_batches is not None:
            count = min(count, max_batches)
        for b in range(count):
            chosen = self.blocks[b * self.batch_size : (b + 1) * self.batch_size].long()
            yield chosen[:, :-1], chosen[:, 1:]


def stdlib_batches(
    *, split: str, block_size: int, batch_size: int, seed: int = 0, max_blocks: int | None = None
) -> tuple[TokenBatches, dict]:
    """Batches of the shin-common standard-library corpus, and the corpus description for records."""
    corpus = stdlib_corpus()
    blocks = corpus.byte_blocks(split, block_size + 1, max_blocks=max_blocks)
    return TokenBatches(blocks, batch_size=batch_size, seed=seed), corpus.describe()


def random_batches(*, vocab_size: int, block_size: int, batch_size: int, num_blocks: int = 64, seed: int = 0):
    """Uniform random tokens (for tests and smoke runs that must not read the corpus)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, vocab_size, size=(num_blocks, block_size + 1))
    return TokenBatches(blocks, batch_size=batch_size, seed=seed)
