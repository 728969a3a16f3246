"""Where ``@fair`` messages wait for their turn: one interface, an in-process reference and a Redis (Lua) store.

Each queue's keys share one hash tag (the queue name), so every script of a queue runs in one
Cluster slot. A *key* is the digest of what the task's ``key=`` returns (a tenant); each key has a
FIFO list of message ids, and the queue a *ring* of the keys whose list holds ids (each once).
A dispatcher's ``release`` walks the ring from its head: each key gives up to its weight of
messages and goes to the tail while it has more, so the work follows the messages released,
never the number of keys. A message's life::

    add ──> waiting (its key's list) ──release──> claimed + in the window ──ack──> in the window
                                                  claim expiry: released again (pub + 1)
            start(pub): the worker runs it; it leaves the window (a stale pub is dropped)
            window expiry: it leaves the window (lost on its way, or its worker died)
            reject(pub): it could not be published (its task unknown, its options refused): it
                         leaves the window, is tried again after a rest and, once claimed
                         ``attempts`` times, is set aside as *undeliverable* (shown, purged)

The *window* is the queue's released-but-not-started messages: ``release`` takes no more than the
window's room, so the broker queue stays shallow and a new key's message is never behind another
key's backlog. Its size is given, or the sum of the consumers' capacities (each dispatcher
registers its worker's concurrency x prefetch for the queues it consumes, renewed every round).
A key with a concurrency cap (``@concurrency_limit`` on the same task) releases no more than the
cap leaves: its live leases plus its released-not-started messages (single server and Sentinel:
on a Cluster the lease set lives in another slot, and the cap is left to the concurrency step).

Time is integer microseconds by the Redis server's clock; tests pass a manual clock to both stores.
:class:`MemoryFairStore` is the reference the ``fair_*.lua`` scripts mirror (a contract test and a
differential state machine hold them together).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Protocol, Tuple

from . import keys
from .gcra import now_us
from .keys import FairKeys
from .lease import LeaseStore
from .process import PerProcess
from .redis import RedisConnector
from .tickets import DEFAULT_TICKET_TTL_US, TRIM_PER_CALL, RedisHeldStore
from .tickets import reply_text as _text
from .tickets import ticket_pub as _ticket_pub

__all__ = [
    "ADDED",
    "ALREADY_WAITING",
    "RAN",
    "TRY_AGAIN",
    "UNDELIVERABLE",
    "UNDELIVERABLE_MOST",
    "WAKE_PREFIX",
    "FairCap",
    "FairReleased",
    "FairRound",
    "FairSnapshot",
    "FairStore",
    "MemoryFairStore",
    "RedisFairStore",
]

#: :meth:`FairStore.add` answers.
RAN, ADDED, ALREADY_WAITING = 0, 1, 2
#: Lapsed consumer registrations dropped per call.
NODES_PER_CALL = 100
#: What a start announces on the wake channel: this prefix and the queue name.
WAKE_PREFIX = "fq:"
#: Seconds a capped key's started message still counts against its cap: until the worker holds
#: the concurrency lease it takes just after starting it.
START_GRACE_US = 200_000
#: Messages dropped per purge call.
PURGE_PER_CALL = 1000
#: :meth:`FairStore.reject` answers (0: the claim no longer owns the message, nothing changed).
TRY_AGAIN, UNDELIVERABLE = 1, 2
#: Most undeliverable messages a queue keeps (the oldest go first; each goes after the ticket TTL).
UNDELIVERABLE_MOST = 10_000


class FairCap(NamedTuple):
    """A key's concurrency cap: at most ``cap`` leases in ``lease_key`` plus released messages."""

    cap: int
    lease_key: str


class FairReleased(NamedTuple):
    """One message a dispatcher took: publish ``payload`` with ``pub`` in its header, then ack with ``pub``."""

    msg_id: str
    payload: str
    pub: int
    digest: str


class FairRound(NamedTuple):
    """What one ``release`` did."""

    released: List[FairReleased]
    #: Messages still waiting in the queue's key lists.
    waiting: int
    #: The window the release worked with.
    window: int
    #: Messages released and not started now (the window in use).
    in_window: int
    #: Keys with waiting messages.
    keys: int


class FairSnapshot(NamedTuple):
    """One queue's counts (``tuning fair show``, metrics)."""

    waiting: int
    keys: int
    in_window: int
    claimed: int
    released_total: int
    #: The live consumers' capacity (the window when it is not set).
    capacity: int
    #: Messages set aside because they could not be published (see :meth:`FairStore.reject`).
    undeliverable: int
    #: The deepest keys: (digest, waiting), deepest first.
    deepest: List[Tuple[str, int]]


class FairStore(Protocol):
    """Fair-queue messages of every queue. Every operation is atomic; work per call is bounded."""

    def add(self, queue: str, msg_id: str, digest: str, payload: str, weight: int = 1,
            cap: Optional[FairCap] = None) -> int:
        """Message ``msg_id`` joins the end of key ``digest``'s list: :data:`ADDED`, :data:`ALREADY_WAITING`
        (it waits, is claimed, released and not started, or undeliverable: nothing changes) or
        :data:`RAN` (its ticket says it ran).

        The key's weight becomes ``weight``; its cap becomes ``cap`` when given (None leaves a cap
        in place: a capped call is never released only to be refused at its cap). Both go when the
        key's last waiting message leaves."""

    def release(self, queue: str, batch: int, claim_ttl_us: int, window_ttl_us: int, node: str = "",
                capacity: int = 0, node_ttl_us: int = 0, window: Optional[int] = None,
                caps: bool = True) -> FairRound:
        """Take up to ``batch`` messages, round-robin across keys, within the window's room (see the module)."""

    def ack(self, queue: str, msg_id: str, pub: int) -> bool:
        """The dispatcher published ``msg_id`` claimed with ``pub``: True when that claim still owned it."""

    def reject(self, queue: str, msg_id: str, pub: int, rest_us: int, attempts: int,
               most: int = UNDELIVERABLE_MOST) -> int:
        """The dispatcher could not publish ``msg_id`` claimed with ``pub`` (its task unknown to its
        app, its options refused): it leaves the window now. :data:`TRY_AGAIN`: claimed again after
        ``rest_us`` (pub + 1); :data:`UNDELIVERABLE` once it was claimed ``attempts`` times: set
        aside (at most ``most`` per queue, each for the ticket TTL), never released again; 0 when
        that claim no longer owns it (nothing changes)."""

    def start(self, queue: str, msg_id: str, pub: int, digest: str) -> bool:
        """A worker is about to run ``msg_id`` published with ``pub``: False for a stale duplicate (drop it)."""

    def snapshot(self, queue: str, top: int = 10, scan: int = 10_000) -> FairSnapshot:
        """The queue's counts and its ``top`` deepest keys among the first ``scan`` of the ring. Read-only."""

    def purge(self, queue: str, digest: Optional[str] = None) -> int:
        """Drop every waiting, claimed and undeliverable message of the queue, or of its key
        ``digest`` only; how many. A claimed message's ticket goes one publication up: a copy its
        dispatcher publishes meanwhile is dropped at its start, never run. Released (published)
        messages are left to run."""

    def queues(self, keep: bool = False) -> List[str]:
        """The queues that may hold fair messages (the index); ``keep``: a dispatcher that saw
        messages waiting refreshes the index's expiry."""

    def now_us(self) -> int:
        """Now by the store's clock (µs)."""


class _QueueState:
    """One queue's state, the ``fair_*.lua`` keys as Python containers."""

    __slots__ = ("claim", "dead", "kc", "kw", "lists", "msg", "own", "released", "ring", "stat_n", "stat_r",
                 "tix", "tixat", "used", "win", "wk", "wkc")

    def __init__(self) -> None:
        self.ring: List[str] = []
        self.lists: Dict[str, List[str]] = {}
        self.msg: Dict[str, str] = {}
        self.own: Dict[str, str] = {}
        self.claim: Dict[str, int] = {}
        self.win: Dict[str, int] = {}
        self.tix: Dict[str, str] = {}
        self.tixat: Dict[str, int] = {}
        self.kw: Dict[str, int] = {}
        #: Per key: messages taken so far in a turn the batch or the window cut short.
        self.used: Dict[str, int] = {}
        self.kc: Dict[str, FairCap] = {}
        self.wk: Dict[str, int] = {}
        self.wkc: Dict[str, int] = {}
        #: Per capped key: released id -> window expiry.
        self.released: Dict[str, Dict[str, int]] = {}
        #: Undeliverable id -> when it was set aside.
        self.dead: Dict[str, int] = {}
        self.stat_n = 0
        self.stat_r = 0

    def owned(self, msg_id: str, pub: int) -> bool:
        """Whether the claim ``pub`` still owns ``msg_id`` (``fair_owned.lua``)."""
        ticket = self.tix.get(msg_id)
        return (ticket is not None and not ticket.endswith(":r") and _ticket_pub(ticket) == int(pub)
                and msg_id in self.claim)

    def trim(self, now: int) -> None:
        old = sorted(((at, i) for i, at in self.tixat.items() if at <= now))[:TRIM_PER_CALL]
        for _, msg_id in old:
            del self.tixat[msg_id]
            self.tix.pop(msg_id, None)
        for msg_id in _by_score(self.dead, TRIM_PER_CALL, now):  # undeliverable, past its keeping time
            del self.dead[msg_id]
            self.msg.pop(msg_id, None)
            self.own.pop(msg_id, None)


def _by_score(zset: Dict[str, int], most: int, now: int) -> List[str]:
    """Members scored at or before ``now``, as ZRANGEBYSCORE -inf now LIMIT 0 most answers them."""
    return [m for _, m in sorted((s, m) for m, s in zset.items() if s <= now)][:max(0, most)]


class _Fair:
    __slots__ = ("index", "lock", "queues")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: Dict[str, _QueueState] = {}
        self.index: set = set()


class MemoryFairStore:
    """Fair-queue messages in this process only: the reference for the contract test.

    Mirrors the ``fair_*.lua`` scripts exactly (keys' TTLs aside). A forked child starts empty.

    Arguments:
        clock: Now in integer microseconds (inject a manual clock in tests).
        ticket_ttl_us: How long a ticket is kept (``tuning_park_ticket_ttl``).
        leases: The lease store a key's concurrency cap is read from (None: caps are not honoured).
    """

    def __init__(self, clock: Callable[[], int] = now_us, ticket_ttl_us: int = DEFAULT_TICKET_TTL_US,
                 leases: Optional[LeaseStore] = None) -> None:
        self.clock = clock
        self.ticket_ttl_us = int(ticket_ttl_us)
        self.leases = leases
        self._process: PerProcess[_Fair] = PerProcess(_Fair, name="memory fair queues")

    def _state(self, queue: str) -> _QueueState:
        queues = self._process.get().queues
        found = queues.get(queue)
        if found is None:
            found = queues[queue] = _QueueState()
        return found

    @property
    def _lock(self) -> threading.Lock:
        return self._process.get().lock

    def add(self, queue: str, msg_id: str, digest: str, payload: str, weight: int = 1,
            cap: Optional[FairCap] = None) -> int:
        with self._lock:
            now = self.clock()
            q = self._state(queue)
            q.trim(now)
            ticket = q.tix.get(msg_id)
            if ticket is not None and ticket.endswith(":r"):
                return RAN
            if ticket is not None or msg_id in q.msg:
                # Released and not started yet keeps its first arguments, as waiting does.
                return ALREADY_WAITING
            ids = q.lists.setdefault(digest, [])
            ids.append(msg_id)
            if len(ids) == 1:
                q.ring.append(digest)
            q.msg[msg_id] = payload
            q.own[msg_id] = digest
            if int(weight) != 1:
                q.kw[digest] = int(weight)
            else:
                q.kw.pop(digest, None)
            if cap is not None:  # an uncapped call leaves a cap in place (see fair_add.lua)
                q.kc[digest] = FairCap(int(cap.cap), cap.lease_key)
            q.stat_n += 1
            self._process.get().index.add(queue)
            return ADDED

    def _next_pub(self, q: _QueueState, msg_id: str, now: int) -> Optional[int]:
        ticket = q.tix.get(msg_id)
        if ticket is not None and ticket.endswith(":r"):
            return None
        pub = (_ticket_pub(ticket) if ticket is not None else 0) + 1
        q.tix[msg_id] = str(pub)
        q.tixat[msg_id] = now + self.ticket_ttl_us
        return pub

    def release(self, queue: str, batch: int, claim_ttl_us: int, window_ttl_us: int, node: str = "",
                capacity: int = 0, node_ttl_us: int = 0, window: Optional[int] = None,
                caps: bool = True) -> FairRound:
        with self._lock:
            now = self.clock()
            q = self._state(queue)
            q.trim(now)
            if node:
                if int(capacity) > 0:
                    q.wk[node] = now + int(node_ttl_us)
                    q.wkc[node] = int(capacity)
                else:
                    q.wk.pop(node, None)
                    q.wkc.pop(node, None)
            for gone in _by_score(q.wk, NODES_PER_CALL, now):
                del q.wk[gone]
                q.wkc.pop(gone, None)
            size = int(window) if window is not None else sum(q.wkc.get(n, 0) for n in q.wk)
            for msg_id in [m for m, at in q.win.items() if at <= now]:
                del q.win[msg_id]
            claim_until, win_until = now + int(claim_ttl_us), now + int(window_ttl_us)
            out: List[FairReleased] = []

            def take(msg_id: str, digest: str, capped: bool) -> bool:
                payload = q.msg.get(msg_id)
                pub = self._next_pub(q, msg_id, now) if payload is not None else None
                if payload is None or pub is None:
                    q.claim.pop(msg_id, None)
                    q.msg.pop(msg_id, None)
                    q.own.pop(msg_id, None)
                    return False
                q.claim[msg_id] = claim_until
                q.win[msg_id] = win_until
                if capped:
                    q.released.setdefault(digest, {})[msg_id] = win_until
                out.append(FairReleased(msg_id, payload, pub, digest))
                return True

            expired = _by_score(q.claim, int(batch), now)
            for msg_id in expired:
                digest = q.own.get(msg_id, "")
                take(msg_id, digest, bool(digest) and digest in q.kc and caps and self.leases is not None)
            want = min(int(batch) - len(expired), size - len(q.win))
            released = at_cap = in_a_row = 0
            keys_at_start = len(q.ring)
            while released < want and q.ring:
                digest = q.ring.pop(0)
                left = q.kw.get(digest, 1) - q.used.get(digest, 0)
                turn = min(left, want - released)
                cut = turn < left
                capped = False
                cap = q.kc.get(digest) if caps and self.leases is not None else None
                if cap is not None and self.leases is not None:
                    mine = q.released.get(digest, {})
                    for msg_id in [m for m, at in mine.items() if at <= now]:
                        del mine[msg_id]
                    room = cap.cap - self.leases.count(cap.lease_key, now) - len(mine)
                    if room < turn:
                        turn, cut = room, False
                    capped = True
                ids = q.lists.get(digest, [])
                n = 0
                while n < turn and ids:
                    msg_id = ids.pop(0)
                    q.stat_n -= 1
                    if take(msg_id, digest, capped):
                        n += 1
                released += n
                if ids and cut and 0 < n == turn:
                    q.ring.insert(0, digest)  # its turn goes on at the next release
                    q.used[digest] = q.used.get(digest, 0) + n
                elif ids:
                    q.ring.append(digest)
                    q.used.pop(digest, None)
                else:
                    q.lists.pop(digest, None)
                    q.kw.pop(digest, None)
                    q.used.pop(digest, None)
                    q.kc.pop(digest, None)
                if n == 0:
                    at_cap += 1
                    in_a_row += 1
                    if in_a_row >= keys_at_start or at_cap >= int(batch):
                        break
                else:
                    in_a_row = 0
            q.stat_r += released
            return FairRound(out, q.stat_n, size, len(q.win), len(q.ring))

    def ack(self, queue: str, msg_id: str, pub: int) -> bool:
        with self._lock:
            q = self._state(queue)
            q.trim(self.clock())
            if not q.owned(msg_id, pub):
                return False
            del q.claim[msg_id]
            q.msg.pop(msg_id, None)
            q.own.pop(msg_id, None)
            return True

    def reject(self, queue: str, msg_id: str, pub: int, rest_us: int, attempts: int,
               most: int = UNDELIVERABLE_MOST) -> int:
        with self._lock:
            now = self.clock()
            q = self._state(queue)
            q.trim(now)
            if not q.owned(msg_id, pub):
                return 0
            q.win.pop(msg_id, None)
            q.released.get(q.own.get(msg_id, ""), {}).pop(msg_id, None)
            if int(pub) < int(attempts):
                q.claim[msg_id] = now + int(rest_us)
                return TRY_AGAIN
            del q.claim[msg_id]
            q.dead[msg_id] = now + self.ticket_ttl_us  # when it goes (trim drops it then)
            over = len(q.dead) - max(1, int(most))
            for gone in sorted(q.dead, key=lambda m: (q.dead[m], m))[:max(0, over)]:  # the oldest first
                del q.dead[gone]
                q.msg.pop(gone, None)
                q.own.pop(gone, None)
            return UNDELIVERABLE

    def start(self, queue: str, msg_id: str, pub: int, digest: str) -> bool:
        with self._lock:
            now = self.clock()
            q = self._state(queue)
            q.trim(now)
            ticket = q.tix.get(msg_id)
            if ticket is not None and _ticket_pub(ticket) > int(pub):
                return False
            q.tix[msg_id] = f"{int(pub)}:r"
            q.tixat[msg_id] = now + self.ticket_ttl_us
            q.claim.pop(msg_id, None)
            q.win.pop(msg_id, None)
            q.dead.pop(msg_id, None)
            q.msg.pop(msg_id, None)
            q.own.pop(msg_id, None)
            mine = q.released.get(digest, {})
            if msg_id in mine:
                mine[msg_id] = now + START_GRACE_US
            return True

    def snapshot(self, queue: str, top: int = 10, scan: int = 10_000) -> FairSnapshot:
        with self._lock:
            now = self.clock()
            q = self._state(queue)
            capacity = sum(q.wkc.get(n, 0) for n, at in q.wk.items() if at > now)
            depths = [(d, len(q.lists.get(d, []))) for d in q.ring[:max(0, scan)]]
            deepest = sorted(depths, key=lambda pair: (-pair[1], pair[0]))[:max(0, top)]
            return FairSnapshot(q.stat_n, len(q.ring), sum(1 for at in q.win.values() if at > now), len(q.claim),
                                q.stat_r, capacity, len(q.dead), deepest)

    def purge(self, queue: str, digest: Optional[str] = None) -> int:
        with self._lock:
            q = self._state(queue)
            if digest is not None:
                if digest in q.ring:
                    q.ring.remove(digest)
                chosen = [digest]
            else:
                chosen, q.ring = q.ring, []
            dropped = 0
            for key in chosen:
                for msg_id in q.lists.pop(key, []):
                    q.msg.pop(msg_id, None)
                    q.own.pop(msg_id, None)
                    dropped += 1
                q.kw.pop(key, None)
                q.used.pop(key, None)
                q.kc.pop(key, None)
            q.stat_n -= dropped
            now = self.clock()
            for held in (q.claim, q.dead):
                for msg_id in sorted(held):
                    if digest is not None and q.own.get(msg_id) != digest:
                        continue
                    del held[msg_id]
                    ticket = q.tix.get(msg_id)
                    if ticket is not None and not ticket.endswith(":r"):
                        q.tix[msg_id] = str(_ticket_pub(ticket) + 1)
                        q.tixat[msg_id] = now + self.ticket_ttl_us
                    q.win.pop(msg_id, None)
                    q.released.get(q.own.get(msg_id, ""), {}).pop(msg_id, None)
                    q.msg.pop(msg_id, None)
                    q.own.pop(msg_id, None)
                    dropped += 1
            return dropped

    def queues(self, keep: bool = False) -> List[str]:
        with self._lock:
            return sorted(self._process.get().index)

    def now_us(self) -> int:
        return self.clock()


class RedisFairStore(RedisHeldStore):
    """Fair-queue messages in Redis (keys: :func:`~celery_tuning.storage.keys.fair_keys`); one script per call.

    Raises :class:`~celery_tuning.errors.StorageError` when Redis fails.

    Arguments:
        connector: The tuning Redis.
        prefix: ``tuning_key_prefix``.
        clock: Now in µs sent to the scripts (tests); None, the default: the Redis server's TIME.
        ticket_ttl_us: How long a ticket (and an idle queue's keys) are kept (``tuning_park_ticket_ttl``).
    """

    def __init__(self, connector: RedisConnector, prefix: str = "tuning",
                 clock: Optional[Callable[[], int]] = None, ticket_ttl_us: int = DEFAULT_TICKET_TTL_US) -> None:
        super().__init__(connector, prefix, clock, ticket_ttl_us)
        self.index_key = keys.fair_index_key(prefix)
        #: Starts announce freed window room here (the parking movers' channel: one subscription).
        self.wake_channel = keys.park_wake_channel(prefix)
        #: On a Cluster a key's lease set lives in another slot than the queue: caps are not read.
        self.cluster = connector.target.kind == "cluster"
        self._keys: Dict[str, Tuple[FairKeys, str]] = {}

    def keys(self, queue: str) -> Tuple[FairKeys, str]:
        """The queue's keys and stem (cached)."""
        found = self._keys.get(queue)
        if found is None:
            stem = keys.hash_tag(self.prefix, keys.FAIR, queue)
            found = self._keys[queue] = (keys.fair_keys(self.prefix, queue), stem)
        return found

    def _now(self) -> Any:
        return "" if self.clock is None else int(self.clock())

    def _run(self, script: str, queue: str, args: Iterable[Any], extra_keys: Tuple[str, ...] = ()) -> Any:
        fixed, stem = self.keys(queue)
        return self.connector.evalsha(script, [*fixed, *extra_keys], [self._now(), self.ticket_ttl_us, stem, *args])

    def add(self, queue: str, msg_id: str, digest: str, payload: str, weight: int = 1,
            cap: Optional[FairCap] = None) -> int:
        args = [msg_id, digest, payload, int(weight), "" if cap is None else int(cap.cap),
                "" if cap is None else cap.lease_key, queue]
        if self.cluster:
            # The index has its own slot: a separate script, before the message exists.
            self.connector.evalsha("fair_index", [self.index_key], [self.ticket_ttl_us, queue])
            return int(self._run("fair_add", queue, args))
        return int(self._run("fair_add", queue, args, (self.index_key,)))

    def release(self, queue: str, batch: int, claim_ttl_us: int, window_ttl_us: int, node: str = "",
                capacity: int = 0, node_ttl_us: int = 0, window: Optional[int] = None,
                caps: bool = True) -> FairRound:
        reply = self._run("fair_release", queue, [
            int(batch), int(claim_ttl_us), int(window_ttl_us), node, int(capacity), int(node_ttl_us),
            "" if window is None else int(window), "1" if caps and not self.cluster else ""])
        released = [FairReleased(_text(reply[i]), _text(reply[i + 1]), int(reply[i + 2]), _text(reply[i + 3]))
                    for i in range(4, len(reply), 4)]
        return FairRound(released, int(reply[0]), int(reply[1]), int(reply[2]), int(reply[3]))

    def ack(self, queue: str, msg_id: str, pub: int) -> bool:
        return bool(int(self._run("fair_ack", queue, [msg_id, int(pub)])))

    def reject(self, queue: str, msg_id: str, pub: int, rest_us: int, attempts: int,
               most: int = UNDELIVERABLE_MOST) -> int:
        return int(self._run("fair_reject", queue, [msg_id, int(pub), int(rest_us), int(attempts), int(most)]))

    def start(self, queue: str, msg_id: str, pub: int, digest: str) -> bool:
        return bool(int(self._run("fair_start", queue, [msg_id, int(pub), digest, self.wake_channel,
                                                         f"{WAKE_PREFIX}{queue}", START_GRACE_US])))

    def snapshot(self, queue: str, top: int = 10, scan: int = 10_000) -> FairSnapshot:
        fixed, stem = self.keys(queue)
        reply = self.connector.evalsha("fair_show", list(fixed), [self._now(), stem, int(top), int(scan)])
        deepest = [(_text(reply[i]), int(reply[i + 1])) for i in range(7, len(reply), 2)]
        return FairSnapshot(int(reply[0]), int(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]),
                            int(reply[5]), int(reply[6]), deepest)

    def purge(self, queue: str, digest: Optional[str] = None) -> int:
        fixed, stem = self.keys(queue)
        total = 0
        while True:
            dropped = int(self.connector.evalsha("fair_purge", list(fixed), [
                stem, PURGE_PER_CALL, digest or "", self._now(), self.ticket_ttl_us]))
            total += dropped
            if dropped < PURGE_PER_CALL:
                return total

    def queues(self, keep: bool = False) -> List[str]:
        members = self.connector.evalsha("fair_queues", [self.index_key], [self.ticket_ttl_us if keep else ""])
        return sorted(_text(m) for m in members)

