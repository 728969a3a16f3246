"""Where shared breaker state lives: one interface, an in-process store and a Redis (Lua) store."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol

from .gcra import now_us
from .redis import RedisConnector, hash_tag

__all__ = ["BreakerParams", "BreakerStore", "MemoryBreakerStore", "RedisBreakerStore", "Snapshot"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class Snapshot(NamedTuple):
    """A breaker's shared state as one store call saw it."""

    state: str
    failures: int
    #: µs until the reset timeout elapses (open) or the trial lease ends (half-open).
    remaining_us: int
    #: Bumped on every state change; lets a process notice changes it did not make.
    version: int
    #: For a trial request: True when this caller runs the half-open trial.
    granted: bool = False


@dataclass(frozen=True)
class BreakerParams:
    """What every store operation needs to know about the breaker."""

    key: str
    reset_timeout_us: int
    fail_max: int
    success_threshold: int
    lease_us: int

    @classmethod
    def make(cls, prefix: str, name: str, *, reset_timeout: float, fail_max: int,
             success_threshold: int, trial_timeout: float) -> BreakerParams:
        return cls(key=hash_tag(prefix, "cb", name), reset_timeout_us=int(reset_timeout * 1_000_000),
                   fail_max=fail_max, success_threshold=success_threshold,
                   lease_us=int(trial_timeout * 1_000_000))


class BreakerStore(Protocol):
    """State behind a shared breaker; ``op`` is one of the operations of ``breaker.lua``."""

    def apply(self, params: BreakerParams, op: str, holds_trial: bool = False,
              now: Optional[int] = None) -> Snapshot: ...


class MemoryBreakerStore:
    """Breaker state in this process: the local fallback and the contract's reference.

    Arguments:
        clock: Returns now in integer microseconds.
    """

    def __init__(self, clock: Callable[[], int] = now_us) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._state: Dict[str, Dict[str, Any]] = {}

    def apply(self, params: BreakerParams, op: str, holds_trial: bool = False,
              now: Optional[int] = None) -> Snapshot:
        with self._lock:
            now = self.clock() if now is None else now
            if op == "reset":
                self._state.pop(params.key, None)
                return Snapshot(CLOSED, 0, 0, 0, False)
            h = self._state.setdefault(params.key, {"state": CLOSED, "failures": 0, "successes": 0,
                                                    "opened_at": 0, "trial_until": 0, "version": 0})
            granted = False

            def go(new_state: str) -> None:
                h["state"] = new_state
                h["version"] += 1

            if op == "failure":
                h["failures"] += 1
                if h["state"] == CLOSED and h["failures"] >= params.fail_max:
                    go(OPEN)
                    h["opened_at"] = now
                elif h["state"] == HALF_OPEN and holds_trial:
                    go(OPEN)
                    h.update(opened_at=now, trial_until=0, successes=0)
            elif op == "success":
                if h["state"] == CLOSED:
                    h["failures"] = 0
                elif h["state"] == HALF_OPEN and holds_trial:
                    h["successes"] += 1
                    h["trial_until"] = 0
                    if h["successes"] >= params.success_threshold:
                        go(CLOSED)
                        h.update(failures=0, successes=0)
            elif op == "trial":
                if h["state"] == OPEN and now >= h["opened_at"] + params.reset_timeout_us:
                    go(HALF_OPEN)
                    h.update(successes=0, trial_until=now + params.lease_us)
                    granted = True
                elif h["state"] == HALF_OPEN and h["trial_until"] <= now:
                    h["trial_until"] = now + params.lease_us
                    granted = True
            elif op == "release":
                if h["state"] == HALF_OPEN and holds_trial:
                    h["trial_until"] = 0
            elif op == "half-open":
                if h["state"] != HALF_OPEN:
                    go(HALF_OPEN)
                h.update(successes=0, trial_until=0)
            elif op == "open":
                if h["state"] != OPEN:
                    go(OPEN)
                h.update(opened_at=now, trial_until=0, successes=0)
            elif op == "close":
                if h["state"] != CLOSED:
                    go(CLOSED)
                h.update(failures=0, successes=0, trial_until=0)
            elif op != "status":
                raise ValueError(f"unknown breaker operation {op!r}")
            remaining = 0
            if h["state"] == OPEN:
                remaining = max(0, h["opened_at"] + params.reset_timeout_us - now)
            elif h["state"] == HALF_OPEN:
                remaining = max(0, h["trial_until"] - now)
            return Snapshot(h["state"], h["failures"], remaining, h["version"], granted)


class RedisBreakerStore:
    """Breaker state in Redis: every operation is one ``EVALSHA`` of ``breaker.lua``.

    Raises :class:`~celery_tuning.errors.StorageError` when Redis fails.
    """

    def __init__(self, connector: RedisConnector) -> None:
        self.connector = connector

    def apply(self, params: BreakerParams, op: str, holds_trial: bool = False,
              now: Optional[int] = None) -> Snapshot:
        args: List[Any] = [op, params.reset_timeout_us, params.fail_max, params.success_threshold,
                           params.lease_us, 1 if holds_trial else 0]
        if now is not None:
            args.append(now)
        state, failures, remaining, version, granted = self.connector.evalsha("breaker", [params.key], args)
        if isinstance(state, bytes):
            state = state.decode()
        return Snapshot(str(state), int(failures), int(remaining), int(version), bool(granted))
