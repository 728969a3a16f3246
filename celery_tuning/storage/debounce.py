"""Where debounced calls wait (``@debounce``): one interface, an in-process reference and a Redis (Lua) store.

Each debounced task has its keys under one hash tag (its name), so every script of a task runs in
one Cluster slot. Per *key* (the digest of what the task's ``key=`` returns, ``-`` for the task
alone) there is at most one **pending** run (an id, the latest call's payload, its first call and
due time) and at most one **in-flight** run (claimed by a mover, published, or running in a
worker) that holds the key, so the pending one is not published while the previous may still run::

    call ──> pending ──(due, key free) claim──> in flight 'c' ──ack──> 'a' ──start──> 'r' ──end──> gone
             call: collapses (latest payload,        │ claim expires: claimed again (pub + 1)
                   due moved, first kept)            'a'/'r' mark expires: forgotten (key free)

Each claim raises the run's ticket ``pub`` (kept per task id for the ticket TTL); a worker starts
a run only when its message's pub is not below the ticket's, so a copy published by a mover that
died before acknowledging is dropped (as parked entries are: :mod:`.park`).

Time is integer microseconds by the Redis server's clock; tests pass a manual clock to both stores.
:class:`MemoryDebounceStore` is the reference the ``debounce_*.lua`` scripts mirror (a contract
test holds them together).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Protocol, Tuple

from ..policy.debounce import due_us
from .gcra import now_us
from .keys import DebounceKeys, debounce_keys
from .process import PerProcess
from .redis import RedisConnector
from .tickets import DEFAULT_TICKET_TTL_US, TRIM_PER_CALL, RedisHeldStore
from .tickets import reply_text as _text
from .tickets import ticket_pub as _ticket_pub

__all__ = [
    "STALE_DUPLICATE",
    "STARTED_UNMARKED",
    "STARTED_WITH_MARK",
    "DebounceClaimed",
    "DebounceEntry",
    "DebounceKeys",
    "DebounceStore",
    "MemoryDebounceStore",
    "RedisDebounceStore",
    "debounce_keys",
]

#: :meth:`DebounceStore.start` answers.
STALE_DUPLICATE, STARTED_WITH_MARK, STARTED_UNMARKED = 0, 1, 2


class DebounceClaimed(NamedTuple):
    """A run a mover claimed: publish ``payload`` as task ``task_id`` with ``pub`` in its header, then ack."""

    digest: str
    task_id: str
    payload: str
    pub: int


class DebounceEntry(NamedTuple):
    """One key's state (tests, diagnostics); None fields are absent."""

    pending_id: Optional[str]
    first_us: Optional[int]
    due_us: Optional[int]
    in_flight_id: Optional[str]
    #: 'c' claimed by a mover, 'a' published, 'r' running.
    state: Optional[str]
    expires_us: Optional[int]
    pub: Optional[int]
    #: When a mover looks at the key next.
    look_us: Optional[int]


class DebounceStore(Protocol):
    """Debounced runs of every task. Every operation is atomic; work per call is bounded."""

    def call(self, task: str, digest: str, task_id: str, payload: str, delay_us: int,
             max_wait_us: Optional[int] = None, own_id: bool = False) -> Tuple[str, bool]:
        """A call for key ``digest``: becomes the pending run ``task_id`` (False), or collapses into the
        pending run (True) whose id is returned: its payload becomes ``payload``, its due time
        ``min(now + delay, first + max_wait)``. With ``own_id`` (the caller gave ``task_id`` and waits
        for that id) a pending run of another id is left as it is and its id answered (True): the
        caller publishes its call at once."""

    def claim(self, task: str, batch: int, claim_ttl_us: int) -> List[DebounceClaimed]:
        """The runs to publish now: due pending runs of keys no other run holds, and runs whose
        claim expired (claimed again); each claimed until now + ``claim_ttl_us`` with pub + 1.
        Looks at up to ``batch`` keys."""

    def ack(self, task: str, digest: str, task_id: str, pub: int, sent_ttl_us: int) -> bool:
        """The mover published the run it claimed with ``pub``: it holds the key ``sent_ttl_us``
        more (until a worker starts it); True when that claim still owned it."""

    def start(self, task: str, digest: str, task_id: str, pub: int, lease_ttl_us: int) -> int:
        """A worker is about to run ``task_id`` published with ``pub``: :data:`STALE_DUPLICATE`
        (drop it), :data:`STARTED_WITH_MARK` (it holds the key until now + ``lease_ttl_us``) or
        :data:`STARTED_UNMARKED` (another run holds the key)."""

    def renew(self, task: str, digest: str, task_id: str, lease_ttl_us: int) -> int:
        """Extend the running mark: 1 renewed, 2 re-created (it was lost), 0 another run holds the key."""

    def requeue(self, task: str, digest: str, task_id: str, queued_ttl_us: int) -> bool:
        """Run ``task_id`` was published again under its own id (``Task.retry``, a deferral, a park):
        it keeps the key, as published and not started, until now + ``queued_ttl_us`` (or its next
        attempt's start, or its end); True when it held the key."""

    def unclaim(self, task: str, digest: str, task_id: str, pub: int, rest_us: int) -> bool:
        """Give back a run claimed with ``pub`` without publishing it (another app's): its claim
        expires in ``rest_us``, when a mover claims it again; True when that claim owned it."""

    def end(self, task: str, digest: str, task_id: str) -> bool:
        """The run ended: clear its mark (True when it held it); the pending run is due at its due time."""

    def next_due_us(self, task: str) -> Optional[int]:
        """The earliest time a mover should look at any key of ``task`` (µs), or None."""

    def entry(self, task: str, digest: str) -> Optional[DebounceEntry]:
        """One key's state, or None when it has none. Read-only."""

    def now_us(self) -> int:
        """Now by the store's clock (µs)."""


def _ordered(zset: Dict[str, int]) -> List[Tuple[str, int]]:
    # Redis orders a sorted set by score, then by member bytes (code-point order for str).
    return sorted(zset.items(), key=lambda item: (item[1], item[0]))


class _Key:
    """One key's fields (the ``<digest>:<field>`` entries of the ``runs`` hash)."""

    __slots__ = ("b", "f", "i", "m", "n", "p", "s", "t", "x")

    def __init__(self) -> None:
        self.p: Optional[str] = None
        self.m: Optional[str] = None
        self.f: Optional[int] = None
        self.t: Optional[int] = None
        self.i: Optional[str] = None
        self.b: Optional[str] = None
        self.s: Optional[str] = None
        self.x: Optional[int] = None
        self.n: Optional[int] = None

    def drop_pending(self) -> None:
        self.p = self.m = None
        self.f = self.t = None

    def drop_in_flight(self) -> None:
        self.i = self.b = self.s = None
        self.x = self.n = None

    @property
    def empty(self) -> bool:
        return self.p is None and self.m is None and self.i is None


class _TaskState:
    __slots__ = ("due", "runs", "tix", "tixat")

    def __init__(self) -> None:
        self.due: Dict[str, int] = {}
        self.runs: Dict[str, _Key] = {}
        self.tix: Dict[str, str] = {}
        self.tixat: Dict[str, int] = {}

    def key(self, digest: str) -> _Key:
        found = self.runs.get(digest)
        if found is None:
            found = self.runs[digest] = _Key()
        return found

    def tidy(self, digest: str) -> None:
        found = self.runs.get(digest)
        if found is not None and found.empty:
            del self.runs[digest]

    def trim(self, now: int) -> None:
        for task_id, _ in _ordered({k: v for k, v in self.tixat.items() if v <= now})[:TRIM_PER_CALL]:
            del self.tixat[task_id]
            self.tix.pop(task_id, None)

    def next_pub(self, task_id: str, now: int, ticket_ttl_us: int) -> int:
        ticket = self.tix.get(task_id)
        pub = (_ticket_pub(ticket) if ticket is not None else 0) + 1
        self.tix[task_id] = str(pub)
        self.tixat[task_id] = now + ticket_ttl_us
        return pub


class _Debounced:
    __slots__ = ("lock", "tasks")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: Dict[str, _TaskState] = {}


class MemoryDebounceStore:
    """Debounced runs in this process only: the reference for the contract test.

    Mirrors the ``debounce_*.lua`` scripts exactly (keys' TTLs aside). A forked child starts empty.

    Arguments:
        clock: Now in integer microseconds (inject a manual clock in tests).
        ticket_ttl_us: How long a ticket is kept after its last change (``tuning_park_ticket_ttl``).
    """

    def __init__(self, clock: Callable[[], int] = now_us, ticket_ttl_us: int = DEFAULT_TICKET_TTL_US) -> None:
        self.clock = clock
        self.ticket_ttl_us = int(ticket_ttl_us)
        self._process: PerProcess[_Debounced] = PerProcess(_Debounced, name="memory debounced runs")

    def _state(self, task: str) -> _TaskState:
        tasks = self._process.get().tasks
        state = tasks.get(task)
        if state is None:
            state = tasks[task] = _TaskState()
        return state

    @property
    def _lock(self) -> threading.Lock:
        return self._process.get().lock

    def call(self, task: str, digest: str, task_id: str, payload: str, delay_us: int,
             max_wait_us: Optional[int] = None, own_id: bool = False) -> Tuple[str, bool]:
        with self._lock:
            now = self.clock()
            state = self._state(task)
            state.trim(now)
            key = state.key(digest)
            collapsed = key.p is not None
            if collapsed and own_id and key.p != task_id:
                return str(key.p), True
            if not collapsed:
                key.p, key.f = task_id, now
            first = key.f if key.f is not None else now
            key.m = payload
            key.t = due_us(now, first, int(delay_us), None if max_wait_us is None else int(max_wait_us))
            state.due[digest] = key.x if key.x is not None else key.t
            return str(key.p), collapsed

    def claim(self, task: str, batch: int, claim_ttl_us: int) -> List[DebounceClaimed]:
        with self._lock:
            now = self.clock()
            state = self._state(task)
            state.trim(now)
            until = now + int(claim_ttl_us)
            ready = _ordered({k: v for k, v in state.due.items() if v <= now})[:max(0, batch)]
            out: List[DebounceClaimed] = []
            for digest, _ in ready:
                key = state.key(digest)
                if key.i is not None and (key.x is None or key.x <= now) and (key.s != "c" or key.b is None):
                    key.drop_in_flight()  # its worker died, or its message never arrived
                if key.i is not None and key.b is not None and (key.x is None or key.x <= now):
                    pub = state.next_pub(key.i, now, self.ticket_ttl_us)  # its mover died: again
                    key.n, key.x = pub, until
                    state.due[digest] = until
                    out.append(DebounceClaimed(digest, key.i, key.b, pub))
                elif key.i is not None:
                    state.due[digest] = key.x if key.x is not None else now
                elif key.p is not None and key.t is not None and key.t <= now:
                    run_id, payload = key.p, key.m
                    key.drop_pending()
                    if payload is not None:
                        pub = state.next_pub(run_id, now, self.ticket_ttl_us)
                        key.i, key.b, key.s, key.x, key.n = run_id, payload, "c", until, pub
                        state.due[digest] = until
                        out.append(DebounceClaimed(digest, run_id, payload, pub))
                    else:
                        del state.due[digest]
                elif key.p is not None and key.t is not None:
                    state.due[digest] = key.t
                else:
                    key.drop_pending()
                    del state.due[digest]
                state.tidy(digest)
            return out

    def _settle_claim(self, task: str, digest: str, task_id: str, pub: int, published: bool, ttl_us: int) -> bool:
        """A mover's claim of ``task_id`` (pub ``pub``) ends: published (held ``ttl_us`` until started)
        or given back (claimable again in ``ttl_us``); False when that claim is no longer held."""
        with self._lock:
            now = self.clock()
            state = self._state(task)
            key = state.runs.get(digest)
            if key is None or key.i != task_id or key.s != "c" or key.n != int(pub):
                return False
            if published:
                key.s, key.b = "a", None
            key.x = now + int(ttl_us)
            state.due[digest] = key.x
            return True

    def ack(self, task: str, digest: str, task_id: str, pub: int, sent_ttl_us: int) -> bool:
        return self._settle_claim(task, digest, task_id, pub, True, sent_ttl_us)

    def start(self, task: str, digest: str, task_id: str, pub: int, lease_ttl_us: int) -> int:
        with self._lock:
            now = self.clock()
            state = self._state(task)
            state.trim(now)
            ticket = state.tix.get(task_id)
            if ticket is not None and _ticket_pub(ticket) > int(pub):
                return STALE_DUPLICATE
            state.tix[task_id] = f"{int(pub)}:r"
            state.tixat[task_id] = now + self.ticket_ttl_us
            key = state.key(digest)
            if key.i is not None and key.i != task_id and ((key.x is not None and key.x > now) or key.s == "c"):
                return STARTED_UNMARKED
            key.i, key.s, key.x, key.n, key.b = task_id, "r", now + int(lease_ttl_us), int(pub), None
            state.due[digest] = key.x
            return STARTED_WITH_MARK

    def renew(self, task: str, digest: str, task_id: str, lease_ttl_us: int) -> int:
        with self._lock:
            now = self.clock()
            state = self._state(task)
            key = state.key(digest)
            if key.i is not None and key.i != task_id:
                return 0
            done = 1
            if key.i is None:
                done = 2
                key.i, key.n = task_id, 0
            key.s, key.x, key.b = "r", now + int(lease_ttl_us), None
            state.due[digest] = key.x
            return done

    def requeue(self, task: str, digest: str, task_id: str, queued_ttl_us: int) -> bool:
        with self._lock:
            now = self.clock()
            state = self._state(task)
            key = state.runs.get(digest)
            if key is None or key.i != task_id:
                return False
            key.s, key.x, key.b = "a", now + int(queued_ttl_us), None
            state.due[digest] = key.x
            return True

    def unclaim(self, task: str, digest: str, task_id: str, pub: int, rest_us: int) -> bool:
        return self._settle_claim(task, digest, task_id, pub, False, rest_us)

    def end(self, task: str, digest: str, task_id: str) -> bool:
        with self._lock:
            state = self._state(task)
            key = state.runs.get(digest)
            if key is None or key.i != task_id:
                return False
            key.drop_in_flight()
            if key.t is not None:
                state.due[digest] = key.t
            else:
                state.due.pop(digest, None)
            state.tidy(digest)
            return True

    def next_due_us(self, task: str) -> Optional[int]:
        with self._lock:
            due = self._state(task).due
            return min(due.values()) if due else None

    def entry(self, task: str, digest: str) -> Optional[DebounceEntry]:
        with self._lock:
            state = self._state(task)
            key = state.runs.get(digest)
            look = state.due.get(digest)
            if key is None and look is None:
                return None
            key = key or _Key()
            return DebounceEntry(key.p, key.f, key.t, key.i, key.s, key.x, key.n, look)

    def now_us(self) -> int:
        return self.clock()


class RedisDebounceStore(RedisHeldStore):
    """Debounced runs in Redis (keys: :func:`debounce_keys`); one script per call.

    Raises :class:`~celery_tuning.errors.StorageError` when Redis fails.

    Arguments:
        connector: The tuning Redis.
        prefix: ``tuning_key_prefix``.
        clock: Now in µs sent to the scripts (tests); None, the default: the Redis server's TIME.
        ticket_ttl_us: How long a ticket is kept after its last change (``tuning_park_ticket_ttl``).
    """

    def __init__(self, connector: RedisConnector, prefix: str = "tuning",
                 clock: Optional[Callable[[], int]] = None, ticket_ttl_us: int = DEFAULT_TICKET_TTL_US) -> None:
        super().__init__(connector, prefix, clock, ticket_ttl_us)
        self._keys: Dict[str, DebounceKeys] = {}

    def keys(self, task: str) -> DebounceKeys:
        """The task's keys (cached)."""
        found = self._keys.get(task)
        if found is None:
            found = self._keys[task] = debounce_keys(self.prefix, task)
        return found

    def _run(self, script: str, task: str, args: Iterable[Any]) -> Any:
        now = "" if self.clock is None else int(self.clock())
        return self.connector.evalsha(script, list(self.keys(task)), [now, self.ticket_ttl_us, *args])

    def call(self, task: str, digest: str, task_id: str, payload: str, delay_us: int,
             max_wait_us: Optional[int] = None, own_id: bool = False) -> Tuple[str, bool]:
        run_id, collapsed = self._run("debounce_call", task, [
            digest, task_id, payload, int(delay_us), "" if max_wait_us is None else int(max_wait_us),
            "1" if own_id else ""])
        return _text(run_id), bool(int(collapsed))

    def claim(self, task: str, batch: int, claim_ttl_us: int) -> List[DebounceClaimed]:
        reply = self._run("debounce_claim", task, [int(batch), int(claim_ttl_us)])
        return [DebounceClaimed(_text(reply[i]), _text(reply[i + 1]), _text(reply[i + 2]), int(reply[i + 3]))
                for i in range(0, len(reply), 4)]

    def ack(self, task: str, digest: str, task_id: str, pub: int, sent_ttl_us: int) -> bool:
        return bool(int(self._run("debounce_ack", task, [digest, task_id, int(pub), int(sent_ttl_us)])))

    def start(self, task: str, digest: str, task_id: str, pub: int, lease_ttl_us: int) -> int:
        return int(self._run("debounce_start", task, [digest, task_id, int(pub), int(lease_ttl_us)]))

    def renew(self, task: str, digest: str, task_id: str, lease_ttl_us: int) -> int:
        return int(self._run("debounce_renew", task, [digest, task_id, int(lease_ttl_us)]))

    def requeue(self, task: str, digest: str, task_id: str, queued_ttl_us: int) -> bool:
        return bool(int(self._run("debounce_requeue", task, [digest, task_id, int(queued_ttl_us)])))

    def unclaim(self, task: str, digest: str, task_id: str, pub: int, rest_us: int) -> bool:
        return bool(int(self._run("debounce_unclaim", task, [digest, task_id, int(pub), int(rest_us)])))

    def end(self, task: str, digest: str, task_id: str) -> bool:
        return bool(int(self._run("debounce_end", task, [digest, task_id])))

    def next_due_us(self, task: str) -> Optional[int]:
        due = self.keys(task).due
        head = self.connector.run(lambda c: c.zrange(due, 0, 0, withscores=True), what="ZRANGE debounced due")
        return int(head[0][1]) if head else None

    def entry(self, task: str, digest: str) -> Optional[DebounceEntry]:
        reply = self.connector.evalsha("debounce_entry", list(self.keys(task)), [digest])
        if all(value is None for value in reply):
            return None
        p, f, t, i, s, x, n, look = (None if v is None else _text(v) for v in reply)
        return DebounceEntry(p, _int(f), _int(t), i, s, _int(x), _int(n), _int(look))


def _int(value: Optional[str]) -> Optional[int]:
    return None if value is None else int(float(value))
