"""Staleness schedules: how many updates behind each pipeline stage's gradient is.

In PipeDream-style asynchronous 1F1B without flushes (Narayanan et al., SOSP 2019), stage s of P
(s = 0 first) runs minibatch m's forward on its weights after ``m - tau_s`` updates, with
``tau_s = P - 1 - s``; the last stage is fresh (arXiv 2602.03515, Section 3). PipeDream-2BW
(Narayanan et al., ICML 2021) keeps a constant delay of 1. Everything in this package (emulator,
runtime, PipeDream-LR, stage-aware refresh) reads delays from one :func:`staleness_schedule`.
"""

from __future__ import annotations

from collections.abc import Sequence

SCHEDULES = ("async-1f1b", "2bw", "uniform", "none", "custom")


def staleness_schedule(
    kind: str, num_stages: int, *, delay: int | None = None, delays: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Per-stage delays ``(tau_0, ..., tau_{P-1})``.

    Args:
        kind: "async-1f1b" (``P-1-s``), "2bw" (1 everywhere), "uniform" (``delay`` everywhere),
            "none" (0 everywhere, synchronous), or "custom" (``delays`` as given).
        num_stages: P, at least 1.
        delay: the constant delay for "uniform".
        delays: the per-stage delays for "custom" (length P, non-negative ints).
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    if kind == "async-1f1b":
        return tuple(num_stages - 1 - s for s in range(num_stages))
    if kind == "2bw":
        return (1,) * num_stages
    if kind == "none":
        return (0,) * num_stages
    if kind == "uniform":
        if delay is None or isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"schedule 'uniform' needs a non-negative int delay, got {delay!r}")
        return (delay,) * num_stages
    if kind == "custom":
        if delays is None or len(delays) != num_stages:
            raise ValueError(f"schedule 'custom' needs {num_stages} delays (one per stage), got {delays!r}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in delays):
            raise ValueError(f"custom delays must be non-negative ints, got {list(delays)!r}")
        return tuple(delays)
    raise ValueError(f"unknown staleness schedule {kind!r}; expected one of {SCHEDULES}")
