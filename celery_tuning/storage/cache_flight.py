"""Single flight over L2: which caller computes a missing value, and how the others wait for it."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from typing import Any, Callable, Iterator, List, Optional, Protocol, Tuple

from ..errors import StorageError
from .cache import RedisCacheStore
from .cache_locks import LockRenewer, lock_renewer
from .process import PerProcess

__all__ = ["FOLLOWER_OUTAGE_GRACE", "Preflight", "SingleFlight"]

logger = logging.getLogger("celery_tuning.cache")

#: Seconds a follower keeps polling through Redis errors before it computes the value itself.
FOLLOWER_OUTAGE_GRACE = 2.0

#: Roles ``cache_lookup.lua`` answers: someone else computes (follow), this caller computes (lead).
FOLLOW, LEAD = 0, 1


class Preflight(Protocol):
    """A limiter decision the cache's miss path takes in its own round trip.

    ``keys`` and ``packed`` are ``gcra_acquire.lua``'s KEYS and ARGV[1]; ``settle`` receives
    the script's reply when a token was taken.
    """

    keys: List[str]
    packed: str

    def settle(self, reply: int) -> None: ...


class _Tokens:
    """Lock tokens unique per call across processes and hosts: uuid4 once per process, a counter after."""

    def __init__(self) -> None:
        self.base = uuid.uuid4().hex
        self.counter: Iterator[int] = itertools.count()

    def next(self) -> str:
        return f"{self.base}:{next(self.counter)}"


_tokens: PerProcess[_Tokens] = PerProcess(_Tokens, name="cache-lock-tokens")


class SingleFlight:
    """Elects one computing caller (the leader) per missing value across every worker.

    The lock is a lease of ``lease_ttl`` renewed by the leader's process (:class:`LockRenewer`)
    up to ``lock_timeout`` after the leader asked; followers poll the value, back off up to
    200 ms, ride out :data:`FOLLOWER_OUTAGE_GRACE` seconds of Redis errors, take the lead when
    the lock frees without a value, and give up after ``wait_timeout``. A leader's store (or
    :meth:`release`) frees the lock.
    """

    def __init__(self, store: RedisCacheStore, group: str, name: str, *, lock_timeout: float,
                 lease_ttl: float, wait_timeout: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, renewer: Optional[LockRenewer] = None) -> None:
        self.store = store
        self.group = group  # the keys' hash tag (one Cluster slot)
        self.name = name
        self.lock_timeout = lock_timeout
        # A lock that lives no longer than one lease needs no renewal: it is taken for lock_timeout.
        self.lease_ttl = min(lease_ttl, lock_timeout)
        self.lock_ms = max(1, int(self.lease_ttl * 1000))
        self.wait_timeout = wait_timeout
        self.clock = clock
        self.sleep = sleep
        self.renewer = renewer if renewer is not None else lock_renewer()

    @staticmethod
    def token() -> str:
        """A new lock token for one call."""
        return _tokens.get().next()

    def asked(self) -> float:
        """Now on the renewer's clock: pass it to :meth:`elect` taken before any round trip of
        the call, so the lock never outlives ``lock_timeout`` from when the call started asking."""
        return self.renewer.clock()

    def elect(self, value_key: str, lock_key: str, token: str, asked: float,
              preflight: Optional[Callable[[], Optional[Preflight]]] = None) -> Tuple[Optional[bytes], int]:
        """One round trip: (the value when there is one, else None; :data:`LEAD` or :data:`FOLLOW`).

        ``preflight`` may return a limiter decision to take in the same round trip when this
        caller is elected (see :meth:`RedisCacheStore.lookup_acquire`).

        Raises:
            StorageError: When Redis fails.
        """
        pending = preflight() if preflight is not None else None
        if pending is None:
            raw, _, role = self.store.lookup(value_key, lock_key, token, self.lock_ms)
        else:
            raw, _, role, reply = self.store.lookup_acquire(
                value_key, lock_key, token, self.lock_ms, pending.keys, pending.packed)
            if reply is not None:
                pending.settle(reply)
        if role == LEAD:
            self._lead(lock_key, token, asked)
        return raw, role

    def follow(self, value_key: str, lock_key: str, token: str,
               accept: Callable[[bytes], Tuple[bool, Any]], on_wait: Callable[[], None]) -> Tuple[bool, Any, bool]:
        """Wait for the leader's value: (found, value, outage).

        ``accept(raw)`` decodes a value found (False: not ours, this caller computes and
        overwrites it). Not found and no outage: this caller computes, holding the lock when it
        took the lead (``wait_timeout`` passed otherwise). ``outage``: Redis stayed away for
        :data:`FOLLOWER_OUTAGE_GRACE` seconds, compute without it.
        """
        deadline = self.clock() + self.wait_timeout
        delay = 0.005
        failing_since: Optional[float] = None
        role = FOLLOW
        while role == FOLLOW:  # a leader elsewhere is computing it
            if self.clock() >= deadline:
                logger.warning("cache %s: gave up waiting for another worker's result after %.1fs",
                               self.name, self.wait_timeout)
                break
            on_wait()
            self.sleep(delay)
            delay = min(delay * 2, 0.2)
            asked = self.renewer.clock()
            try:
                raw, _, role = self.store.lookup(value_key, lock_key, token, self.lock_ms)
            except StorageError:
                # Ride out a short outage (a failover, a paused or briefly unreachable server):
                # the leader is still computing, and running the body here at the first failed
                # poll doubles the work. A longer outage runs the body here, as a miss does.
                now = self.clock()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= FOLLOWER_OUTAGE_GRACE:
                    return False, None, True
                continue
            failing_since = None
            if role == LEAD:
                self._lead(lock_key, token, asked)
            if raw is not None:
                ok, value = accept(raw)
                if ok:
                    return True, value, False
                role = LEAD
        return False, None, False

    def _lead(self, lock_key: str, token: str, asked: float) -> None:
        """This caller took the lock: keep it alive while it computes, at most ``lock_timeout``
        from when it asked (the lock was taken after that, so it never outlives the bound)."""
        if self.lease_ttl < self.lock_timeout:
            self.renewer.hold(self.store.connector, self.group, lock_key, token, self.lock_ms,
                              asked + self.lock_timeout)

    def done(self, lock_key: str, token: str) -> None:
        """The leader finished computing: stop renewing. The store (or release) that follows
        frees the lock; a deferred store lands within the lease the last renewal gave, or the
        lock runs out and a follower computes."""
        self.renewer.drop(lock_key, token)

    def release(self, value_key: str, lock_key: str, token: str) -> None:
        """Free the lock without storing a value (the compute raised, or its result is not for
        caching): followers compute themselves or elect a new leader."""
        try:
            self.store.store(value_key, lock_key, b"", 0, token)
        except StorageError:
            pass  # the lock expires by itself
