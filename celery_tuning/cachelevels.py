"""The per-process parts of :class:`~celery_tuning.cache.TwoLevelCache`: the L1 level, the
generation this process believes current, and the glue that feeds invalidations into both.

Each part has one job and its own lock; none talks to Redis itself (the generation is read
through a function the cache passes in, the subscription is made through another).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from cachetools import TTLCache

from .storage.cache import decode_invalidation
from .storage.process import PerProcess

__all__ = ["GENERATION_TRUST", "MAX_GENERATION", "Generations", "InvalidationListener", "LocalLevel"]

logger = logging.getLogger("celery_tuning.cache")

#: Seconds a process trusts its copy of the clear() generation without news.
GENERATION_TRUST = 5.0

#: Generations are Redis TIME in microseconds or counted up from it; anything outside this is
#: not a generation of ours (a foreign message), and would pin this process to it for good.
MAX_GENERATION = 2**62

#: Values handed out as they are: nothing a caller does to one changes what the next one gets.
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


class _Entries:
    """One process's L1 entries and their lock."""

    __slots__ = ("entries", "lock")

    def __init__(self, entries: TTLCache) -> None:
        self.entries = entries
        self.lock = threading.Lock()


class LocalLevel:
    """L1: decoded values in this process, bounded in entries and in bytes, each for a TTL.

    Bytes are counted as the encoded value's size; each entry weighs at least one slot's share
    of the byte bound (``max_bytes / maxsize``), so one total caps both. Every hit hands out a
    fresh copy, so no caller sees another's mutation. The entries are a
    :class:`~celery_tuning.storage.process.PerProcess` value: a forked child starts empty (it hears
    no invalidation of what its parent kept until it subscribes itself) with a lock of its own.
    """

    def __init__(self, ttl: float, maxsize: int, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self.slot = max(1, int(max_bytes) // max(1, int(maxsize)))
        self._weight = max(1, min(int(max_bytes), self.slot * max(1, int(maxsize))))
        self._state: PerProcess[_Entries] = PerProcess(self._build, name="cache-l1")

    def _build(self) -> _Entries:
        return _Entries(TTLCache(maxsize=self._weight, ttl=max(self.ttl, 0.001), timer=self.clock,
                                 getsizeof=_entry_size))

    def get(self, digest: str) -> Tuple[bool, Any]:
        """(True, a copy of the value) while ``digest`` is kept and fresh, else (False, None)."""
        state = self._state.get()
        with state.lock:
            entry = state.entries.get(digest)
        if entry is None:
            return False, None
        shared, value, expires, _ = entry
        if self.clock() >= expires:
            return False, None
        # A fresh copy per hit, so no caller sees another's mutation. The decoded form holds only
        # dicts, lists and immutable scalars (checked when kept), so a walk over the containers is
        # a full copy at a fraction of copy.deepcopy's or a second decode's cost.
        return True, (_fresh(value) if shared else value)

    def put(self, digest: str, value: Any, size: int, l2_remaining: Optional[float] = None) -> None:
        """Keep a decoded value (``size``: its encoded bytes) for no longer than L2 does."""
        life = self.ttl if l2_remaining is None else min(self.ttl, l2_remaining)
        if life <= 0:
            return
        shared = type(value) not in _IMMUTABLE
        if shared and not _copyable(value):
            return  # e.g. a msgpack extension type: served from L2 only
        if shared:
            value = _fresh(value)  # the caller that put it keeps its own copy
        entry = (shared, value, self.clock() + life, max(size, self.slot))
        state = self._state.get()
        with state.lock:
            try:
                state.entries[digest] = entry
            except ValueError:  # larger than the whole L1
                pass

    def pop(self, digest: str) -> None:
        """Forget one entry."""
        state = self._state.get()
        with state.lock:
            state.entries.pop(digest, None)

    def clear(self) -> None:
        """Forget every entry."""
        state = self._state.get()
        with state.lock:
            state.entries.clear()


class Generations:
    """The generation of a task's L2 entries this process believes current.

    ``read()`` asks Redis (a missing key starts a new generation); its answer is trusted for
    :data:`GENERATION_TRUST` seconds unless a clear() is heard of sooner. Reads and messages
    may arrive out of order (a read started before a clear() can finish after its message), so a
    generation never goes back. A newer generation than the one known means a clear() this
    process did not hear of: ``on_newer()`` then drops what L1 kept.
    """

    def __init__(self, read: Callable[[], int], on_newer: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic, trust: float = GENERATION_TRUST) -> None:
        self.read = read
        self.on_newer = on_newer
        self.clock = clock
        self.trust = trust
        self.known: Optional[int] = None
        self.known_at = float("-inf")
        # What is known survives fork(); the lock must not (a parent's thread may hold it then).
        self._lock: PerProcess[threading.Lock] = PerProcess(threading.Lock, name="cache-generation-lock")

    def note(self, generation: int) -> None:
        """Adopt ``generation`` unless a newer one is known."""
        with self._lock.get():
            known = self.known
            if known is not None and generation < known:
                return
            if known is not None and generation > known:
                self.on_newer()  # a clear() this process did not hear of: L1 holds older entries
            self.known, self.known_at = generation, self.clock()

    def current(self) -> int:
        """The generation to read and write under; asks Redis when what is known is stale.

        Raises:
            StorageError: When Redis fails.
        """
        if self.known is None or self.clock() - self.known_at > self.trust:
            self.note(self.read())
        known = self.known
        assert known is not None
        return known


class InvalidationListener:
    """Feeds one task's invalidations (published by every process's ``invalidate_digest`` and
    ``clear``) into this process's L1 and generations.

    ``subscribe(on_data, on_subscribed)`` joins the process-wide listener of the channel; it is
    called once per process (again in a forked child, whose parent's listener thread did not
    survive the fork) by :meth:`listen`.
    """

    def __init__(self, task: str, channel: str, level: LocalLevel, generations: Generations,
                 subscribe: Optional[Callable[[Callable[[Any], None], Callable[[], None]], None]],
                 warn_once: Callable[..., None]) -> None:
        self.task = task
        self.channel = channel
        self.level = level
        self.generations = generations
        self.warn_once = warn_once
        self._subscribe = subscribe
        self._joined: PerProcess[bool] = PerProcess(self._join, name="cache-invalidations")

    def _join(self) -> bool:
        assert self._subscribe is not None
        self._subscribe(self.on_data, self.on_subscribed)
        return True

    def listen(self) -> None:
        """Subscribe this process, once (no-op for an L1-only cache)."""
        if self._subscribe is not None:
            self._joined.get()

    def on_subscribed(self) -> None:
        # Invalidations published while no subscription was up (before the first one, or while
        # Redis was away) never reach this process: what L1 kept meanwhile cannot be trusted.
        self.level.clear()

    def on_data(self, data: Any) -> None:
        message = decode_invalidation(data)
        if message is None:
            self.warn_once("foreign", "cache %s: ignoring foreign messages on %s", self.task, self.channel)
            return
        self.on_message(message)

    def on_message(self, message: Dict[str, Any]) -> None:
        """An invalidation; anything not shaped like ours is ignored (the channel is open to all)."""
        if message.get("task") != self.task:
            return
        digest = message.get("digest")
        generation = message.get("generation")
        if digest is not None:
            if isinstance(digest, str):
                self.level.pop(digest)
            return
        if type(generation) is int and 0 <= generation < MAX_GENERATION:
            self.generations.note(generation)
            self.level.clear()
