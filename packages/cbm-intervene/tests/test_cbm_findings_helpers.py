"""The findings runner's curve read-outs (the runner itself is an experiment, not a test)."""

from __future__ import annotations

import math

import pytest

from cbm_intervene.findings import concepts_to_reach, error_at, passes_to_reach

CURVE = {
    "concepts_per_sample": [0.0, 4.0, 8.0, 12.0],
    "error": [0.5, 0.3, 0.1, 0.05],
    "forward_passes_per_sample": [0.0, 201.0, 201.0, 201.0],
}


def test_error_at_interpolates_between_steps():
    assert error_at(CURVE, 6.0) == pytest.approx(0.2)  # halfway between 0.3 (4) and 0.1 (8)
    assert error_at(CURVE, 40.0) == 0.05  # past the end: the last error


def test_concepts_and_passes_to_reach_a_target():
    assert concepts_to_reach(CURVE, 0.1) == 8.0
    assert passes_to_reach(CURVE, 0.1) == 201.0
    assert math.isinf(concepts_to_reach(CURVE, 0.01))
