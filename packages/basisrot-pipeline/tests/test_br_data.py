"""Token batches: narrow storage (cheap to ship to every pipeline worker), int64 batches, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from basisrot_pipeline.data import TokenBatches


@pytest.mark.parametrize(("largest", "dtype"), [(255, torch.uint8), (300, torch.int16), (70_000, torch.int32)])
def test_blocks_are_stored_narrow_and_batches_are_int64(largest, dtype):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, largest + 1, size=(40, 9))
    blocks[0, 0] = largest
    batches = TokenBatches(blocks, batch_size=5, seed=1)
    assert batches.blocks.dtype == dtype
    x, y = batches.batch(3)
    assert x.dtype == y.dtype == torch.int64
    rows = np.random.default_rng([1, 3]).integers(0, 40, size=5)  # the documented draw for minibatch 3
    np.testing.assert_array_equal(x.numpy(), blocks[rows, :-1])
    np.testing.assert_array_equal(y.numpy(), blocks[rows, 1:])
    first_x, _ = next(batches.sequential(1))
    assert first_x.dtype == torch.int64 and int(first_x[0, 0]) == largest


def test_byte_blocks_pickle_at_one_byte_per_token():
    blocks = np.random.default_rng(0).integers(0, 256, size=(1000, 65))
    size = len(pickle.dumps(TokenBatches(blocks, batch_size=4)))
    assert size < 2 * blocks.size  # int64 storage would take 8 bytes per token


def test_negative_token_ids_are_refused():
    with pytest.raises(ValueError, match="token ids must be >= 0, got a minimum of -2"):
        TokenBatches(np.array([[1, -2, 3]]), batch_size=1)
