"""Where shared breaker state lives: one interface, an in-process store and a Redis (Lua) store."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Optional, Protocol, Tuple

from ..policy.breaker import CLOSED, HALF_OPEN, OPEN, BreakerState, Snapshot
from ..policy.breaker import apply as apply_breaker
from .gcra import now_us
from .keys import breaker_channel, breaker_key
from .pubsub import channel_listener
from .redis import RedisConnector

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "BreakerParams", "BreakerStore", "FailureCounts", "MemoryBreakerStore",
           "RedisBreakerStore", "Snapshot"]

logger = logging.getLogger("celery_tuning.breaker")


@dataclass(frozen=True)
class BreakerParams:
    """What every store operation needs to know about the breaker."""

    key: str
    reset_timeout_us: int
    fail_max: int
    success_threshold: int
    lease_us: int
    #: Pub/sub channel every recorded failure is announced on ('' for none).
    channel: str = ""

    @classmethod
    def make(cls, prefix: str, name: str, *, reset_timeout: float, fail_max: int,
             success_threshold: int, trial_timeout: float) -> BreakerParams:
        return cls(key=breaker_key(prefix, name), reset_timeout_us=int(reset_timeout * 1_000_000),
                   fail_max=fail_max, success_threshold=success_threshold,
                   lease_us=int(trial_timeout * 1_000_000), channel=breaker_channel(prefix))


class BreakerStore(Protocol):
    """State behind a shared breaker; ``op`` is one of the operations of ``breaker.lua``.

    ``token`` names a half-open trial: for ``'trial'`` a fresh random id the store keeps when it
    grants the trial; for ``'success'``, ``'failure'`` and ``'release'`` the id the caller was
    granted ('' when it runs no trial). Only the current holder settles the trial, once.
    """

    def apply(self, params: BreakerParams, op: str, token: str = "",
              now: Optional[int] = None) -> Snapshot: ...

    def failure_epoch(self, params: BreakerParams) -> Optional[Hashable]:
        """A value that changes whenever a failure may have been recorded since it was read.

        None when the store cannot tell (then any failure may be pending).
        """
        ...


class MemoryBreakerStore:
    """Breaker state in this process: the local fallback and the contract's reference.

    It keeps the fields and drives :mod:`celery_tuning.policy.breaker`'s state machine, which
    ``breaker.lua`` mirrors.

    Arguments:
        clock: Returns now in integer microseconds.
    """

    def __init__(self, clock: Callable[[], int] = now_us) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._state: Dict[str, BreakerState] = {}
        self._failures_seen: Dict[str, int] = {}

    def failure_epoch(self, params: BreakerParams) -> Optional[Hashable]:
        return self._failures_seen.get(params.key, 0)

    def apply(self, params: BreakerParams, op: str, token: str = "",
              now: Optional[int] = None) -> Snapshot:
        with self._lock:
            now = self.clock() if now is None else now
            stored, snap = apply_breaker(self._state.get(params.key), params, op, token, now)
            if stored is None:
                self._state.pop(params.key, None)
            else:
                self._state[params.key] = stored
            if op == "failure":
                self._failures_seen[params.key] = self._failures_seen.get(params.key, 0) + 1
            return snap


class FailureCounts:
    """How many breaker failures this process heard of, per breaker, on one failure channel.

    ``breaker.lua`` publishes the breaker's key on each failure; a process whose cached view
    shows no failures learns from this that its next success must reset the shared count.
    While the channel's listener is not subscribed (starting, reconnecting, after ``fork()``)
    it cannot tell: :meth:`epoch` answers None, and callers assume a failure may be pending.
    Each subscription is a new session, so failures missed while reconnecting cannot go unnoticed.
    """

    def __init__(self, connector: RedisConnector, channel: str) -> None:
        self.listener = channel_listener(connector, channel)
        self._heard: Dict[str, int] = {}
        self.listener.add(self._on_failure)
        self._wait_for_subscription()

    def _wait_for_subscription(self) -> None:
        # Until it is subscribed every success costs a round trip: wait for it once (about one
        # round trip), bounded so a Redis that is down costs at most a connect timeout.
        self.listener.ensure_running(wait=self.listener.connector.connect_timeout)

    def _on_failure(self, data: Any) -> None:
        key = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        self._heard[key] = self._heard.get(key, 0) + 1

    def epoch(self, key: str) -> Optional[Hashable]:
        """(subscription session, failures heard for ``key``), or None while not subscribed."""
        listener = self.listener
        if not listener.running():  # first use in a forked child
            self._wait_for_subscription()
        if not listener.subscribed.is_set():
            return None
        return (listener.session, self._heard.get(key, 0))


_counts: Dict[Tuple[int, str], FailureCounts] = {}
_counts_lock = threading.Lock()


def failure_counts(connector: RedisConnector, channel: str) -> FailureCounts:
    """The process-wide failure counts for this connector and channel."""
    key = (id(connector), channel)
    with _counts_lock:
        found = _counts.get(key)
        if found is None:
            found = _counts[key] = FailureCounts(connector, channel)
        return found


class RedisBreakerStore:
    """Breaker state in Redis: every operation is one ``EVALSHA`` of ``breaker.lua``.

    Raises :class:`~celery_tuning.errors.StorageError` when Redis fails.
    """

    def __init__(self, connector: RedisConnector) -> None:
        self.connector = connector
        self._counts: Dict[str, FailureCounts] = {}

    def failure_epoch(self, params: BreakerParams) -> Optional[Hashable]:
        if not params.channel:
            return None
        # read on every success: keep the process-wide registry's lock off that path
        counts = self._counts.get(params.channel)
        if counts is None:
            counts = self._counts[params.channel] = failure_counts(self.connector, params.channel)
        return counts.epoch(params.key)

    def apply(self, params: BreakerParams, op: str, token: str = "",
              now: Optional[int] = None) -> Snapshot:
        args: List[Any] = [op, params.reset_timeout_us, params.fail_max, params.success_threshold,
                           params.lease_us, token, params.channel]
        if now is not None:
            args.append(now)
        state, failures, remaining, version, granted = self.connector.evalsha("breaker", [params.key], args)
        if isinstance(state, bytes):
            state = state.decode()
        return Snapshot(str(state), int(failures), int(remaining), int(version), bool(granted))
