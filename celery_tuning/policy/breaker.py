"""The shared circuit breaker's state machine, pure: no I/O, no clock (``now`` is passed in).

``MemoryBreakerStore`` drives it; ``storage/lua/breaker.lua`` mirrors it line for line, and the
contract and differential tests (tests/storage/test_breaker_*.py) hold the two together.

States: ``closed`` counts consecutive failures and opens at ``fail_max``; ``open`` refuses until
``reset_timeout`` has passed since it opened; then one caller at a time is granted the half-open
trial, a lease of ``lease`` µs owned by the caller's random token. Only the current holder's
verdict settles the trial, once: a failure re-opens, ``success_threshold`` good trials in a row
close. An expired lease still settles while no one else has taken the trial over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Optional, Protocol, Tuple

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "OPERATIONS", "BreakerLimits", "BreakerState", "Snapshot", "apply"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

#: Every operation of the state machine (``breaker.lua``'s ARGV[1]).
OPERATIONS = ("status", "failure", "success", "trial", "release", "open", "half-open", "close", "reset")


class Snapshot(NamedTuple):
    """A breaker's shared state as one operation left it."""

    state: str
    failures: int
    #: µs until the reset timeout elapses (open) or the trial lease ends (half-open).
    remaining_us: int
    #: Bumped on every state change; lets a process notice changes it did not make.
    version: int
    #: For a trial request: True when this caller runs the half-open trial.
    granted: bool = False


class BreakerLimits(Protocol):
    """The numbers the state machine needs (``storage.breaker.BreakerParams`` has them)."""

    @property
    def reset_timeout_us(self) -> int: ...

    @property
    def fail_max(self) -> int: ...

    @property
    def success_threshold(self) -> int: ...

    @property
    def lease_us(self) -> int: ...


@dataclass(frozen=True)
class BreakerState:
    """One breaker's stored fields (the hash ``breaker.lua`` keeps); times in µs."""

    state: str = CLOSED
    failures: int = 0
    #: Good trials so far in this half-open period.
    successes: int = 0
    opened_at: int = 0
    #: End of the running trial's lease (0: no trial is out).
    trial_until: int = 0
    version: int = 0
    #: Token of the caller holding the trial ('' when no one does).
    holder: str = ""

    def snapshot(self, limits: BreakerLimits, now: int, granted: bool = False) -> Snapshot:
        remaining = 0
        if self.state == OPEN:
            remaining = max(0, self.opened_at + limits.reset_timeout_us - now)
        elif self.state == HALF_OPEN:
            remaining = max(0, self.trial_until - now)
        return Snapshot(self.state, self.failures, remaining, self.version, granted)


INITIAL = BreakerState()


def _go(s: BreakerState, state: str, **fields: Any) -> BreakerState:
    """Move to ``state`` (a change bumps the version) and set ``fields``."""
    version = s.version + 1 if state != s.state else s.version
    return replace(s, state=state, version=version, **fields)


def apply(current: Optional[BreakerState], limits: BreakerLimits, op: str, token: str,
          now: int) -> Tuple[Optional[BreakerState], Snapshot]:
    """One operation on one breaker.

    Arguments:
        current: The stored state, None when nothing is stored.
        limits: The breaker's numbers.
        op: One of :data:`OPERATIONS`.
        token: For ``'trial'`` the caller's fresh random id (kept when granted); for
            ``'success'``, ``'failure'`` and ``'release'`` the id the caller was granted, ''
            when it runs no trial.
        now: The clock, in µs.

    Returns:
        (the state to store, None to delete it; what the caller sees).

    Raises:
        ValueError: For an unknown operation.
    """
    if op == "reset":
        return None, Snapshot(CLOSED, 0, 0, 0, False)
    s = INITIAL if current is None else current
    granted = False
    # An expired lease still settles while the token is unchanged (no one took the trial over).
    holds_trial = s.state == HALF_OPEN and token != "" and token == s.holder

    if op == "failure":
        s = replace(s, failures=s.failures + 1)
        if s.state == CLOSED and s.failures >= limits.fail_max:
            s = _go(s, OPEN, opened_at=now)
        elif holds_trial:
            s = _go(s, OPEN, opened_at=now, trial_until=0, successes=0, holder="")
    elif op == "success":
        if s.state == CLOSED:
            s = replace(s, failures=0)
        elif holds_trial:
            s = replace(s, successes=s.successes + 1, trial_until=0, holder="")
            if s.successes >= limits.success_threshold:
                s = _go(s, CLOSED, failures=0, successes=0)
    elif op == "trial":
        if s.state == OPEN and now >= s.opened_at + limits.reset_timeout_us:
            s = _go(s, HALF_OPEN, successes=0, trial_until=now + limits.lease_us, holder=token)
            granted = True
        elif s.state == HALF_OPEN and s.trial_until <= now:
            # no trial running (the last one finished, or its worker died and the lease ran out)
            s = replace(s, trial_until=now + limits.lease_us, holder=token)
            granted = True
    elif op == "release":
        # the trial ended without a verdict (control flow such as a deferral): let another run it
        if holds_trial:
            s = replace(s, trial_until=0, holder="")
    elif op == "half-open":
        s = _go(s, HALF_OPEN, successes=0, trial_until=0, holder="")
    elif op == "open":
        s = _go(s, OPEN, opened_at=now, trial_until=0, successes=0, holder="")
    elif op == "close":
        s = _go(s, CLOSED, failures=0, successes=0, trial_until=0, holder="")
    elif op != "status":
        raise ValueError(f"unknown breaker operation {op!r}")
    # 'status' stores nothing new, like the script (which writes nothing for it)
    return (current if op == "status" else s), s.snapshot(limits, now, granted)
