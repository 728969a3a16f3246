"""The shared (L2) side of the result cache: Lua lookups with single flight, generations, pub/sub."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

from ..errors import StorageError
from .redis import REDIS_ERRORS, RedisConnector, hash_tag

__all__ = ["CacheKeys", "InvalidationListener", "RedisCacheStore"]

logger = logging.getLogger("celery_tuning.cache")

_LISTENER_ERRORS: Tuple[Type[BaseException], ...] = (*REDIS_ERRORS, StorageError)


class CacheKeys:
    """Key names of one task's cache; every key carries the task name as its hash tag."""

    def __init__(self, prefix: str, task_name: str, version: int) -> None:
        self.stem = hash_tag(prefix, "cache", task_name)
        self.version = version
        self.generation_key = f"{self.stem}:gen"
        self.channel = f"{prefix}:cache:invalidate"

    def value(self, generation: int, digest: str) -> str:
        return f"{self.stem}:v{self.version}:g{generation}:{digest}"

    def lock(self, generation: int, digest: str) -> str:
        return f"{self.value(generation, digest)}:lock"

    def pattern(self, generation: int) -> str:
        return f"{self.stem}:v{self.version}:g{generation}:*"


class RedisCacheStore:
    """L2 operations; each is one round trip. Raises :class:`StorageError` when Redis fails."""

    def __init__(self, connector: RedisConnector) -> None:
        self.connector = connector

    def lookup(self, value_key: str, lock_key: str, token: str, lock_ms: int) -> Tuple[Optional[bytes], int, int]:
        raw, pttl, role = self.connector.evalsha("cache_lookup", [value_key, lock_key], [token, lock_ms])
        return (raw if raw else None), int(pttl), int(role)

    @property
    def can_combine(self) -> bool:
        """Whether :meth:`lookup_acquire` may run (keys of two hash tags in one script: not on a Cluster)."""
        return self.connector.target.kind != "cluster"

    def lookup_acquire(self, value_key: str, lock_key: str, token: str, lock_ms: int,
                       bucket_keys: List[str], packed: str) -> Tuple[Optional[bytes], int, int, Optional[int]]:
        """:meth:`lookup` and, when this caller is elected leader, a limiter decision: one round trip.

        ``bucket_keys`` and ``packed`` are ``gcra_acquire.lua``'s KEYS and ARGV[1]. The fourth
        value is that script's reply, or None when no token was taken (value found, or a follower).
        """
        raw, pttl, role, decision = self.connector.evalsha(
            "cache_lookup_acquire", [value_key, lock_key, *bucket_keys], [token, lock_ms, packed])
        return (raw if raw else None), int(pttl), int(role), (None if decision is None else int(decision))

    def get(self, value_key: str) -> Optional[bytes]:
        """The raw value, or None (one plain GET: the hit path)."""
        raw = self.connector.get(value_key)
        return raw if raw else None

    def store(self, value_key: str, lock_key: str, raw: bytes, ttl_ms: int, token: str) -> None:
        self.connector.evalsha("cache_store", [value_key, lock_key], [raw, ttl_ms, token])

    def generation(self, key: str) -> int:
        raw = self.connector.run(lambda c: c.get(key), what="GET generation")
        try:
            return int(raw or 0)
        except (TypeError, ValueError):
            return 0

    def bump_generation(self, key: str) -> int:
        return int(self.connector.run(lambda c: c.incr(key), what="INCR generation"))

    def delete(self, key: str) -> None:
        self.connector.run(lambda c: c.delete(key), what="DEL cache entry")

    def publish(self, channel: str, message: Dict[str, Any]) -> None:
        self.connector.run(lambda c: c.publish(channel, json.dumps(message)), what="PUBLISH invalidation")

    def count(self, pattern: str, limit: int = 100_000) -> int:
        """Entries matching ``pattern`` (CLI only: SCAN is never on the hot path)."""

        def scan(c: Any) -> int:
            n = 0
            for _ in c.scan_iter(match=pattern, count=1000):
                n += 1
                if n >= limit:
                    break
            return n

        return int(self.connector.run(scan, what="SCAN cache entries"))


class InvalidationListener:
    """One thread per process that receives cache invalidations and hands them to handlers.

    Started lazily and again after ``fork()`` (threads do not survive it). Reconnects with
    backoff when Redis goes away; while it is away, local L1 entries simply live out their
    (short) TTL.
    """

    def __init__(self, connector: RedisConnector, channel: str) -> None:
        self.connector = connector
        self.channel = channel
        self._handlers: List[Callable[[Dict[str, Any]], None]] = []
        self._lock = threading.Lock()
        self._pid: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self.subscribed = threading.Event()

    def add(self, handler: Callable[[Dict[str, Any]], None]) -> None:
        with self._lock:
            if handler not in self._handlers:
                self._handlers.append(handler)
        self.ensure_running()

    def ensure_running(self) -> None:
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self.subscribed.clear()
            self._thread = threading.Thread(target=self._run, name="celery-tuning-invalidations", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = None
            try:
                pubsub = self.connector.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self.subscribed.set()
                backoff = 0.1
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self._dispatch(message.get("data"))
            except _LISTENER_ERRORS:
                self.subscribed.clear()
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a handler bug must not kill invalidations for good
                logger.exception("cache invalidation listener failed; restarting")
                time.sleep(backoff)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except REDIS_ERRORS:
                        pass

    def _dispatch(self, data: Any) -> None:
        try:
            message = json.loads(data)
        except (TypeError, ValueError):
            logger.warning("ignoring a foreign message on %s", self.channel)
            return
        if not isinstance(message, dict):
            return
        for handler in list(self._handlers):
            handler(message)


_listeners: Dict[Tuple[int, str], InvalidationListener] = {}
_listeners_lock = threading.Lock()


def listener_for(connector: RedisConnector, channel: str) -> InvalidationListener:
    """The process-wide listener for this connector and channel."""
    key = (id(connector), channel)
    with _listeners_lock:
        found = _listeners.get(key)
        if found is None:
            found = InvalidationListener(connector, channel)
            _listeners[key] = found
        return found
