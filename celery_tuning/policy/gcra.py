"""GCRA (generic cell rate algorithm) math: the oracle the Lua scripts are tested against.

One number per bucket, the theoretical arrival time (TAT), in integer microseconds. A
request of ``cost`` is admitted when, after adding ``cost * interval`` to the TAT, the
TAT is no more than ``burst * interval`` ahead of now. That is a token bucket holding
``burst`` tokens refilled one per ``interval``: over any span ``t`` at most
``burst + t / interval`` requests are admitted.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

__all__ = ["GcraResult", "adaptive_interval", "gcra_acquire", "gcra_pause", "interval_us", "recovered_factor"]


class GcraResult(NamedTuple):
    """Outcome of one acquire."""

    #: True when the request holds a slot (now, or reserved ``wait_us`` ahead).
    allowed: bool
    #: 0 when admitted now; when reserved, how far ahead the slot is; when
    #: refused, how long until the request would be admitted.
    wait_us: int
    #: TAT to store (None when nothing changes).
    new_tat: Optional[int]


def interval_us(period_seconds: float, amount: float) -> int:
    """Emission interval in whole microseconds (at least 1)."""
    return max(1, round(period_seconds * 1_000_000 / amount))


def gcra_acquire(
    tat: Optional[int], now: int, interval: int, burst: int, cost: int = 1, reserve: int = -1
) -> GcraResult:
    """Decide one request.

    Arguments:
        tat: Stored TAT in µs, or None for an idle bucket.
        now: Current time in µs (the Redis server's clock in production).
        interval: Emission interval in µs.
        burst: Bucket capacity (requests admitted at once from idle).
        cost: Tokens this request takes.
        reserve: Largest wait in µs for which the request takes a future slot
            instead of being refused (-1: never reserve).

    Returns:
        The decision and the TAT to store.
    """
    base = now if tat is None or tat < now else tat
    new_tat = base + cost * interval
    wait = new_tat - burst * interval - now
    if wait <= 0:
        return GcraResult(True, 0, new_tat)
    if reserve >= wait:
        return GcraResult(True, wait, new_tat)
    return GcraResult(False, wait, None)


def gcra_pause(tat: Optional[int], now: int, interval: int, burst: int, pause: int) -> int:
    """TAT after a pause of ``pause`` µs: nothing is admitted before ``now + pause``.

    ``interval`` is the emission interval now, after any adaptive decrease: the stores scale it
    exactly as an acquire does. While an adaptive limiter recovers its interval only shrinks, and
    a shorter interval moves the admission time ``tat - (burst - 1) * interval`` later, so the
    pause holds whatever the burst; the first admission is late by ``(burst - 1)`` times the
    shrink.
    """
    base = now if tat is None or tat < now else tat
    return max(base, now + pause + (burst - 1) * interval)


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
