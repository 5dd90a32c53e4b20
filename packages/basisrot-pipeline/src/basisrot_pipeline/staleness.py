"""Staleness schedules: how many updates behind each pipeline stage's gradient is.

In PipeDream-style asynchronous 1F1B without flushes (Narayanan et al., SOSP 2019), stage s of P
(s = 0 first) runs minibatch m's forward on its weights after ``m - tau_s`` updates, with
``tau_s = P - 1 - s``; the last stage is fresh (arXiv 2602.03515, Section 3). PipeDream-2BW
(Narayanan et al., ICML 2021) keeps a constant delay of 1. Everything in this package (emulator,
runtime, PipeDream-LR, stage-aware refresh) reads delays from one :func:`staleness_schedule`.

A schedule is a function ``(num_stages, *, delay, delays) -> per-stage delays`` registered by name
in :data:`SCHEDULES`; ``delay`` (``TrainConfig.uniform_delay``) and ``delays``
(``TrainConfig.custom_delays``) are passed to every schedule, which uses them or not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shin_common import Registry

Schedule = Callable[..., tuple[int, ...]]

SCHEDULES: Registry[Schedule] = Registry("staleness schedule")


def async_1f1b(num_stages: int, **_: object) -> tuple[int, ...]:
    """PipeDream 1F1B without flush: stage s is ``P-1-s`` updates behind."""
    return tuple(num_stages - 1 - s for s in range(num_stages))


def two_buffered_weights(num_stages: int, **_: object) -> tuple[int, ...]:
    """PipeDream-2BW: every stage is one update behind."""
    return (1,) * num_stages


def uniform(num_stages: int, *, delay: int | None = None, **_: object) -> tuple[int, ...]:
    """The same ``delay`` on every stage."""
    if delay is None or isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise ValueError(f"schedule 'uniform' needs a non-negative int delay, got {delay!r}")
    return (delay,) * num_stages


def synchronous(num_stages: int, **_: object) -> tuple[int, ...]:
    """No staleness (a flushed pipeline, or no pipeline)."""
    return (0,) * num_stages


def custom(num_stages: int, *, delays: Sequence[int] | None = None, **_: object) -> tuple[int, ...]:
    """``delays`` as given, one per stage."""
    if delays is None or len(delays) != num_stages:
        raise ValueError(f"schedule 'custom' needs {num_stages} delays (one per stage), got {delays!r}")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in delays):
        raise ValueError(f"custom delays must be non-negative ints, got {list(delays)!r}")
    return tuple(delays)


SCHEDULES.add("async-1f1b", async_1f1b)
SCHEDULES.add("2bw", two_buffered_weights)
SCHEDULES.add("uniform", uniform)
SCHEDULES.add("none", synchronous)
SCHEDULES.add("custom", custom)


def staleness_schedule(
    kind: str, num_stages: int, *, delay: int | None = None, delays: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Per-stage delays ``(tau_0, ..., tau_{P-1})`` of the schedule registered as ``kind``.

    Args:
        kind: a name in :data:`SCHEDULES`: "async-1f1b" (``P-1-s``), "2bw" (1 everywhere), "uniform"
            (``delay`` everywhere), "none" (0 everywhere, synchronous), or "custom" (``delays`` as given).
        num_stages: P, at least 1.
        delay: the constant delay for "uniform".
        delays: the per-stage delays for "custom" (length P, non-negative ints).
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    schedule = SCHEDULES.get(kind)
    result = tuple(schedule(num_stages, delay=delay, delays=delays))
    if len(result) != num_stages or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in result):
        raise ValueError(f"staleness schedule {kind!r} gave {list(result)!r}, not {num_stages} non-negative ints")
    return result
