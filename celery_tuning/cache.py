"""``TwoLevelCache``: a per-process TTL cache (L1) in front of Redis (L2), with single flight.

The cache composes parts with one job each (key function, cache and lock kept apart):

* keying: :class:`~celery_tuning.policy.cachekeys.CallDigester` (a call's arguments to a digest);
* L1: :class:`~celery_tuning.cachelevels.LocalLevel` (bounded by entries and bytes, TTL, copies);
* generations: :class:`~celery_tuning.cachelevels.Generations` (what ``clear()`` bumps);
* invalidations: :class:`~celery_tuning.cachelevels.InvalidationListener` (pub/sub into L1);
* single flight: :class:`~celery_tuning.storage.cache_flight.SingleFlight` (leader election,
  followers, lock leases renewed by :class:`~celery_tuning.storage.cache_locks.LockRenewer`);
* L2 and write-behind: :class:`~celery_tuning.storage.cache.RedisCacheStore` and its
  :class:`~celery_tuning.storage.cache_writer.StoreWriter`.

This class holds the policy between them: what is encoded and kept, which read path a lookup
takes, and what a Redis failure falls back to.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .cachelevels import Generations, InvalidationListener, LocalLevel
from .errors import StorageError
from .policy.cachekeys import CallDigester, UncacheableArgument
from .policy.codec import CorruptValue, decode, encode
from .storage.cache import CacheKeys, RedisCacheStore, listener_for
from .storage.cache_flight import LEAD, Preflight, SingleFlight

__all__ = ["Preflight", "TwoLevelCache", "UncacheableArgument"]

logger = logging.getLogger("celery_tuning.cache")

#: (event, task name) -> None. Events: hit_l1, hit_l2, miss, store, skip_too_big,
#: skip_unserializable, skip_arguments, corrupt, redis_error, wait, invalidate.
Observer = Callable[[str, str], None]

#: Values every serializer decodes to an equal value of the same type (a float's repr round-trips;
#: NaN and the infinities never encode).
_SCALARS = frozenset((type(None), bool, int, float, str))

#: Bound of the hit/miss trend of L2 reads: after this many hits in a row a cache that
#: mostly missed is back to reading with a plain GET first.
_TREND_LIMIT = 8


class TwoLevelCache:
    """The result cache of one task.

    Arguments:
        name: Task name (key namespace and hash tag).
        signature: Signature of the task function (without ``self``) for canonical keys.
        store: L2 store; ``None`` means L1 only.
        prefix, version: Key namespace.
        ttl: L2 lifetime (s). l1_ttl: L1 lifetime (s), never longer than the L2 entry's.
        l1_maxsize: L1 entries. l1_max_bytes: L1 size, counted as encoded value bytes (an
            entry counts at least ``l1_max_bytes / l1_maxsize``, so both bounds hold).
        max_size: largest encoded value (bytes) cached.
        serializer: ``"json"`` or ``"msgpack"``.
        key: Optional key function taking the task's arguments.
        vary_on: Only these argument names make up the key.
        lock_timeout: Longest life (s) of a single-flight lock, however long its leader computes.
        lease_ttl: Single-flight lock TTL (s) between renewals: the leader's process renews it
            while the body runs, so followers take over within this long after the leader died.
        wait_timeout: How long a follower waits for the leader's value before running itself.
        write_behind: Hand a computed value to the process's background writer instead of
            waiting for Redis to take it (the lock is released by the same store, so other
            callers wait for the value rather than compute it again).
        observer: Metrics hook.
        clock: Monotonic clock (injected in tests).
    """

    def __init__(
        self,
        name: str,
        signature: inspect.Signature,
        *,
        store: Optional[RedisCacheStore],
        prefix: str = "tuning",
        version: int = 1,
        ttl: float = 3600.0,
        l1_ttl: float = 60.0,
        l1_maxsize: int = 1024,
        l1_max_bytes: int = 16 * 2**20,
        max_size: int = 1_000_000,
        serializer: str = "json",
        key: Optional[Callable[..., Any]] = None,
        vary_on: Optional[Sequence[str]] = None,
        lock_timeout: float = 60.0,
        lease_ttl: float = 30.0,
        wait_timeout: Optional[float] = None,
        write_behind: bool = False,
        observer: Optional[Observer] = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.signature = signature
        self.store = store
        self.keys = CacheKeys(prefix, name, version)
        self.ttl = float(ttl)
        self.l1_ttl = min(float(l1_ttl), self.ttl)
        self.max_size = max_size
        self.serializer = serializer
        self.key_function = key
        self.vary_on = tuple(vary_on) if vary_on is not None else None
        self.lock_timeout = float(lock_timeout)
        # A lock that lives no longer than one lease needs no renewal: it is taken for lock_timeout.
        self.lease_ttl = min(float(lease_ttl), self.lock_timeout)
        self.wait_timeout = float(wait_timeout) if wait_timeout is not None else self.lock_timeout + 1.0
        self.write_behind = write_behind
        self.observer = observer
        self.clock = clock
        self.sleep = sleep
        self._warned: set = set()
        self._l2_trend = 0  # > 0: recent L2 reads mostly missed

        self.digester = CallDigester(signature, key, self.vary_on)
        self.l1 = LocalLevel(self.l1_ttl, l1_maxsize, l1_max_bytes, clock)
        self.generations = Generations(self._read_generation, self.l1.clear, clock)
        self.invalidations = InvalidationListener(name, self.keys.channel, self.l1, self.generations,
                                                  self._subscribe if store is not None else None, self._warn_once)
        self.flight: Optional[SingleFlight] = None
        if store is not None:
            self.flight = SingleFlight(store, self.keys.stem, name, lock_timeout=self.lock_timeout,
                                       lease_ttl=self.lease_ttl, wait_timeout=self.wait_timeout,
                                       clock=clock, sleep=sleep)

    # -- keys ------------------------------------------------------------------------------

    def digest(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
        """Digest of a call's arguments.

        Raises:
            UncacheableArgument: When an argument has no canonical form.
        """
        return self.digester(args, kwargs)

    # -- generations and invalidations ------------------------------------------------------

    def generation(self) -> int:
        """This task's current cache generation: the number in every L2 key, bumped by
        :meth:`clear` (0 for an L1-only cache). Read from Redis at most every few seconds
        unless a clear() is heard of sooner; a missing key starts a new generation.

        Raises:
            StorageError: When Redis fails.
        """
        if self.store is None:
            return 0
        return self.generations.current()

    def _current_generation(self) -> int:
        assert self.store is not None
        return self.generations.current()

    def _read_generation(self) -> int:
        assert self.store is not None
        return self.store.generation(self.keys.generation_key)

    def _subscribe(self, on_data: Callable[[Any], None], on_subscribed: Callable[[], None]) -> None:
        assert self.store is not None
        listener_for(self.store.connector, self.keys.channel).add(on_data, on_subscribed)

    def _listen(self) -> None:
        """Subscribe this process to invalidations (once; what L2 gives is kept in L1)."""
        self.invalidations.listen()

    # -- helpers ---------------------------------------------------------------------------

    def _emit(self, event: str) -> None:
        if self.observer is not None:
            try:
                self.observer(event, self.name)
            except Exception:
                logger.exception("cache observer failed")

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(message, *args)

    def _decode(self, raw: bytes) -> Tuple[bool, Any, Optional[float]]:
        """(ok, value, seconds the L2 entry has left or None)."""
        try:
            value, _, expires_ms = decode(raw)
        except CorruptValue as exc:
            logger.warning("cache %s: ignoring a value in Redis that is not ours (%s)", self.name, exc)
            self._emit("corrupt")
            return False, None, None
        remaining = None if expires_ms is None else expires_ms / 1000 - time.time()
        return True, value, remaining

    def _accept(self, digest: str, raw: bytes, event: Optional[str] = "hit_l2") -> Tuple[bool, Any]:
        """Decode an L2 value and keep it in L1 for no longer than L2 does."""
        ok, value, remaining = self._decode(raw)
        if ok:
            if event:
                self._emit(event)
            self.l1.put(digest, value, len(raw), remaining)
        return ok, value

    def _as_stored(self, digest: str, value: Any, encoded: Optional[Tuple[bytes, Any]]) -> Any:
        """What the computing caller gets: the value as any later hit decodes it (a tuple
        comes back a list, an int key a str), or the value itself when it was not cached."""
        if encoded is None:
            return value
        raw, stored = encoded
        self.l1.put(digest, stored, len(raw))  # L1 keeps its own copy
        return stored

    def _encode(self, value: Any) -> Optional[Tuple[bytes, Any]]:
        """The bytes to store and the value every hit will decode from them; None: not cached."""
        try:
            raw = encode(value, self.serializer, int((time.time() + self.ttl) * 1000))
        except (TypeError, ValueError, OverflowError) as exc:
            self._warn_once("unserializable", "cache %s: result not cached, %s cannot encode it (%s)",
                            self.name, self.serializer, exc)
            self._emit("skip_unserializable")
            return None
        if len(raw) > self.max_size:
            self._emit("skip_too_big")
            return None
        if type(value) in _SCALARS:
            return raw, value  # both serializers give these back as they were: no decode needed
        try:
            # The caller gets the decoded form anyway; decoding first also catches values that
            # encode but never decode (msgpack packs a tuple dict key, unpacking it fails), which
            # would otherwise be stored on every call and never served.
            stored, _, _ = decode(raw)
        except CorruptValue as exc:
            self._warn_once("undecodable", "cache %s: result not cached, %s cannot read back what it wrote (%s)",
                            self.name, self.serializer, exc)
            self._emit("skip_unserializable")
            return None
        return raw, stored

    def _note_l2(self, hit: bool) -> None:
        """Track whether recent L2 reads found values (races between threads only blur the trend)."""
        trend = self._l2_trend + (-1 if hit else 1)
        self._l2_trend = max(-_TREND_LIMIT, min(_TREND_LIMIT, trend))

    # -- the cache -------------------------------------------------------------------------

    def peek(self, digest: str) -> Tuple[bool, Any]:
        """Read L1 then L2 without electing a leader (used by ``short_circuit``)."""
        found, value = self.l1.get(digest)
        if found or self.store is None:
            return found, value
        self._listen()  # what L2 gives is kept in L1: invalidations must reach it
        try:
            raw = self.store.get(self.keys.value(self.generations.current(), digest))
        except StorageError:
            return False, None
        if raw is None:
            return False, None
        return self._accept(digest, raw, event=None)

    def get_or_compute(self, digest: str, compute: Callable[[], Any],
                       preflight: Optional[Callable[[], Optional[Preflight]]] = None,
                       cacheable: Optional[Callable[[Any], bool]] = None) -> Any:
        """The cached value for ``digest``, computing it at most once across all workers.

        ``preflight`` (the task's rate limiter) may return a decision to take in the round trip
        that elects this caller to compute: a miss then costs one round trip instead of two.

        ``cacheable`` judges a computed result: when it answers False the result goes back to
        this caller only. Nothing is stored (neither L1 nor L2) and the single-flight lock is
        freed at once, exactly as when ``compute`` raises, so waiting callers compute the value
        themselves or elect a new leader.
        """
        found, value = self.l1.get(digest)
        if found:
            self._emit("hit_l1")
            return value
        store, flight = self.store, self.flight
        if store is None or flight is None:
            return self._compute_local(digest, compute, cacheable)
        self._listen()
        token = ""
        asked = flight.asked()
        try:
            generation = self.generations.current()
            value_key, lock_key = self.keys.value(generation, digest), self.keys.lock(generation, digest)
            raw = None
            role = -1
            # While reads mostly find values, a hit is one plain GET and only a miss pays for
            # the script that elects a leader. While they mostly miss, go straight to the
            # script: it returns a value when there is one, so a miss costs one round trip.
            if self._l2_trend <= 0:
                raw = store.get(value_key)
            if raw is None:
                token = flight.token()
                raw, role = flight.elect(value_key, lock_key, token, asked, preflight)
            self._note_l2(raw is not None)
        except StorageError as exc:
            self._store_failed(exc)
            return self._compute_local(digest, compute, cacheable)
        if raw is not None:
            ok, value = self._accept(digest, raw)
            if ok:
                return value
            role = LEAD  # a foreign value sits there: recompute and overwrite it
        self._emit("miss")
        if role != LEAD:  # a leader elsewhere is computing it
            found, value, outage = flight.follow(value_key, lock_key, token,
                                                 lambda raw: self._accept(digest, raw),
                                                 lambda: self._emit("wait"))
            if found:
                return value
            if outage:
                return self._compute_local(digest, compute, cacheable)
        try:
            value = compute()
            keep = cacheable is None or cacheable(value)
        except BaseException:
            flight.release(value_key, lock_key, token)  # exceptions are never cached
            raise
        finally:
            flight.done(lock_key, token)
        if not keep:
            flight.release(value_key, lock_key, token)  # not for caching: free the lock as an error does
            return value
        encoded = self._encode(value)
        raw = encoded[0] if encoded is not None else None
        try:
            if self.write_behind:
                store.store_later(value_key, lock_key, raw or b"", int(self.ttl * 1000), token, self._store_failed)
            else:
                store.store(value_key, lock_key, raw or b"", int(self.ttl * 1000), token)
        except StorageError as exc:
            self._store_failed(exc)
        if raw is not None:
            self._emit("store")
        return self._as_stored(digest, value, encoded)

    def _store_failed(self, exc: StorageError) -> None:
        self._warn_once("redis", "cache %s: tuning Redis failed (%s); serving from L1 only", self.name, exc)
        self._emit("redis_error")

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until this process's deferred stores reached Redis; False on timeout."""
        return True if self.store is None or not self.write_behind else self.store.flush(timeout)

    def _compute_local(self, digest: str, compute: Callable[[], Any],
                       cacheable: Optional[Callable[[Any], bool]] = None) -> Any:
        value = compute()
        if cacheable is not None and not cacheable(value):
            return value
        return self._as_stored(digest, value, self._encode(value))

    # -- invalidation ----------------------------------------------------------------------

    def invalidate_digest(self, digest: str) -> None:
        """Drop one entry here, in Redis, and (through pub/sub) in every process's L1."""
        self.l1.pop(digest)
        if self.store is None:
            return
        self.flush()  # a store of ours still queued must not land after the delete
        generation = self.generations.current()
        self.store.delete(self.keys.value(generation, digest))
        self.store.publish(self.keys.channel, {"task": self.name, "digest": digest})
        self._emit("invalidate")

    def clear(self) -> int:
        """Drop every entry of this task: a new generation, old entries expire by TTL."""
        self.l1.clear()
        if self.store is None:
            return 0
        generation = self.store.bump_generation(self.keys.generation_key)
        self.generations.note(generation)
        self.store.publish(self.keys.channel, {"task": self.name, "generation": generation})
        self._emit("invalidate")
        return generation

    def l2_entries(self) -> int:
        """Entries in the current generation (SCAN; for the CLI)."""
        if self.store is None:
            return 0
        self.flush()
        return self.store.count(self.keys.pattern(self.generations.current()))
