"""The shared (L2) side of the result cache: Lua lookups with single flight, generations, pub/sub.

The lock renewer lives in :mod:`.cache_locks` and the write-behind writer in :mod:`.cache_writer`;
both are re-exported here, where callers have always imported them from."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import StorageError
from .cache_locks import LockRenewer, lock_renewer
from .cache_writer import StoreWriter, existing_writer, flush_writers, writer_for
from .keys import cache_generation_key, cache_invalidation_channel, cache_lock_key, cache_stem, cache_value_key
from .pubsub import ChannelListener, channel_listener
from .redis import RedisConnector

__all__ = [
    "CacheKeys",
    "LockRenewer",
    "RedisCacheStore",
    "StoreWriter",
    "decode_invalidation",
    "flush_writers",
    "glob_escape",
    "lock_renewer",
]

logger = logging.getLogger("celery_tuning.cache")


class CacheKeys:
    """Key names of one task's cache; every key carries the task name as its hash tag."""

    def __init__(self, prefix: str, task_name: str, version: int) -> None:
        self.stem = cache_stem(prefix, task_name)
        self.version = version
        self.generation_key = cache_generation_key(prefix, task_name)
        self.channel = cache_invalidation_channel(prefix)

    def value(self, generation: int, digest: str) -> str:
        return cache_value_key(self.stem, self.version, generation, digest)

    def lock(self, generation: int, digest: str) -> str:
        return cache_lock_key(self.stem, self.version, generation, digest)

    def pattern(self, generation: int) -> str:
        """SCAN MATCH pattern of one generation's entries (the task name taken literally)."""
        return f"{glob_escape(self.stem)}:v{self.version}:g{generation}:*"


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob (SCAN MATCH, KEYS): a task name may hold ``*?[]\\``."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisCacheStore:
    """L2 operations; each is one round trip. Raises :class:`StorageError` when Redis fails."""

    def __init__(self, connector: RedisConnector) -> None:
        self.connector = connector

    def lookup(self, value_key: str, lock_key: str, token: str, lock_ms: int) -> Tuple[Optional[bytes], int, int]:
        raw, pttl, role = self._carrying("cache_lookup", [value_key, lock_key], [token, lock_ms])
        return (raw if raw else None), int(pttl), int(role)

    def _carrying(self, name: str, keys: List[Any], args: List[Any]) -> Any:
        """Run script ``name``, carrying this process's queued stores ahead of it in the same round
        trip (see :meth:`StoreWriter.take`): a busy worker's deferred stores cost no trip of their own."""
        writer = existing_writer(self.connector)
        batch = writer.take() if writer is not None else None
        if not batch:
            return self.connector.evalsha(name, keys, args)
        assert writer is not None
        try:
            reply, error = self.connector.evalsha_carrying(
                name, keys, args, "cache_store", [(job_keys, job_args) for job_keys, job_args, _ in batch])
        except StorageError as exc:
            writer.taken(batch, exc)
            raise
        writer.taken(batch, error)
        return reply

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
        raw, pttl, role, decision = self._carrying(
            "cache_lookup_acquire", [value_key, lock_key, *bucket_keys], [token, lock_ms, packed])
        return (raw if raw else None), int(pttl), int(role), (None if decision is None else int(decision))

    def get(self, value_key: str) -> Optional[bytes]:
        """The raw value, or None (one plain GET: the hit path)."""
        raw = self.connector.get(value_key)
        return raw if raw else None

    def store(self, value_key: str, lock_key: str, raw: bytes, ttl_ms: int, token: str) -> None:
        self.connector.evalsha("cache_store", [value_key, lock_key], [raw, ttl_ms, token])

    def store_later(self, value_key: str, lock_key: str, raw: bytes, ttl_ms: int, token: str,
                    on_error: Callable[[StorageError], None]) -> None:
        """:meth:`store` through this process's :class:`StoreWriter`: the caller does not wait.

        When the writer is backed up (Redis slow or away), stores right here instead, so memory
        stays bounded; a failure then raises :class:`StorageError` as :meth:`store` does.
        """
        if not writer_for(self.connector).submit([value_key, lock_key], [raw, ttl_ms, token], on_error):
            self.store(value_key, lock_key, raw, ttl_ms, token)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until this process's deferred stores reached Redis (or failed); False on timeout."""
        writer = existing_writer(self.connector)  # none yet: nothing was deferred, create none
        return True if writer is None else writer.flush(timeout)

    def generation(self, key: str) -> int:
        """The current generation; a missing key (never set, evicted, lost) starts a new one."""
        return int(self.connector.evalsha("cache_generation", [key], ["0"]))

    def bump_generation(self, key: str) -> int:
        return int(self.connector.evalsha("cache_generation", [key], ["1"]))

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


def decode_invalidation(data: Any) -> Optional[Dict[str, Any]]:
    """An invalidation message as published by :meth:`RedisCacheStore.publish`; None for anything
    else (the channel is open to every client)."""
    try:
        message = json.loads(data)
    except (TypeError, ValueError):
        return None
    return message if isinstance(message, dict) else None


def listener_for(connector: RedisConnector, channel: str) -> ChannelListener:
    """The process-wide listener on the cache's invalidation channel."""
    return channel_listener(connector, channel)
