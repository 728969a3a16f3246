"""GCRA (generic cell rate algorithm) math: the oracle the Lua scripts are tested against.

A bucket is one instant, ``allow_at`` in integer microseconds: the earliest time a request of
cost 1 is admitted (GCRA's theoretical arrival time less its burst tolerance). A request of
``cost`` is admitted at ``now`` when ``allow_at + (cost - 1) * interval <= now``, and moves
``allow_at`` on by ``cost * interval``; an idle bucket holds at most ``burst`` tokens, so
``allow_at`` never counts from earlier than ``now - (burst - 1) * interval``. That is a token
bucket refilled one token per ``interval``: over any span ``t`` at most ``burst + t / interval``
requests are admitted.

The bucket is anchored at its next admission, not at the time it is full again (the usual TAT),
because an adaptive limiter's interval shrinks while it recovers: a TAT keeps the burst as
``(burst - 1) * interval`` of time, which the shrinking interval turns into a later admission than
the one reported, and a pause into a pause ``(burst - 1)`` shrinks longer than asked.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

__all__ = ["GcraResult", "GcraState", "adaptive_interval", "gcra_acquire", "gcra_pause", "gcra_tokens",
           "interval_us", "recovered_factor"]


class GcraState(NamedTuple):
    """One bucket, two instants in µs (stored in Redis as ``"allow_at full_at"``)."""

    #: Earliest time a request of cost 1 is admitted.
    allow_at: int
    #: When the bucket is full again at the rate and burst it was last written with. From then
    #: on it counts as full whatever the rate became, so the Redis key may expire then (and a
    #: memory store, on its own clock, agrees with a Redis whose keys expire on real time).
    full_at: int


class GcraResult(NamedTuple):
    """Outcome of one acquire."""

    #: True when the request holds a slot (now, or reserved ``wait_us`` ahead).
    allowed: bool
    #: 0 when admitted now; when reserved, how far ahead the slot is; when
    #: refused, how long until the request would be admitted.
    wait_us: int
    #: State to store (None when nothing changes).
    new_state: Optional[GcraState]


def interval_us(period_seconds: float, amount: float) -> int:
    """Emission interval in whole microseconds (at least 1)."""
    return max(1, round(period_seconds * 1_000_000 / amount))


def _live(state: Optional[GcraState], now: int) -> Optional[GcraState]:
    return state if state is not None and state.full_at > now else None


def gcra_acquire(
    state: Optional[GcraState], now: int, interval: int, burst: int, cost: int = 1, reserve: int = -1
) -> GcraResult:
    """Decide one request.

    The wait is exact for cost 1. For a larger cost it is computed with the interval now; an
    adaptive limiter's interval only shrinks while it recovers, so the request may be admissible
    a little sooner, never later (a caller sleeping the wait is admitted).

    Arguments:
        state: Stored state, or None for an idle bucket.
        now: Current time in µs (the Redis server's clock in production).
        interval: Emission interval in µs.
        burst: Bucket capacity (requests admitted at once from idle).
        cost: Tokens this request takes.
        reserve: Largest wait in µs for which the request takes a future slot
            instead of being refused (-1: never reserve).

    Returns:
        The decision and the state to store.
    """
    state = _live(state, now)
    base = now - (burst - 1) * interval
    if state is not None and state.allow_at > base:
        base = state.allow_at
    # A cost above the burst in force (lowered at run time by an override) waits for a full bucket,
    # not for a moment that never comes; the rest of its cost is debt on later calls.
    wait = base + (min(cost, burst) - 1) * interval - now
    if wait > 0 and reserve < wait:
        return GcraResult(False, wait, None)
    allow_at = base + cost * interval
    return GcraResult(True, max(0, wait), GcraState(allow_at, allow_at + (burst - 1) * interval))


def gcra_pause(state: Optional[GcraState], now: int, interval: int, burst: int, pause: int) -> GcraState:
    """State after a pause of ``pause`` µs: one token exactly at ``now + pause``, then the rate.

    ``interval`` and ``burst`` (the rate now, after any adaptive decrease) only say when the
    bucket is full again.
    """
    state = _live(state, now)
    allow_at = now + pause
    if state is not None and state.allow_at > allow_at:
        allow_at = state.allow_at
    return GcraState(allow_at, allow_at + (burst - 1) * interval)


def gcra_tokens(allow_at: Optional[int], now: int, interval: int, burst: int) -> int:
    """Whole tokens a bucket holds at ``now`` (0 while it is paused or its slots are reserved ahead).

    ``allow_at``: a bucket that is not full yet (``full_at > now``), or None for a full one.
    """
    if allow_at is None:
        return burst
    return max(0, min(burst, (now - allow_at) // interval + 1))


def recovered_factor(factor: float, factor_at: int, recover: float, now: int) -> float:
    """An adaptive factor ``now``: ``factor`` set at ``factor_at``, grown by ``recover`` per µs since.

    Not capped at 1 (1 or more means fully recovered). A clock behind ``factor_at`` (another
    server's after a failover) counts as no time passed, so the factor never drops below its floor.
    """
    return factor + recover * max(0, now - factor_at)


def adaptive_interval(interval: int, factor: Optional[float], factor_at: Optional[int],
                      recover: float, now: int) -> int:
    """Emission interval under adaptive mode: the rate scaled by a factor recovering towards 1.

    Floored as ``math.floor(interval / factor)``, the Lua scripts' arithmetic: ``interval // factor``
    can differ by one (``1 // 0.1`` is 9).
    """
    if factor is None:
        return interval
    current = recovered_factor(factor, now if factor_at is None else factor_at, recover, now)
    return math.floor(interval / current) if current < 1 else interval
