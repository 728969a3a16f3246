"""``ConcurrencyLimiter``: at most N holders across all workers, with leases that outlive no one."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import List, NamedTuple, Optional, Set

from .errors import StorageError
from .storage.redis import RedisConnector, hash_tag

__all__ = ["ConcurrencyLimiter", "Lease"]

logger = logging.getLogger("celery_tuning.concurrency")


class Lease(NamedTuple):
    """A held slot; ``id`` is None when Redis was unreachable and the call ran unlimited."""

    id: Optional[str]
    #: Seconds until a slot is expected to free up, when not granted.
    retry_after: float = 0.0

    @property
    def granted(self) -> bool:
        return self.retry_after == 0.0


class ConcurrencyLimiter:
    """At most ``cap`` concurrent holders named ``name`` across every process.

    Each holder gets a lease in a Redis sorted set, renewed every ``ttl / 3`` seconds by one
    background thread per process while held. A worker killed with SIGKILL stops renewing, and
    its slot frees itself within ``ttl`` seconds.

    Arguments:
        name: Limit name (hash tag of its key).
        cap: Maximum concurrent holders.
        connector: The tuning Redis.
        prefix: Key prefix.
        ttl: Lease lifetime in seconds without renewal.
    """

    def __init__(self, name: str, cap: int, connector: RedisConnector, *, prefix: str = "tuning",
                 ttl: float = 30.0) -> None:
        self.name = name
        self.cap = cap
        self.connector = connector
        self.key = hash_tag(prefix, "cc", name)
        self.ttl_us = int(ttl * 1_000_000)
        self.ttl = ttl
        self._held: Set[str] = set()
        self._lock = threading.Lock()
        self._renewer: Optional[threading.Thread] = None
        self._renewer_pid: Optional[int] = None
        self._wake = threading.Event()
        self._warned = False

    def acquire(self) -> Lease:
        """Try to take a slot now (one round trip). Never raises because Redis is down."""
        lease_id = uuid.uuid4().hex
        try:
            granted, value = self.connector.evalsha("lease_acquire", [self.key], [self.cap, lease_id, self.ttl_us])
        except StorageError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("concurrency limit %r: tuning Redis failed (%s); running unlimited until it is back",
                               self.name, exc)
            return Lease(None)
        self._warned = False
        if not int(granted):
            return Lease(None, max(int(value) / 1_000_000, 0.05))
        with self._lock:
            self._held.add(lease_id)
        self._ensure_renewer()
        return Lease(lease_id)

    def release(self, lease: Lease) -> None:
        """Give the slot back (best effort: an unreleased lease expires by itself)."""
        if lease.id is None:
            return
        with self._lock:
            self._held.discard(lease.id)
        try:
            self.connector.run(lambda c: c.zrem(self.key, lease.id), what="ZREM lease")
        except StorageError:
            pass

    def held(self) -> int:
        """Leases held in Redis right now, by every process (expired ones excluded)."""
        import time

        now = int(time.time() * 1_000_000)
        return int(self.connector.run(lambda c: c.zcount(self.key, now, "+inf"), what="ZCOUNT leases"))

    def _ensure_renewer(self) -> None:
        if self._renewer is not None and self._renewer.is_alive() and self._renewer_pid == os.getpid():
            return
        with self._lock:
            if self._renewer is not None and self._renewer.is_alive() and self._renewer_pid == os.getpid():
                return
            self._renewer_pid = os.getpid()
            self._renewer = threading.Thread(target=self._renew_loop, name=f"celery-tuning-lease-{self.name}",
                                             daemon=True)
            self._renewer.start()

    def _renew_loop(self) -> None:
        interval = max(self.ttl / 3, 0.05)
        while True:
            self._wake.wait(interval)
            with self._lock:
                held: List[str] = sorted(self._held)
            if not held:
                continue
            try:
                renewed = self.connector.evalsha("lease_renew", [self.key], [self.ttl_us, *held])
            except StorageError:
                continue  # Redis is away: leases may lapse; tasks keep running
            if int(renewed) < len(held):
                logger.warning("concurrency limit %r: %d lease(s) expired before renewal", self.name,
                               len(held) - int(renewed))

