"""Where ``@dedupe`` locks live: one interface, an in-process reference and a Redis (Lua) store.

A lock belongs to one task name and one key digest and is held by a task id. Its life::

    claim (publish) ──> queued ──start──> running ──release (finish, revoke, hard time limit)──> gone
                        queued <──hold('q')── running        (Retry, deferral, replace: the same id again)
    queued:  expires at its deadline (claimed + ttl)
    running: expires one lease TTL after its last renewal (hold('r')), never after its deadline

A renewal (hold('r')) never turns its own call's queued lock back to running: the call re-queued it
while the renewal was on its way. ``release(..., state='r')`` frees a lock only while it runs.

Every operation is one script (one round trip); a renewal re-creates a lock the store lost.
Time is integer microseconds by the Redis server's clock (``server_clock.lua``); tests pass a
manual clock to both stores. :class:`MemoryDedupeStore` is the reference the Lua scripts mirror
(one contract suite runs both).

Keys (one hash tag per task, so a task's locks and its index share a Cluster slot):

=========================================  ======  =============================================
``P:dd:{T}:l:<digest>``                    hash    one lock: id, st ('q'|'r'), at, dl, ex (µs)
``P:dd:{T}:idx``                           zset    digest -> expiry (µs) of every lock of task T
=========================================  ======  =============================================
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

from .gcra import now_us
from .keys import dedupe_index_key, dedupe_lock_key, dedupe_stem
from .process import PerProcess
from .redis import RedisConnector

__all__ = [
    "CLAIMED", "HELD", "OTHER", "Claim", "DedupeLock", "DedupeStore", "MemoryDedupeStore", "RedisDedupeStore",
    "dedupe_index_key", "dedupe_lock_key", "dedupe_stem",
]

#: ``Claim.status``: another task holds the key.
OTHER = 0
#: ``Claim.status``: the key was free and is now this task id's.
CLAIMED = 1
#: ``Claim.status``: this task id held the key already.
HELD = 2

#: Locks read or dropped per round trip by ``locks`` and ``clear``.
BATCH = 500


class Claim(NamedTuple):
    """An answer about one key: who holds it now."""

    #: :data:`OTHER`, :data:`CLAIMED` or :data:`HELD`.
    status: int
    #: The task id holding the key (the caller's own unless ``status`` is :data:`OTHER`).
    holder: str
    #: 'q' (queued), 'r' (running) or '' (released: ``start`` for until='started').
    state: str
    #: When the lock ends whatever happens (µs; 0 when released).
    deadline: int


class DedupeLock(NamedTuple):
    """A held lock, as ``celery tuning dedupe show`` prints it."""

    digest: str
    holder: str
    #: 'queued' or 'running'.
    state: str
    #: Microseconds since it was claimed (or re-created).
    age_us: int
    #: Microseconds until it expires unless renewed.
    expires_in_us: int
    #: Microseconds until its deadline (its life's upper bound).
    deadline_in_us: int


class DedupeStore(Protocol):
    """State behind ``@dedupe``: per (task, digest), the task id holding the key, its state and expiry."""

    def claim(self, task: str, digest: str, task_id: str, ttl_us: int, now: Optional[int] = None) -> Claim: ...

    def start(self, task: str, digest: str, task_id: str, lease_us: int, ttl_us: int, keep: bool,
              now: Optional[int] = None) -> Claim: ...

    def hold(self, task: str, state: str, lease_us: int, locks: Sequence[Tuple[str, str, int]],
             now: Optional[int] = None) -> int: ...

    def release(self, task: str, digest: str, task_id: str, now: Optional[int] = None, state: str = "") -> bool: ...

    def locks(self, task: str, limit: int = 1000, now: Optional[int] = None) -> List[DedupeLock]: ...

    def clear(self, task: str, now: Optional[int] = None) -> int: ...


_STATES = {"q": "queued", "r": "running"}


class _Lock:
    __slots__ = ("at", "deadline", "expires", "holder", "state")

    def __init__(self, holder: str, state: str, at: int, deadline: int, expires: int) -> None:
        self.holder, self.state, self.at, self.deadline, self.expires = holder, state, at, deadline, expires


class _Locks:
    __slots__ = ("lock", "locks")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.locks: Dict[Tuple[str, str], _Lock] = {}


class MemoryDedupeStore:
    """Locks in this process only (``memory://``, the pytest plugin) and the reference for the
    contract tests: mirrors the ``dedupe_*.lua`` scripts. A lock is live while its expiry is after
    now. A forked child starts empty.

    Arguments:
        clock: Returns now in integer microseconds (inject a manual clock in tests).
    """

    def __init__(self, clock: Callable[[], int] = now_us) -> None:
        self.clock = clock
        self._process: PerProcess[_Locks] = PerProcess(_Locks, name="memory dedupe locks")

    def _live(self, locks: Dict[Tuple[str, str], _Lock], key: Tuple[str, str], now: int) -> Optional[_Lock]:
        found = locks.get(key)
        if found is not None and found.expires <= now:
            del locks[key]
            return None
        return found

    def claim(self, task: str, digest: str, task_id: str, ttl_us: int, now: Optional[int] = None) -> Claim:
        state = self._process.get()
        with state.lock:
            now = self.clock() if now is None else now
            found = self._live(state.locks, (task, digest), now)
            if found is not None:
                return Claim(HELD if found.holder == task_id else OTHER, found.holder, found.state, found.deadline)
            deadline = now + ttl_us
            state.locks[(task, digest)] = _Lock(task_id, "q", now, deadline, deadline)
            return Claim(CLAIMED, task_id, "q", deadline)

    def start(self, task: str, digest: str, task_id: str, lease_us: int, ttl_us: int, keep: bool,
              now: Optional[int] = None) -> Claim:
        state = self._process.get()
        with state.lock:
            now = self.clock() if now is None else now
            key = (task, digest)
            found = self._live(state.locks, key, now)
            if found is not None and found.holder != task_id:
                return Claim(OTHER, found.holder, found.state, found.deadline)
            status = CLAIMED if found is None else HELD
            if not keep:
                state.locks.pop(key, None)
                return Claim(status, task_id, "", 0)
            if found is None:
                found = state.locks[key] = _Lock(task_id, "r", now, now + ttl_us, now)
            found.state = "r"
            found.expires = min(now + lease_us, found.deadline)
            return Claim(status, task_id, "r", found.deadline)

    def hold(self, task: str, state: str, lease_us: int, locks: Sequence[Tuple[str, str, int]],
             now: Optional[int] = None) -> int:
        process = self._process.get()
        with process.lock:
            now = self.clock() if now is None else now
            recreated = 0
            for task_id, digest, deadline in locks:
                key = (task, digest)
                found = self._live(process.locks, key, now)
                if found is not None and found.holder != task_id:
                    continue  # lost and claimed anew by another call: leave it
                if state == "r" and found is not None and found.state == "q":
                    continue  # re-queued by its call (a retry) while this renewal was on its way: stays queued
                if deadline <= now:
                    process.locks.pop(key, None)
                    continue
                if found is None:
                    recreated += 1
                    found = process.locks[key] = _Lock(task_id, state, now, deadline, deadline)
                found.state = state
                found.expires = min(now + lease_us, deadline) if state == "r" else deadline
            return recreated

    def release(self, task: str, digest: str, task_id: str, now: Optional[int] = None, state: str = "") -> bool:
        process = self._process.get()
        with process.lock:
            now = self.clock() if now is None else now
            found = process.locks.get((task, digest))
            if found is None or found.holder != task_id or (state and found.state != state):
                return False
            del process.locks[(task, digest)]
            return found.expires > now

    def locks(self, task: str, limit: int = 1000, now: Optional[int] = None) -> List[DedupeLock]:
        process = self._process.get()
        with process.lock:
            now = self.clock() if now is None else now
            live = [(lock.expires, digest, lock) for (name, digest), lock in process.locks.items()
                    if name == task and lock.expires > now]
            return [_shown(digest, lock.holder, lock.state, lock.at, lock.deadline, lock.expires, now)
                    for _, digest, lock in sorted(live, key=lambda entry: entry[:2])[:limit]]

    def clear(self, task: str, now: Optional[int] = None) -> int:
        process = self._process.get()
        with process.lock:
            now = self.clock() if now is None else now
            mine = [key for key in process.locks if key[0] == task]
            dropped = sum(1 for key in mine if process.locks[key].expires > now)
            for key in mine:
                del process.locks[key]
            return dropped


def _shown(digest: str, holder: str, state: str, at: int, deadline: int, expires: int, now: int) -> DedupeLock:
    return DedupeLock(digest, holder, _STATES.get(state, state), max(0, now - at), max(0, expires - now),
                      max(0, deadline - now))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisDedupeStore:
    """Locks in Redis (see the module's key table), one script per operation.

    Raises :class:`~celery_tuning.errors.StorageError` when Redis fails; the step publishes and
    runs calls as if they had no ``@dedupe`` until it answers again.

    Arguments:
        connector: The tuning Redis.
        prefix: ``tuning_key_prefix``.
    """

    def __init__(self, connector: RedisConnector, prefix: str = "tuning") -> None:
        self.connector = connector
        self.prefix = prefix

    @staticmethod
    def _now(now: Optional[int]) -> object:
        # '' lets the script read the server's TIME: every process then shares one clock.
        return "" if now is None else int(now)

    def _keys(self, task: str, digest: str) -> List[str]:
        return [dedupe_lock_key(self.prefix, task, digest), dedupe_index_key(self.prefix, task)]

    @staticmethod
    def _claim(reply: Sequence[object]) -> Claim:
        status, holder, state, deadline = reply
        return Claim(int(status), _text(holder), _text(state), int(_text(deadline) or 0))  # type: ignore[call-overload]

    def claim(self, task: str, digest: str, task_id: str, ttl_us: int, now: Optional[int] = None) -> Claim:
        return self._claim(self.connector.evalsha("dedupe_claim", self._keys(task, digest),
                                                  [task_id, int(ttl_us), digest, self._now(now)]))

    def start(self, task: str, digest: str, task_id: str, lease_us: int, ttl_us: int, keep: bool,
              now: Optional[int] = None) -> Claim:
        return self._claim(self.connector.evalsha(
            "dedupe_start", self._keys(task, digest),
            [task_id, int(lease_us), int(ttl_us), "1" if keep else "0", digest, self._now(now)]))

    def hold(self, task: str, state: str, lease_us: int, locks: Sequence[Tuple[str, str, int]],
             now: Optional[int] = None) -> int:
        if not locks:
            return 0
        keys = [dedupe_index_key(self.prefix, task), *(dedupe_lock_key(self.prefix, task, d) for _, d, _ in locks)]
        args: List[object] = [state, int(lease_us), self._now(now)]
        for task_id, digest, deadline in locks:
            args += [task_id, digest, int(deadline)]
        return int(self.connector.evalsha("dedupe_hold", keys, args))

    def release(self, task: str, digest: str, task_id: str, now: Optional[int] = None, state: str = "") -> bool:
        return bool(int(self.connector.evalsha("dedupe_release", self._keys(task, digest),
                                               [task_id, digest, self._now(now), state])))

    def locks(self, task: str, limit: int = 1000, now: Optional[int] = None) -> List[DedupeLock]:
        index = dedupe_index_key(self.prefix, task)
        # The index's score is each lock's expiry: '(now' skips expired ones (the server's clock
        # is read by the script below; a lock that expires in between is reported as gone).
        floor = "-inf" if now is None else f"({int(now)}"
        digests = [_text(d) for d in self.connector.run(
            lambda c: c.zrangebyscore(index, floor, "+inf", start=0, num=limit), what="ZRANGEBYSCORE dedupe index")]
        out: List[DedupeLock] = []
        for first in range(0, len(digests), BATCH):
            batch = digests[first:first + BATCH]
            reply = self.connector.evalsha("dedupe_peek", [dedupe_lock_key(self.prefix, task, d) for d in batch],
                                           [self._now(now)])
            at_now = int(_text(reply[0]))
            for i, digest in enumerate(batch):
                holder, state, at, deadline, expires = (_text(v) for v in reply[1 + 5 * i: 6 + 5 * i])
                if holder:
                    out.append(_shown(digest, holder, state, int(at or 0), int(deadline or 0), int(expires or 0),
                                      at_now))
        return out

    def clear(self, task: str, now: Optional[int] = None) -> int:
        index = dedupe_index_key(self.prefix, task)
        dropped = 0
        while True:
            digests = [_text(d) for d in self.connector.run(lambda c: c.zrange(index, 0, BATCH - 1),
                                                            what="ZRANGE dedupe index")]
            if not digests:
                return dropped
            keys = [index, *(dedupe_lock_key(self.prefix, task, d) for d in digests)]
            dropped += int(self.connector.evalsha("dedupe_drop", keys, [*digests, self._now(now)]))
