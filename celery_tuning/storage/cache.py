"""The shared (L2) side of the result cache: Lua lookups with single flight, generations, pub/sub."""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Tuple, Type

from ..errors import StorageError
from .pubsub import ChannelListener, channel_listener
from .redis import REDIS_ERRORS, RedisConnector, hash_tag

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
        writer = _writers.get(id(self.connector))  # none yet: nothing was deferred, create none
        return True if writer is None or writer.connector is not self.connector else writer.flush(timeout)

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


class _HeldLock(NamedTuple):
    connector: RedisConnector
    group: str  # the key's hash tag: on a Cluster, locks of one group share a slot
    key: str
    token: str
    lease_ms: int
    deadline: float  # LockRenewer.clock(): the lock's life ends here whatever happens


class LockRenewer:
    """Keeps this process's single-flight locks alive while their leaders compute.

    A lock is taken for one short lease, not for the longest a leader may take: a leader
    killed mid-compute (OOM, SIGKILL, a lost host) stops renewing, and its followers take over
    within one lease. A live leader keeps its lock for as long as it computes, up to its
    ``deadline`` (``lock_timeout`` after it asked), where the lock runs out whatever happens:
    the last renewal sets no more than what is left.

    One thread per process renews every held lock each third of a lease, in one round trip per
    connector (one per hash tag on a Cluster, where the keys live in different slots), through
    ``cache_renew.lua``, which extends a lock only while it holds our token. A lock lost
    meanwhile (a stall longer than the lease, a flush, a failover) is dropped, not taken back: a
    follower polls every 200 ms at most, so it has taken the lock or will before any renewal
    could, and taking it back could revive a lock its leader has just released.

    The thread waits on a condition while nothing is held: a process that holds no lock sends
    nothing, and when it does hold one the renewal borrows the pool's idle connection (the
    task's own thread is busy computing), so no second pool connection is needed. Started
    lazily and again after ``fork()``; a child forgets the locks its parent held (they are
    the parent's to renew).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._held: Dict[Tuple[str, str], _HeldLock] = {}
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None
        self._warned = False

    def hold(self, connector: RedisConnector, group: str, key: str, token: str, lease_ms: int,
             deadline: float) -> None:
        """Renew ``key`` (held with ``token`` for ``lease_ms``) until :meth:`drop` or ``deadline``."""
        if self._pid != os.getpid():
            with _renewer_lock:
                if self._pid != os.getpid():
                    self._reset()  # fork() without the at-fork hook: the parent's locks are not ours
                    self._pid = os.getpid()
        with self._cond:
            self._held[(key, token)] = _HeldLock(connector, group, key, token, lease_ms, deadline)
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name="celery-tuning-cache-locks", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # out of threads, or at interpreter exit: the lock lives one lease
                    del self._held[(key, token)]
                    return
                self._thread = thread
            self._cond.notify()

    def drop(self, key: str, token: str) -> None:
        """Stop renewing ``key`` (its leader is done; the store or release that follows frees it)."""
        with self._cond:
            self._held.pop((key, token), None)

    def held(self) -> int:
        """Locks this process renews now."""
        with self._cond:
            return len(self._held)

    def renew_once(self) -> int:
        """Renew every held lock now; returns how many were still ours. Never raises because Redis
        is away: the locks then run out one lease after their last renewal, as a dead leader's do."""
        now = self.clock()
        with self._cond:
            held = list(self._held.values())
            for lock in held:
                if lock.deadline <= now:
                    del self._held[(lock.key, lock.token)]  # its last renewal set no more than this
        calls: Dict[Tuple[int, str], List[_HeldLock]] = {}
        for lock in held:
            if lock.deadline > now:
                group = lock.group if lock.connector.target.kind == "cluster" else ""
                calls.setdefault((id(lock.connector), group), []).append(lock)
        renewed = 0
        for locks in calls.values():
            args: List[Any] = []
            for lock in locks:
                args += [lock.token, max(1, min(lock.lease_ms, int((lock.deadline - now) * 1000)))]
            try:
                replies = locks[0].connector.evalsha("cache_renew", [lock.key for lock in locks], args)
            except StorageError as exc:
                if not self._warned:
                    self._warned = True
                    logger.warning("cache: could not renew single-flight locks (%s); followers may compute "
                                   "again once they run out", exc)
                continue
            self._warned = False
            with self._cond:
                for lock, ours in zip(locks, replies):
                    if int(ours):
                        renewed += 1
                    else:
                        self._held.pop((lock.key, lock.token), None)
        return renewed

    def _run(self) -> None:
        last = self.clock()
        while True:
            with self._cond:
                while True:
                    if not self._held:
                        self._cond.wait()
                        last = self.clock()
                        continue
                    interval = max(min(lock.lease_ms for lock in self._held.values()) / 3000, 0.05)
                    remaining = last + interval - self.clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            try:
                self.renew_once()
            except Exception:  # the renewer must outlive any one bad round
                logger.exception("cache: single-flight lock renewal failed")
            last = self.clock()


_renewer_lock = threading.Lock()
_renewer = LockRenewer()


def lock_renewer() -> LockRenewer:
    """This process's :class:`LockRenewer`."""
    return _renewer


def listener_for(connector: RedisConnector, channel: str) -> ChannelListener:
    """The process-wide listener on the cache's invalidation channel."""
    return channel_listener(connector, channel)


#: One deferred store: cache_store.lua's KEYS and ARGV, and who hears of a failure.
_Job = Tuple[List[str], List[Any], Callable[[StorageError], None]]


class StoreWriter:
    """Writes the cache's stores from one background thread per process, pipelined in batches.

    A task whose result was computed on a cache miss need not wait for Redis to take the value:
    the value is in L1 already, and the single-flight lock stays held until the store lands, so
    a caller elsewhere waits for the value instead of computing it again. Stores queued while
    the thread is busy, or within ``linger`` seconds of the first, go out together in one
    round trip: in a busy worker that cuts the client CPU per store to a fraction of a round
    trip's, and delays a value's arrival in Redis by at most ``linger``.

    Bounded in jobs and bytes: beyond either, :meth:`submit` answers False and the caller
    stores synchronously. Started lazily and again after ``fork()``; a child drops the jobs it
    inherited (its parent writes them). Flushed at exit by ``atexit`` and, in workers, by the
    ``worker_process_shutdown`` and ``worker_shutdown`` signals.
    """

    def __init__(self, connector: RedisConnector, *, max_jobs: int = 10_000, max_bytes: int = 64 * 2**20,
                 max_batch: int = 256, linger: float = 0.002) -> None:
        self.connector = connector
        self.linger = linger
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self._pid: Optional[int] = None
        self._start()

    def _start(self) -> None:
        self._cond = threading.Condition()
        self._jobs: Deque[_Job] = deque()
        self._bytes = 0
        self._submitted = 0
        self._done = 0
        self._thread: Optional[threading.Thread] = None

    def _ensure_running(self) -> None:
        pid = os.getpid()
        if self._pid != pid:
            with _writers_lock:
                if self._pid != pid:
                    self._start()  # a fresh lock: the parent's may have been held at fork()
                    self._pid = pid
        if self._thread is None or not self._thread.is_alive():
            with self._cond:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="celery-tuning-cache-writer",
                                                    daemon=True)
                    self._thread.start()

    def submit(self, keys: List[str], args: List[Any], on_error: Callable[[StorageError], None]) -> bool:
        """Queue one ``cache_store`` call; False when full or when no thread can be started
        (the caller then stores itself)."""
        try:
            self._ensure_running()
        except RuntimeError:  # "can't start new thread": out of threads, or at interpreter exit
            return False
        size = len(args[0])
        with self._cond:
            if len(self._jobs) >= self.max_jobs or self._bytes + size > self.max_bytes:
                return False
            self._jobs.append((keys, args, on_error))
            self._bytes += size
            self._submitted += 1
            self._cond.notify()
        return True

    def pending(self) -> int:
        """Stores queued or being written."""
        return self._submitted - self._done

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every store submitted so far was written (or failed); False on timeout."""
        if self._pid != os.getpid():
            return True  # nothing was submitted in this process
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            while self._done < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._jobs:
                    cond.wait()
            if self.linger:
                time.sleep(self.linger)  # let a few more stores join this batch (CPU per store drops)
            with cond:
                batch = [self._jobs.popleft() for _ in range(min(len(self._jobs), self.max_batch))]
                self._bytes -= sum(len(args[0]) for _, args, _ in batch)
            try:
                self.connector.evalsha_many("cache_store", [(keys, args) for keys, args, _ in batch])
            except StorageError as exc:
                for _, _, on_error in batch:
                    try:
                        on_error(exc)
                    except Exception:  # a reporting bug must not stop the writer
                        logger.exception("cache store error handler failed")
            except Exception:  # never let the writer die with jobs behind it
                logger.exception("cache writer failed on a batch of %d stores", len(batch))
            finally:
                with cond:
                    self._done += len(batch)
                    cond.notify_all()


_writers: Dict[int, StoreWriter] = {}
_writers_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # Another thread may have held the lock at fork(): the child's copy would stay locked.
    global _writers_lock, _renewer_lock
    _writers_lock = threading.Lock()
    _renewer_lock = threading.Lock()
    # The parent's leaders are the parent's: a child renewing their locks would keep them alive
    # after the parent released them, or after the parent died.
    _renewer._reset()
    _renewer._pid = os.getpid()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def writer_for(connector: RedisConnector) -> StoreWriter:
    """The process-wide :class:`StoreWriter` of this connector."""
    found = _writers.get(id(connector))
    if found is not None and found.connector is connector:
        return found
    with _writers_lock:
        found = _writers.get(id(connector))
        if found is None or found.connector is not connector:
            found = StoreWriter(connector)
            _writers[id(connector)] = found
        return found


def flush_writers(timeout: float = 2.0) -> bool:
    """Wait for every deferred cache store of this process (at exit); False if one timed out."""
    deadline = time.monotonic() + timeout
    ok = True
    for writer in list(_writers.values()):
        ok = writer.flush(max(0.0, deadline - time.monotonic())) and ok
    return ok


atexit.register(flush_writers)
