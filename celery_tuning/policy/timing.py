"""Queue-wait, run and end-to-end arithmetic, and SLA level evaluation."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

__all__ = ["Timings", "breach", "compute_timings"]


class Timings(NamedTuple):
    """Seconds measured for one task attempt."""

    #: Start minus max(this attempt's publish time, ETA); None if unstamped.
    wait: Optional[float]
    run: float
    #: Finish minus the first publish time; None if unstamped.
    total: Optional[float]
    #: True when the wait came out negative (publisher clock ahead) and was clamped.
    clamped: bool = False


def compute_timings(
    *,
    sent_at: Optional[float],
    published_at: Optional[float],
    eta: Optional[float],
    started_wall: float,
    finished_wall: float,
    run: float,
) -> Timings:
    """Combine publisher wall-clock stamps with worker measurements.

    A delayed task (countdown, ETA, deferral) only starts "waiting" at its ETA:
    the delay was asked for and is not queueing.
    """
    wait: Optional[float] = None
    clamped = False
    if sent_at is not None:
        ready = max(sent_at, eta) if eta is not None else sent_at
        wait = started_wall - ready
        if wait < 0:
            wait, clamped = 0.0, True
    total = None
    if published_at is not None:
        total = max(0.0, finished_wall - published_at)
    return Timings(wait=wait, run=max(0.0, run), total=total, clamped=clamped)


def breach(
    measured: Optional[float], warning: Optional[float], critical: Optional[float]
) -> Optional[Tuple[str, float]]:
    """The most severe level crossed, as ``(level, threshold)``, or None."""
    if measured is None:
        return None
    if critical is not None and measured > critical:
        return ("critical", critical)
    if warning is not None and measured > warning:
        return ("warning", warning)
    return None
