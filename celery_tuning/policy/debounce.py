"""``@debounce``: the policy record and the rule for when a collapsed run is due (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["DEFAULT_KEY", "DebouncePolicy", "due_us"]

#: The key digest of a task debounced with no ``key=``: every call of the task collapses.
DEFAULT_KEY = "-"


@dataclass(frozen=True)
class DebouncePolicy:
    """A task's debounce: calls within ``delay`` collapse into one run with the latest arguments."""

    #: Seconds after the last call the run is due.
    delay: float
    #: Called with the task's arguments; calls whose keys differ do not collapse (None: the task alone).
    key: Optional[Callable[..., Any]] = None
    #: At most this many seconds after the first collapsed call (None: no bound).
    max_wait: Optional[float] = None


def due_us(now_us: int, first_us: int, delay_us: int, max_wait_us: Optional[int]) -> int:
    """When a pending run is due after a call at ``now_us``: ``delay`` after this call, but no
    later than ``max_wait`` after the run's first call (``first_us``). The ``debounce_call.lua``
    script computes the same."""
    due = now_us + delay_us
    if max_wait_us is not None:
        due = min(due, first_us + max_wait_us)
    return due
