"""Parsing of rate strings such as ``"20/s"``, ``"1200/m"`` and ``"5000/h"``."""

from __future__ import annotations

import re
from typing import NamedTuple, Union

__all__ = ["Rate", "parse_rate"]

_UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")

ACCEPTED = "a rate like '20/s', '1200/m' or '5000/h'"

#: The fastest rate a limiter keeps: its emission interval is counted in whole microseconds.
MAX_PER_SECOND = 1_000_000


class Rate(NamedTuple):
    """A number of admissions per period of seconds."""

    amount: float
    period: float

    @property
    def per_second(self) -> float:
        return self.amount / self.period

    @property
    def interval(self) -> float:
        """Seconds between two admissions at a steady pace (GCRA's emission interval)."""
        return self.period / self.amount

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.period)
        n = int(self.amount) if float(self.amount).is_integer() else self.amount
        return f"{n}/{unit}" if unit else f"{n}/{self.period}s"


def parse_rate(value: Union[str, Rate]) -> Rate:
    """Parse ``"N/s"``, ``"N/m"`` or ``"N/h"`` into a :class:`Rate`.

    Arguments:
        value: The rate string (a :class:`Rate` is returned unchanged).

    Returns:
        The parsed rate.

    Raises:
        ValueError: With a message saying what is accepted; callers prefix it
            with the setting or argument name.
    """
    if isinstance(value, Rate):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not {ACCEPTED}")
    match = _RATE_RE.match(value.lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"{value!r} is not {ACCEPTED}")
    count = float(match.group(1))
    if count <= 0:
        raise ValueError(f"{value!r} must admit more than zero calls per period")
    rate = Rate(count, _UNITS[match.group(2)])
    if rate.per_second > MAX_PER_SECOND:
        raise ValueError(f"{value!r} is above {MAX_PER_SECOND:,}/s, the most a limiter keeps (one call per µs)")
    return rate
