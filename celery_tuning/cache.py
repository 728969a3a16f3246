"""``TwoLevelCache``: a per-process TTL cache (L1) in front of Redis (L2), with single flight."""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from cachetools import TTLCache

from .errors import StorageError
from .policy.cachekeys import ArgumentBinder, UncacheableArgument, call_digest, canonical_call, key_function_digest
from .policy.codec import CorruptValue, decode, encode
from .storage.cache import CacheKeys, LockRenewer, RedisCacheStore, decode_invalidation, listener_for, lock_renewer

__all__ = ["Preflight", "TwoLevelCache", "UncacheableArgument"]

logger = logging.getLogger("celery_tuning.cache")

#: (event, task name) -> None. Events: hit_l1, hit_l2, miss, store, skip_too_big,
#: skip_unserializable, skip_arguments, corrupt, redis_error, wait, invalidate.
Observer = Callable[[str, str], None]

_GENERATION_TTL = 5.0  # seconds a process trusts its copy of the clear() generation without news

#: Generations are Redis TIME in microseconds or counted up from it; anything outside this is
#: not a generation of ours (a foreign message), and would pin this process to it for good.
_MAX_GENERATION = 2**62

#: Values handed out as they are: nothing a caller does to one changes what the next one gets.
#: Seconds a follower keeps polling through Redis errors before it computes the value itself.
_FOLLOWER_OUTAGE_GRACE = 2.0

_IMMUTABLE = frozenset((str, int, float, bool, type(None), bytes))


def _copyable(value: Any) -> bool:
    """True when ``value`` is built of dicts, lists and immutable scalars only (what _fresh copies)."""
    kind = type(value)
    if kind is dict:
        return all(type(k) in _IMMUTABLE and _copyable(v) for k, v in value.items())
    if kind is list:
        return all(_copyable(v) for v in value)
    return kind in _IMMUTABLE


def _fresh(value: Any) -> Any:
    """A deep copy of a decoded value (dicts and lists rebuilt, scalars shared: they are immutable)."""
    kind = type(value)
    if kind is dict:
        return {k: _fresh(v) for k, v in value.items()}
    if kind is list:
        return [_fresh(v) for v in value]
    return value


def _entry_size(entry: Tuple[Any, ...]) -> int:
    return int(entry[3])

#: Bound of the hit/miss trend of L2 reads: after this many hits in a row a cache that
#: mostly missed is back to reading with a plain GET first.
_TREND_LIMIT = 8


class Preflight(Protocol):
    """A limiter decision the cache's miss path takes in its own round trip.

    ``keys`` and ``packed`` are ``gcra_acquire.lua``'s KEYS and ARGV[1]; ``settle`` receives
    the script's reply when a token was taken.
    """

    keys: List[str]
    packed: str

    def settle(self, reply: int) -> None: ...


#: Digests of recent calls whose arguments are all short strings, so a hit skips binding,
#: canonical JSON and SHA-256. Only ``str`` arguments qualify: for them equal means identical
#: canonical text, unlike 1 == True == 1.0. Bounded in entries and in the text it keeps alive.
_MEMO_ENTRIES = 4096
_MEMO_TEXT = 256


def _memo_key(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    size = 0
    for value in args:
        if type(value) is not str:
            return None
        size += len(value)
    if kwargs:
        for value in kwargs.values():
            if type(value) is not str:
                return None
            size += len(value)
        if size > _MEMO_TEXT:
            return None
        return args, tuple(sorted(kwargs.items()))
    if size > _MEMO_TEXT:
        return None
    return args


#: Every cache of this process, for the fork hook below.
_caches: weakref.WeakSet[TwoLevelCache] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # A forked child has no listener thread (threads do not survive fork()) and so hears no
    # invalidation of what its parent kept in L1; its L1 lock may have been held at fork().
    for cache in list(_caches):
        cache._l1_lock = threading.Lock()
        cache._l1.clear()
        cache._listening = False


os.register_at_fork(after_in_child=_forget_after_fork)


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
        self._binder = ArgumentBinder(signature)
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
        self._renewer: LockRenewer = lock_renewer()
        self.wait_timeout = float(wait_timeout) if wait_timeout is not None else self.lock_timeout + 1.0
        self.write_behind = write_behind
        self.observer = observer
        self.clock = clock
        self.sleep = sleep
        self._digests: Dict[Any, str] = {}
        # Each entry weighs its encoded size but at least one slot's share of the byte bound:
        # the total then caps both the bytes and the number of entries.
        self._l1_slot = max(1, int(l1_max_bytes) // max(1, int(l1_maxsize)))
        l1_weight = min(int(l1_max_bytes), self._l1_slot * max(1, int(l1_maxsize)))
        self._l1: TTLCache = TTLCache(maxsize=max(1, l1_weight), ttl=max(self.l1_ttl, 0.001),
                                      timer=clock, getsizeof=_entry_size)
        self._l1_lock = threading.Lock()
        self._generation: Optional[int] = None
        self._generation_at = float("-inf")
        self._warned: set = set()
        self._listening = False
        self._token_pid = -1
        self._token_base = ""
        self._token_counter = itertools.count()
        self._l2_trend = 0  # > 0: recent L2 reads mostly missed
        _caches.add(self)

    # -- keys ------------------------------------------------------------------------------

    def digest(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
        """Digest of a call's arguments.

        Raises:
            UncacheableArgument: When an argument has no canonical form.
        """
        if self.key_function is not None:
            return key_function_digest(self.key_function, args, kwargs)
        memo = _memo_key(args, kwargs)
        if memo is not None:
            found = self._digests.get(memo)
            if found is not None:
                return found
        digest = call_digest(canonical_call(self._binder, args, kwargs, self.vary_on))
        if memo is not None:
            if len(self._digests) >= _MEMO_ENTRIES:
                self._digests.clear()
            self._digests[memo] = digest
        return digest

    # -- helpers ---------------------------------------------------------------------------

    def _token(self) -> str:
        # Unique per call across processes and hosts: uuid4 once per process, a counter after.
        if self._token_pid != os.getpid():
            self._token_pid, self._token_base = os.getpid(), uuid.uuid4().hex
        return f"{self._token_base}:{next(self._token_counter)}"

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

    def _l1_get(self, digest: str) -> Tuple[bool, Any]:
        with self._l1_lock:
            entry = self._l1.get(digest)
        if entry is None:
            return False, None
        shared, value, expires, _ = entry
        if self.clock() >= expires:
            return False, None
        # A fresh copy per hit, so no caller sees another's mutation. The decoded form holds only
        # dicts, lists and immutable scalars (checked when kept), so a walk over the containers is
        # a full copy at a fraction of copy.deepcopy's or a second decode's cost.
        return True, (_fresh(value) if shared else value)

    def _l1_put(self, digest: str, value: Any, size: int, l2_remaining: Optional[float] = None) -> None:
        """Keep a decoded value (``size``: its encoded bytes) for no longer than L2 does."""
        life = self.l1_ttl if l2_remaining is None else min(self.l1_ttl, l2_remaining)
        if life <= 0:
            return
        shared = type(value) not in _IMMUTABLE
        if shared and not _copyable(value):
            return  # e.g. a msgpack extension type: served from L2 only
        if shared:
            value = _fresh(value)  # the caller that put it keeps its own copy
        entry = (shared, value, self.clock() + life, max(size, self._l1_slot))
        with self._l1_lock:
            try:
                self._l1[digest] = entry
            except ValueError:  # larger than the whole L1
                pass

    def _listen(self) -> None:
        if self._listening or self.store is None:
            return
        self._listening = True
        listener_for(self.store.connector, self.keys.channel).add(self._on_data, self._on_subscribed)

    def _on_subscribed(self) -> None:
        # Invalidations published while no subscription was up (before the first one, or while
        # Redis was away) never reach this process: what L1 kept meanwhile cannot be trusted.
        with self._l1_lock:
            self._l1.clear()

    def _on_data(self, data: Any) -> None:
        message = decode_invalidation(data)
        if message is None:
            self._warn_once("foreign", "cache %s: ignoring foreign messages on %s", self.name, self.keys.channel)
            return
        self._on_message(message)

    def _on_message(self, message: Dict[str, Any]) -> None:
        """An invalidation; anything not shaped like ours is ignored (the channel is open to all)."""
        if message.get("task") != self.name:
            return
        digest = message.get("digest")
        generation = message.get("generation")
        if digest is not None:
            if isinstance(digest, str):
                with self._l1_lock:
                    self._l1.pop(digest, None)
            return
        if type(generation) is int and 0 <= generation < _MAX_GENERATION:
            self._note_generation(generation)
            with self._l1_lock:
                self._l1.clear()

    def _note_generation(self, generation: int) -> None:
        """Adopt ``generation`` unless a newer one is known: reads and messages may arrive out
        of order (a read started before a clear() can finish after its message)."""
        with self._l1_lock:
            known = self._generation
            if known is not None and generation < known:
                return
            if known is not None and generation > known:
                self._l1.clear()  # a clear() this process did not hear of: L1 holds older entries
            self._generation, self._generation_at = generation, self.clock()

    def generation(self) -> int:
        """This task's current cache generation: the number in every L2 key, bumped by
        :meth:`clear` (0 for an L1-only cache). Read from Redis at most every few seconds
        unless a clear() is heard of sooner; a missing key starts a new generation.

        Raises:
            StorageError: When Redis fails.
        """
        if self.store is None:
            return 0
        return self._current_generation()

    def _current_generation(self) -> int:
        assert self.store is not None
        if self._generation is None or self.clock() - self._generation_at > _GENERATION_TTL:
            self._note_generation(self.store.generation(self.keys.generation_key))
        generation = self._generation
        assert generation is not None
        return generation

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
            self._l1_put(digest, value, len(raw), remaining)
        return ok, value

    def _as_stored(self, digest: str, value: Any, encoded: Optional[Tuple[bytes, Any]]) -> Any:
        """What the computing caller gets: the value as any later hit decodes it (a tuple
        comes back a list, an int key a str), or the value itself when it was not cached."""
        if encoded is None:
            return value
        raw, stored = encoded
        self._l1_put(digest, stored, len(raw))  # L1 keeps its own copy
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

    # -- the cache -------------------------------------------------------------------------

    def peek(self, digest: str) -> Tuple[bool, Any]:
        """Read L1 then L2 without electing a leader (used by ``short_circuit``)."""
        found, value = self._l1_get(digest)
        if found or self.store is None:
            return found, value
        self._listen()  # what L2 gives is kept in L1: invalidations must reach it
        try:
            raw = self.store.get(self.keys.value(self._current_generation(), digest))
        except StorageError:
            return False, None
        if raw is None:
            return False, None
        return self._accept(digest, raw, event=None)

    def _note_l2(self, hit: bool) -> None:
        """Track whether recent L2 reads found values (races between threads only blur the trend)."""
        trend = self._l2_trend + (-1 if hit else 1)
        self._l2_trend = max(-_TREND_LIMIT, min(_TREND_LIMIT, trend))

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
        found, value = self._l1_get(digest)
        if found:
            self._emit("hit_l1")
            return value
        if self.store is None:
            return self._compute_local(digest, compute, cacheable)
        self._listen()
        token = ""
        lock_ms = max(1, int(self.lease_ttl * 1000))
        asked = self._renewer.clock()
        try:
            generation = self._current_generation()
            value_key, lock_key = self.keys.value(generation, digest), self.keys.lock(generation, digest)
            raw = None
            role = -1
            # While reads mostly find values, a hit is one plain GET and only a miss pays for
            # the script that elects a leader. While they mostly miss, go straight to the
            # script: it returns a value when there is one, so a miss costs one round trip.
            if self._l2_trend <= 0:
                raw = self.store.get(value_key)
            if raw is None:
                token = self._token()
                pending = preflight() if preflight is not None else None
                if pending is None:
                    raw, _, role = self.store.lookup(value_key, lock_key, token, lock_ms)
                else:
                    raw, _, role, reply = self.store.lookup_acquire(
                        value_key, lock_key, token, lock_ms, pending.keys, pending.packed)
                    if reply is not None:
                        pending.settle(reply)
                if role == 1:
                    self._lead(lock_key, token, lock_ms, asked)
            self._note_l2(raw is not None)
        except StorageError as exc:
            self._warn_once("redis", "cache %s: tuning Redis failed (%s); serving from L1 only", self.name, exc)
            self._emit("redis_error")
            return self._compute_local(digest, compute, cacheable)
        if raw is not None:
            ok, value = self._accept(digest, raw)
            if ok:
                return value
            role = 1  # a foreign value sits there: recompute and overwrite it
        self._emit("miss")
        deadline = self.clock() + self.wait_timeout
        delay = 0.005
        failing_since: Optional[float] = None
        while role == 0:  # a leader elsewhere is computing it
            if self.clock() >= deadline:
                logger.warning("cache %s: gave up waiting for another worker's result after %.1fs",
                               self.name, self.wait_timeout)
                break
            self._emit("wait")
            self.sleep(delay)
            delay = min(delay * 2, 0.2)
            asked = self._renewer.clock()
            try:
                raw, _, role = self.store.lookup(value_key, lock_key, token, lock_ms)
            except StorageError:
                # Ride out a short outage (a failover, a paused or briefly unreachable server):
                # the leader is still computing, and running the body here at the first failed
                # poll doubles the work. A longer outage runs the body here, as a miss does.
                now = self.clock()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= _FOLLOWER_OUTAGE_GRACE:
                    return self._compute_local(digest, compute, cacheable)
                continue
            failing_since = None
            if role == 1:
                self._lead(lock_key, token, lock_ms, asked)
            if raw is not None:
                ok, value = self._accept(digest, raw)
                if ok:
                    return value
                role = 1
        try:
            value = compute()
            keep = cacheable is None or cacheable(value)
        except BaseException:
            self._release(value_key, lock_key, token)  # exceptions are never cached
            raise
        finally:
            # The store (or release) that follows frees the lock; a deferred store lands within
            # the lease the last renewal gave, or the lock runs out and a follower computes.
            self._renewer.drop(lock_key, token)
        if not keep:
            self._release(value_key, lock_key, token)  # not for caching: free the lock as an error does
            return value
        encoded = self._encode(value)
        raw = encoded[0] if encoded is not None else None
        try:
            if self.write_behind:
                self.store.store_later(value_key, lock_key, raw or b"", int(self.ttl * 1000), token,
                                       self._store_failed)
            else:
                self.store.store(value_key, lock_key, raw or b"", int(self.ttl * 1000), token)
        except StorageError as exc:
            self._store_failed(exc)
        if raw is not None:
            self._emit("store")
        return self._as_stored(digest, value, encoded)

    def _lead(self, lock_key: str, token: str, lock_ms: int, asked: float) -> None:
        """This caller took the lock: keep it alive while it computes, at most ``lock_timeout``
        from when it asked (the lock was taken after that, so it never outlives the bound)."""
        if self.lease_ttl < self.lock_timeout:
            assert self.store is not None
            self._renewer.hold(self.store.connector, self.keys.stem, lock_key, token, lock_ms,
                               asked + self.lock_timeout)

    def _store_failed(self, exc: StorageError) -> None:
        self._warn_once("redis", "cache %s: tuning Redis failed (%s); serving from L1 only", self.name, exc)
        self._emit("redis_error")

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until this process's deferred stores reached Redis; False on timeout."""
        return True if self.store is None or not self.write_behind else self.store.flush(timeout)

    def _release(self, value_key: str, lock_key: str, token: str) -> None:
        assert self.store is not None
        try:
            self.store.store(value_key, lock_key, b"", 0, token)
        except StorageError:
            pass  # the lock expires by itself

    def _compute_local(self, digest: str, compute: Callable[[], Any],
                       cacheable: Optional[Callable[[Any], bool]] = None) -> Any:
        value = compute()
        if cacheable is not None and not cacheable(value):
            return value
        return self._as_stored(digest, value, self._encode(value))

    # -- invalidation ----------------------------------------------------------------------

    def invalidate_digest(self, digest: str) -> None:
        """Drop one entry here, in Redis, and (through pub/sub) in every process's L1."""
        with self._l1_lock:
            self._l1.pop(digest, None)
        if self.store is None:
            return
        self.flush()  # a store of ours still queued must not land after the delete
        generation = self._current_generation()
        self.store.delete(self.keys.value(generation, digest))
        self.store.publish(self.keys.channel, {"task": self.name, "digest": digest})
        self._emit("invalidate")

    def clear(self) -> int:
        """Drop every entry of this task: a new generation, old entries expire by TTL."""
        with self._l1_lock:
            self._l1.clear()
        if self.store is None:
            return 0
        generation = self.store.bump_generation(self.keys.generation_key)
        self._note_generation(generation)
        self.store.publish(self.keys.channel, {"task": self.name, "generation": generation})
        self._emit("invalidate")
        return generation

    def l2_entries(self) -> int:
        """Entries in the current generation (SCAN; for the CLI)."""
        if self.store is None:
            return 0
        self.flush()
        return self.store.count(self.keys.pattern(self._current_generation()))
