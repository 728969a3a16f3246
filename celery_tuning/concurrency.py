"""``ConcurrencyLimiter``: at most N holders across all workers, with leases that outlive no one."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import defaultdict
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

from .errors import ConfigurationError, StorageError
from .storage.keys import key_digest, keyed_spot_name, lease_key
from .storage.lease import LeaseStore, MemoryLeaseStore, RedisLeaseStore
from .storage.process import PerProcess
from .storage.redis import RedisConnector

__all__ = ["ConcurrencyLimiter", "Lease"]

logger = logging.getLogger("celery_tuning.concurrency")

_ON_REDIS_ERROR = ("local", "allow")


class Lease(NamedTuple):
    """A held slot, or a refusal; ``id`` is None when the call holds nothing to give back."""

    id: Optional[str]
    #: Seconds until a slot is expected to free up, when not granted.
    retry_after: float = 0.0
    #: 'redis' (the shared store), 'local' (this process's fallback store while Redis is down)
    #: or 'allow' (Redis down and ``on_redis_error='allow'``: ran unlimited).
    source: str = "redis"

    @property
    def granted(self) -> bool:
        return self.retry_after == 0.0


class _Slot(NamedTuple):
    """Where a held lease lives: its lease set (the limit's, or a caller key's), the key's digest
    (None: the limit's shared set) and the cap it was granted under."""

    lease_key: str
    key_hash: Optional[str]
    cap: int


class _Holders:
    """One process's leases of one limit and the thread renewing them.

    Per process: the parent's leases belong to the parent's tasks (a child renewing, and so
    re-creating, them would hold slots after the parent released them), and a lock held by a
    parent thread at ``fork()`` would never be released in the child.
    """

    __slots__ = ("held", "lock", "renewer", "wake")

    def __init__(self) -> None:
        #: lease id -> where it is held (the limit's set, or a caller key's).
        self.held: Dict[str, _Slot] = {}
        self.lock = threading.Lock()
        self.renewer: Optional[threading.Thread] = None
        self.wake = threading.Event()


class ConcurrencyLimiter:
    """At most ``cap`` concurrent holders named ``name`` across every process.

    Each holder gets a lease in a :class:`~celery_tuning.storage.lease.LeaseStore`, renewed
    every ``ttl / 3`` seconds by one background thread per process while held. A worker killed
    with SIGKILL stops renewing, and its slot frees itself within ``ttl`` seconds. Every renewal
    re-creates the leases the store lost (FLUSHDB, a restart without persistence, a failover),
    so a running holder keeps counting against the cap.

    Arguments:
        name: Limit name (hash tag of its key).
        cap: Maximum concurrent holders.
        store: Where leases live: a :class:`~celery_tuning.storage.lease.RedisLeaseStore` (a
            :class:`~celery_tuning.storage.redis.RedisConnector` is wrapped in one) or a
            :class:`~celery_tuning.storage.lease.MemoryLeaseStore`.
        prefix: Key prefix.
        ttl: Lease lifetime in seconds without renewal.
        on_redis_error: ``'local'`` (apply the cap per process, counting this process's running
            holders, until Redis is back) or ``'allow'`` (run unlimited).
        per_key: Caps of listed caller keys (``str`` of the key -> cap); other keys get ``cap``.

    A call that passes ``key`` (a tenant) is limited per key: each key has its own lease set (the
    limit's key plus the key's digest, same hash tag), its own cap and, when parking, its own
    waiters, so one busy key never holds another back. A key's set expires with its last lease:
    idle keys cost nothing.
    """

    #: Standby slots releases promote for above the cap (``tuning_concurrency_standby``: 1 when on;
    #: the concurrency step sets it): a woken waiter holds on for the next slot in its worker.
    #: Never for a caller key's leases: per-key waiters have no standby.
    standby_slots: int = 0

    def __init__(self, name: str, cap: int, store: Union[LeaseStore, RedisConnector], *, prefix: str = "tuning",
                 ttl: float = 30.0, on_redis_error: str = "local",
                 per_key: Optional[Mapping[str, int]] = None) -> None:
        if on_redis_error not in _ON_REDIS_ERROR:
            raise ConfigurationError(
                f"concurrency limit {name!r}: on_redis_error={on_redis_error!r}; expected one of {_ON_REDIS_ERROR}")
        self.name = name
        self.cap = cap
        self.store: LeaseStore = RedisLeaseStore(store) if isinstance(store, RedisConnector) else store
        self.prefix = prefix
        self.key = lease_key(prefix, name)
        self.per_key: Dict[str, int] = {str(k): int(v) for k, v in (per_key or {}).items()}
        self.ttl_us = int(ttl * 1_000_000)
        self.ttl = ttl
        self.on_redis_error = on_redis_error
        self._fallback = MemoryLeaseStore()
        self._holders: PerProcess[_Holders] = PerProcess(_Holders, name=f"leases of {name}")
        self._warned = False
        #: (park store, spot) when waiters park (``tuning_defer_via="park"``): see :meth:`wake_waiters_with`.
        self._parking: Optional[Any] = None

    def wake_waiters_with(self, park_store: Any, spot: Any) -> None:
        """Give slots back through ``park_store.release_lease`` (one script removes the lease and
        moves the first parked waiter of ``spot`` to due), so a freed slot wakes a waiter at once.
        A caller key's lease wakes a waiter of that key (:meth:`spot_name`)."""
        self._parking = (park_store, spot)

    def cap_for(self, key: Any = None) -> int:
        """The cap of caller ``key`` (its ``per_key`` entry, else the limit's); None: the limit's."""
        return self.cap if key is None else self.per_key.get(str(key), self.cap)

    def _slot(self, key: Any) -> Tuple[str, Optional[str], int]:
        """(lease set, key digest, cap) of caller ``key``."""
        if key is None:
            return self.key, None, self.cap
        key_hash = key_digest(key)
        return lease_key(self.prefix, self.name, key_hash), key_hash, self.per_key.get(str(key), self.cap)

    def spot_name(self, key: Any = None) -> str:
        """The parking spot name of the waiters of caller ``key`` (the limit's name without a key)."""
        return keyed_spot_name(self.name, None if key is None else key_digest(key))

    def __repr__(self) -> str:
        return f"<ConcurrencyLimiter {self.name!r} cap={self.cap} ttl={self.ttl}>"

    def _storage_failed(self, exc: StorageError) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("concurrency limit %r: tuning Redis failed (%s); applying on_redis_error=%r "
                           "until it is back", self.name, exc, self.on_redis_error)

    def _store_answered(self) -> None:
        if self._warned:
            self._warned = False
            logger.info("concurrency limit %r: tuning Redis is back", self.name)

    @property
    def _lock(self) -> threading.Lock:
        """The lock of this process's holders (a forked child gets its own)."""
        return self._holders.get().lock

    def _held_now(self, where: Optional[str] = None) -> List[str]:
        holders = self._holders.get()
        with holders.lock:
            return sorted(lease for lease, slot in holders.held.items() if where is None or slot.lease_key == where)

    def acquire(self, key: Any = None) -> Lease:
        """Try to take a slot now (one round trip); ``key``: the caller key (a tenant), limited at
        its own cap. Never raises because Redis is down."""
        lease_id = uuid.uuid4().hex
        where, key_hash, cap = self._slot(key)
        try:
            grant = self.store.acquire(where, cap, lease_id, self.ttl_us)
            source = "redis"
            self._store_answered()
        except StorageError as exc:
            self._storage_failed(exc)
            if self.on_redis_error == "allow":
                return Lease(None, 0.0, "allow")
            # The local cap counts every holder still running here, those Redis admitted included.
            self._fallback.renew(where, self._held_now(where), self.ttl_us)
            grant = self._fallback.acquire(where, cap, lease_id, self.ttl_us)
            source = "local"
        if not grant.granted:
            return Lease(None, max(grant.value / 1_000_000, 0.05), source)
        holders = self._holders.get()
        with holders.lock:
            holders.held[lease_id] = _Slot(where, key_hash, cap)
        self._ensure_renewer(holders)
        return Lease(lease_id, 0.0, source)

    def release(self, lease: Lease) -> None:
        """Give the slot back (best effort: an unreleased lease expires by itself)."""
        if lease.id is None:
            return
        holders = self._holders.get()
        with holders.lock:
            slot = holders.held.pop(lease.id, None) or _Slot(self.key, None, self.cap)
        where = slot.lease_key
        self._fallback.release(where, lease.id)
        try:
            parking = self._parking
            if parking is not None and lease.source == "redis":
                spot = parking[1]
                if slot.key_hash:
                    spot = type(spot)(spot.reason, keyed_spot_name(spot.name, slot.key_hash))
                # A caller key's waiters have no standby (see ConcurrencyStep): promote to its cap.
                parking[0].release_lease(spot, where, lease.id, slot.cap, 0 if slot.key_hash else self.standby_slots)
            else:
                self.store.release(where, lease.id)
        except StorageError:
            pass

    def held(self, key: Any = None) -> int:
        """Leases held in the store right now, by every process (expired ones excluded); ``key``:
        those of one caller key.

        Raises:
            StorageError: When Redis fails.
        """
        return self.store.count(self._slot(key)[0])

    def renew(self) -> int:
        """Renew every lease this process holds, re-creating those the store lost.

        The renewer thread calls this every ``ttl / 3`` seconds; it never raises because Redis
        is down (then the leases are renewed in the local fallback store).

        Returns:
            How many leases were missing from the store and put back.
        """
        holders = self._holders.get()
        with holders.lock:
            snapshot = dict(holders.held)
        if not snapshot:
            return 0
        by_set: Dict[str, List[str]] = defaultdict(list)  # one round trip per lease set held
        for lease, slot in sorted(snapshot.items()):
            by_set[slot.lease_key].append(lease)
        store: LeaseStore = self.store
        recreated = 0
        try:
            for where, leases in by_set.items():
                recreated += store.renew(where, leases, self.ttl_us)
            self._store_answered()
        except StorageError as exc:
            self._storage_failed(exc)
            store, recreated = self._fallback, 0
            for where, leases in by_set.items():
                store.renew(where, leases, self.ttl_us)
        # A lease released while its renewal was on the way has just been put back: take it out
        # again, or it would hold a slot nobody uses for a whole TTL. (release() drops it from
        # _held before its own removal, so whichever of the two removals comes last wins.)
        with holders.lock:
            gone = [(lease, slot.lease_key) for lease, slot in snapshot.items() if lease not in holders.held]
        for lease, where in gone:
            try:
                store.release(where, lease)
            except StorageError:
                pass
        if recreated:
            logger.warning("concurrency limit %r: re-created %d lease(s) the store had lost (flushed, restarted, "
                           "failed over, or renewed too late); running tasks count against the cap again",
                           self.name, recreated)
        return recreated

    def _ensure_renewer(self, holders: _Holders) -> None:
        renewer = holders.renewer
        if renewer is not None and renewer.is_alive():
            return
        with holders.lock:
            if holders.renewer is not None and holders.renewer.is_alive():
                return
            holders.renewer = threading.Thread(target=self._renew_loop, args=(holders.wake,),
                                               name=f"celery-tuning-lease-{self.name}", daemon=True)
            holders.renewer.start()

    def _renew_loop(self, wake: threading.Event) -> None:
        interval = max(self.ttl / 3, 0.05)
        while True:
            wake.wait(interval)
            try:
                self.renew()
            except Exception:  # the renewer must outlive any one bad round
                logger.exception("concurrency limit %r: lease renewal failed", self.name)
