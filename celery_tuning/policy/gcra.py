"""GCRA (generic cell rate algorithm) math: the oracle the Lua scripts are tested against.

One number per bucket, the theoretical arrival time (TAT), in integer microseconds. A
request of ``cost`` is admitted when, after adding ``cost * interval`` to the TAT, the
TAT is no more than ``burst * interval`` ahead of now. That is a token bucket holding
``burst`` tokens refilled one per ``interval``: over any span ``t`` at most
``burst + t / interval`` requests are admitted.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

__all__ = ["GcraResult", "gcra_acquire", "gcra_pause", "interval_us"]


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
    """TAT after a pause of ``pause`` µs: nothing is admitted before ``now + pause``."""
    base = now if tat is None or tat < now else tat
    return max(base, now + pause + (burst - 1) * interval)


def adaptive_interval(interval: int, factor: Optional[float], factor_at: Optional[int],
                      recover: float, now: int) -> int:
    """Emission interval under adaptive mode: the rate scaled by a factor recovering towards 1."""
    if factor is None:
        return interval
    current = factor + recover * (now - (factor_at if factor_at is not None else now))
    return int(interval // current) if current < 1 else interval
