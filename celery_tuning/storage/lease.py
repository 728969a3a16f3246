"""Where concurrency leases live: one interface, an in-process store and a Redis (Lua) store."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence

from .gcra import now_us
from .process import PerProcess
from .redis import RedisConnector

__all__ = ["LeaseGrant", "LeaseStore", "MemoryLeaseStore", "RedisLeaseStore"]


class LeaseGrant(NamedTuple):
    """One acquire's answer."""

    granted: bool
    #: Granted: leases held now, this one included. Refused: µs until enough leases expire
    #: for one slot to free up (0 if that is now).
    value: int


class LeaseStore(Protocol):
    """State behind a cluster-wide concurrency cap: a set of leases, each with an expiry (µs).

    A lease that is not renewed expires by itself; a renewal puts back a lease the store lost.
    """

    def acquire(self, key: str, cap: int, lease_id: str, ttl_us: int, now: Optional[int] = None) -> LeaseGrant: ...

    def renew(self, key: str, lease_ids: Sequence[str], ttl_us: int, now: Optional[int] = None) -> int: ...

    def release(self, key: str, lease_id: str) -> None: ...

    def count(self, key: str, now: Optional[int] = None) -> int: ...


def _free_in(expiries: List[int], cap: int, now: int) -> int:
    # More than cap leases can be live (re-created ones, see renew): a slot frees up only once
    # len - cap + 1 of them have expired, i.e. at the (len - cap)-th earliest expiry.
    ordered = sorted(expiries)
    index = min(max(len(ordered) - cap, 0), len(ordered) - 1)
    return max(0, ordered[index] - now) if ordered else 0


class _Leases:
    __slots__ = ("leases", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.leases: Dict[str, Dict[str, int]] = {}


class MemoryLeaseStore:
    """Leases in this process only: the local fallback and the reference for the contract tests.

    Mirrors ``lease_acquire.lua``, ``lease_renew.lua`` and ``lease_count.lua`` exactly (a
    differential test holds them together). A lease is live while its expiry is after now.
    A forked child starts empty: the parent's leases belong to the parent's holders.

    Arguments:
        clock: Returns now in integer microseconds (inject a manual clock in tests).
    """

    def __init__(self, clock: Callable[[], int] = now_us) -> None:
        self.clock = clock
        self._process: PerProcess[_Leases] = PerProcess(_Leases, name="memory leases")

    @property
    def _lock(self) -> threading.Lock:
        return self._process.get().lock

    @property
    def _leases(self) -> Dict[str, Dict[str, int]]:
        return self._process.get().leases

    def _live(self, key: str, now: int) -> Dict[str, int]:
        leases = {lease: exp for lease, exp in self._leases.get(key, {}).items() if exp > now}
        if leases:
            self._leases[key] = leases
        else:
            self._leases.pop(key, None)
        return leases

    def acquire(self, key: str, cap: int, lease_id: str, ttl_us: int, now: Optional[int] = None) -> LeaseGrant:
        with self._lock:
            now = self.clock() if now is None else now
            leases = self._live(key, now)
            held = len(leases)
            if held < cap:
                self._leases[key] = {**leases, lease_id: now + ttl_us}
                return LeaseGrant(True, held + 1)
            return LeaseGrant(False, _free_in(list(leases.values()), cap, now))

    def renew(self, key: str, lease_ids: Sequence[str], ttl_us: int, now: Optional[int] = None) -> int:
        with self._lock:
            now = self.clock() if now is None else now
            leases = self._live(key, now)
            recreated = sum(1 for lease in set(lease_ids) if lease not in leases)
            if lease_ids:
                self._leases[key] = {**leases, **{lease: now + ttl_us for lease in lease_ids}}
            return recreated

    def release(self, key: str, lease_id: str) -> None:
        with self._lock:
            leases = self._leases.get(key)
            if leases is not None:
                leases.pop(lease_id, None)
                if not leases:
                    del self._leases[key]

    def count(self, key: str, now: Optional[int] = None) -> int:
        with self._lock:
            return len(self._live(key, self.clock() if now is None else now))


class RedisLeaseStore:
    """Leases in a Redis sorted set (member = lease id, score = expiry in µs), one script per call.

    Raises :class:`~celery_tuning.errors.StorageError` when Redis fails; the limiter applies
    its Redis-error policy.
    """

    def __init__(self, connector: RedisConnector) -> None:
        self.connector = connector

    @staticmethod
    def _now(now: Optional[int]) -> Any:
        # '' lets the script read the server's TIME: every process then shares one clock.
        return "" if now is None else int(now)

    def acquire(self, key: str, cap: int, lease_id: str, ttl_us: int, now: Optional[int] = None) -> LeaseGrant:
        granted, value = self.connector.evalsha("lease_acquire", [key], [cap, lease_id, ttl_us, self._now(now)])
        return LeaseGrant(bool(int(granted)), int(value))

    def renew(self, key: str, lease_ids: Sequence[str], ttl_us: int, now: Optional[int] = None) -> int:
        if not lease_ids:
            return 0
        return int(self.connector.evalsha("lease_renew", [key], [ttl_us, self._now(now), *lease_ids]))

    def release(self, key: str, lease_id: str) -> None:
        self.connector.run(lambda c: c.zrem(key, lease_id), what="ZREM lease")

    def count(self, key: str, now: Optional[int] = None) -> int:
        return int(self.connector.evalsha("lease_count", [key], [self._now(now)]))
