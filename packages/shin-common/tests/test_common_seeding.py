import random

import numpy as np
import pytest
import torch

from shin_common import seed_everything


def draw():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_same_seed_same_draws_in_every_generator():
    assert seed_everything(123) == 123
    first = draw()
    seed_everything(123)
    assert draw() == first


def test_rank_offsets_the_seed():
    assert seed_everything(7, rank=3) == 10
    ranked = draw()
    seed_everything(10)
    assert draw() == ranked
    seed_everything(7, rank=0)
    assert draw() != ranked


@pytest.mark.parametrize("seed", [1.5, "3", None, True])
def test_non_int_seed_is_rejected(seed):
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_everything(seed)


def test_bad_rank_and_range():
    with pytest.raises(ValueError, match="rank must be a non-negative int, got -1"):
        seed_everything(0, rank=-1)
    with pytest.raises(ValueError, match=r"seed \+ rank must lie in"):
        seed_everything(2**32)
