"""What a limited call does when its limit answers: pure rules, no I/O, no Celery.

The worker-side steps ask these functions and then act (sleep, re-publish, raise). Keeping the
rules here makes every branch testable in a microsecond and keeps the steps to plumbing.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

__all__ = [
    "ADMIT", "DEFER", "RAISE", "SLEEP", "WAIT", "Action", "concurrency_recheck", "rate_limit_action",
    "rate_limit_reserve", "rate_limit_wait_timeout", "when_open",
]

#: Run now.
ADMIT = "admit"
#: Sleep ``seconds`` in the worker, then run (the slot is ours).
SLEEP = "sleep"
#: Block in the limiter until admitted or ``timeout`` (``on_limit='wait'``, or no broker to defer through).
WAIT = "wait"
#: Re-publish for ``seconds`` from now; ``keep_slot``: the slot is reserved, come back for it.
DEFER = "defer"
#: Raise ``RateLimited`` (``on_limit='raise'``).
RAISE = "raise"

#: Longest countdown of a task waiting for a concurrency slot: slots free up when tasks end,
#: which the lease expiry times do not tell, so waiting tasks look again at a growing interval.
MAX_RECHECK = 10.0


class Action(NamedTuple):
    """What to do with a call, and for how long."""

    kind: str
    seconds: float = 0.0
    keep_slot: bool = False


_ADMIT = Action(ADMIT)
_WAIT = Action(WAIT)


def rate_limit_wait_timeout(on_limit: str, max_wait: float, max_defer: float) -> float:
    """How long a call that waits instead of deferring may wait."""
    return max_wait if on_limit == "wait" else max_defer


def rate_limit_reserve(on_limit: str, eager: bool, max_defer: float, wait_timeout: float) -> Optional[float]:
    """How far ahead a slot may be reserved for this call (None: never reserve, refuse instead).

    A call that blocks reserves a slot up to its wait (``wait_timeout``); a call that defers up
    to ``max_defer``.
    """
    if on_limit == "raise":
        return None
    if on_limit == "wait" or eager:
        return wait_timeout
    return max_defer


def rate_limit_action(on_limit: str, eager: bool, allowed: bool, wait: float, max_wait: float) -> Action:
    """The action for a limiter's decision (``allowed``, ``wait`` seconds) under ``on_limit``.

    ``eager``: the call has no message to re-publish (``apply()``, a direct call).
    """
    if on_limit == "raise":
        return _ADMIT if allowed else Action(RAISE, wait)
    if on_limit == "wait" or eager:
        return _WAIT
    if allowed and wait == 0:
        return _ADMIT
    if allowed and on_limit == "auto" and wait <= max_wait:
        return Action(SLEEP, wait)
    return Action(DEFER, wait, keep_slot=allowed)


def concurrency_recheck(retry_after: float, deferrals: int) -> float:
    """Countdown of a task refused a concurrency slot: 0.25 s growing by 1.5 per deferral, at most
    :data:`MAX_RECHECK` and never past when a slot is expected to free up."""
    return min(retry_after, 0.25 * 1.5 ** deferrals, MAX_RECHECK)


def when_open(has_fallback: bool, on_open: str, eager: bool) -> str:
    """What a call turned away by an open breaker does: ``fallback``, ``raise`` or ``defer``."""
    if has_fallback:
        return "fallback"
    if on_open == "fail" or eager:
        return "raise"
    return "defer"
