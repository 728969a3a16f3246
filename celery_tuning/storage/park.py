"""Where parked tasks wait (issue #17): one interface, an in-process reference and a Redis (Lua) store.

A *spot* is (reason, name): every task deferred for one reason by one limiter, concurrency limit
or breaker. An entry is a park id (``f"{task_id}:{deferral_count}"``) with its payload (JSON text),
either *due* at a time, *waiting* in FIFO order for a concurrency slot, or *claimed* by a mover
that is publishing it. Each claim raises the entry's ticket ``pub``; the mover acks with it, the
worker redeems with it, so a message published twice (a mover died after publishing) runs once.

Entry life::

    park(delay) ──> due ──claim──> claimed ──ack──> gone (its ticket stays, to drop duplicates)
    park(FIFO)  ──> wait ──promote / release_lease──> due
                         claimed ──claim expiry──> due (pub + 1 at the next claim)
    redeem(pub) : the worker runs the message: the entry goes, the ticket says "redeemed"

Hand-over of concurrency slots: an acked entry's id stays in the spot's *published* set until it is
redeemed (it arrived) or its claim's expiry passes, so promotion counts the waiters on their way
to a worker. A woken waiter that finds no free slot may become the limit's *standby*
(:meth:`ParkStore.standby`, one per limit): it holds on in its worker and takes the next slot a
release frees (releases announce themselves on the standby channel while one waits), instead of
parking again and coming back through a mover and the broker. Promotion aims at the cap plus the
standby slots, so a waiter is always on its way to become the next standby.

The spots of a per-key concurrency limit's caller keys (``<limit>:k:<digest>``) are listed apart:
the index holds their limit once, and the limit's key index the digests of the keys whose spot
holds due, waiting or claimed entries. A key joins it with its first entry and leaves it in the
script that removes its last, so the movers' rounds cost what the keys with entries cost, never
what every key that ever parked would. Such spots have no standby (see the concurrency step).

Time is integer microseconds by the Redis server's clock (``server_clock.lua``); tests pass a
manual clock to both stores. :class:`MemoryParkStore` is the reference the Lua scripts mirror
(a differential state machine holds them together).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Protocol, Set, Tuple

from . import keys
from .gcra import now_us
from .keys import ParkHandoverKeys, ParkKeys
from .lease import LeaseStore, MemoryLeaseStore
from .process import PerProcess
from .redis import RedisConnector
from .tickets import DEFAULT_TICKET_TTL_US, RedisHeldStore
from .tickets import ticket_pub as _ticket_pub

__all__ = [
    "REASONS",
    "Claimed",
    "MemoryParkStore",
    "ParkSnapshot",
    "ParkStore",
    "RedisParkStore",
    "Spot",
]

#: The reasons a task parks for.
REASONS = ("rate_limit", "concurrency", "circuit_open")

#: Bounded work per call: tickets trimmed, expired claims put back, entries moved by promote/release.
TRIM_PER_CALL = 100
RECLAIM_PER_CALL = 1000
MOVE_PER_CALL = 1000


class Spot(NamedTuple):
    """Where entries park: ``reason`` ("rate_limit" | "concurrency" | "circuit_open") and the limiter /
    concurrency limit / breaker ``name``."""

    reason: str
    name: str


class Claimed(NamedTuple):
    """One entry a mover claimed: publish ``payload`` with ``pub`` in its header, then ack with ``pub``."""

    park_id: str
    payload: str
    pub: int


class ParkSnapshot(NamedTuple):
    """One spot's counts, for the CLI and the gauge."""

    due: int
    waiting: int
    claimed: int
    #: Earliest due time (µs), or None when nothing is due.
    next_due_us: Optional[int]
    #: The head's score: the earliest of the first waiter's park time and the earliest due time
    #: (µs), or None when empty. ``now - oldest_us`` is how long the head has been waiting to run
    #: (negative: not due yet).
    oldest_us: Optional[int]
    #: Published by a mover and not redeemed yet (expired ones not yet dropped included).
    published: int = 0
    #: Standbys holding on for a slot (expired ones not yet dropped included).
    standbys: int = 0


class ParkStore(Protocol):
    """Parked entries of every spot. Every operation is atomic; work per call is bounded."""

    def park(self, spot: Spot, park_id: str, payload: str, delay_us: Optional[int],
             seq_us: Optional[int] = None) -> bool:
        """Park an entry due in ``delay_us`` µs, or (None) as a FIFO waiter with score ``seq_us`` (or now).

        Re-parking an id that exists replaces its payload and position; a ticket it has gets a
        higher ``pub`` (earlier publications of it become stale duplicates). False, and nothing
        parked, when the id's ticket is redeemed: that call already ran (its original message was
        redelivered after the worker that parked it died before acking).
        """

    def claim(self, spot: Spot, batch: int, claim_ttl_us: int) -> List[Claimed]:
        """Expired claims go back to due (score now); then up to ``batch`` due entries, oldest due
        first, are claimed until now + ``claim_ttl_us`` with their ticket's ``pub`` + 1. Entries
        whose payload is gone, or whose ticket says they already ran, are dropped."""

    def ack(self, spot: Spot, park_id: str, pub: int) -> bool:
        """The mover published: drop the entry if its ticket's pub is still ``pub``; True when it was."""

    def unclaim(self, spot: Spot, park_id: str, pub: int, delay_us: int = 0) -> bool:
        """Give back an entry claimed with ``pub`` that this mover must not publish, due again
        ``delay_us`` from now; True when that claim still owned it."""

    def redeem(self, spot: Spot, park_id: str, pub: int) -> bool:
        """May the worker run the message published with ``pub``? False only for a stale duplicate
        (the ticket's pub is higher). Missing ticket: True (never lose a task); the same pub again:
        True. Marks the ticket redeemed and drops the entry."""

    def seen(self, spot: Spot, park_id: str) -> bool:
        """Whether ``park_id`` was parked at ``spot`` (its entry or its ticket is there: parked,
        claimed, published or run). Read-only."""

    def promote(self, spot: Spot, lease_key: str, cap: int, standby: int = 0) -> int:
        """Move FIFO heads to due (score now): as many as slots are free, i.e. ``cap`` plus
        ``standby`` (standby slots) minus the live leases in ``lease_key``, the spot's entries
        already due, claimed or published (expiry after now) and the live standbys. Expired
        published ids are dropped first. Returns how many moved."""

    def release_lease(self, spot: Spot, lease_key: str, lease_id: str, cap: int, standby: int = 0) -> None:
        """Give lease ``lease_id`` back and promote one waiter if that frees a slot, atomically;
        a live standby of the spot is told (:meth:`standby_bell`)."""

    def standby(self, spot: Spot, token: str, ttl_us: int, slots: int = 1) -> bool:
        """Hold on as a standby (``token``) for ``ttl_us`` µs, if fewer than ``slots`` live
        standbys hold on at ``spot`` (expired ones are dropped first). True when it does."""

    def unstandby(self, spot: Spot, token: str) -> bool:
        """Stop holding on; True when ``token`` was a standby."""

    def standby_bell(self, spot: Spot) -> threading.Event:
        """An event set whenever a lease of ``spot``'s limit is released while a standby holds on
        (best effort: also retry on a timer). Subscribed before it returns, when it can be.
        Give it back with :meth:`standby_unbell`."""

    def standby_unbell(self, spot: Spot, bell: threading.Event) -> None:
        """Stop ringing ``bell``."""

    def next_due_us(self, spot: Spot) -> Optional[int]:
        """The earliest due time (µs), or None."""

    def now_us(self) -> int:
        """Now by the store's clock (µs)."""

    def snapshot(self, spot: Spot) -> ParkSnapshot:
        """The spot's counts."""

    def release(self, spot: Spot) -> int:
        """Everything waiting or due later becomes due now; returns how many entries moved."""

    def purge(self, spot: Spot) -> int:
        """Drop every entry of the spot (tickets stay); returns how many."""

    def spots(self) -> List[Spot]:
        """The spots that may hold entries (from the index, sorted). A caller key's spot of a
        per-key concurrency limit is listed only while it holds due, waiting or claimed entries."""


def _keyed(spot: Spot) -> Optional[Tuple[str, str]]:
    """(limit, key digest) of a caller key's concurrency spot, else None."""
    if spot.reason != "concurrency":
        return None
    limit, key_hash = keys.split_keyed_spot(spot.name)
    return None if key_hash is None else (limit, key_hash)


def _check_spot(spot: Spot) -> None:
    keys.park_reason_code(spot.reason)  # raises ConfigurationError for an unknown reason


def _ordered(zset: Dict[str, int]) -> List[Tuple[str, int]]:
    # Redis orders a sorted set by score, then by member bytes (code-point order for str).
    return sorted(zset.items(), key=lambda item: (item[1], item[0]))


class _SpotState:
    __slots__ = ("claim", "due", "msg", "pub", "standby", "tix", "tixat", "wait")

    def __init__(self) -> None:
        self.due: Dict[str, int] = {}
        self.wait: Dict[str, int] = {}
        self.msg: Dict[str, str] = {}
        self.claim: Dict[str, int] = {}
        self.tix: Dict[str, str] = {}
        self.tixat: Dict[str, int] = {}
        self.pub: Dict[str, int] = {}
        self.standby: Dict[str, int] = {}

    def drop(self, park_id: str) -> None:
        for zset in (self.due, self.wait, self.claim):
            zset.pop(park_id, None)
        self.msg.pop(park_id, None)

    def trim(self, now: int) -> None:
        for park_id, _ in _ordered({k: v for k, v in self.tixat.items() if v <= now})[:TRIM_PER_CALL]:
            del self.tixat[park_id]
            self.tix.pop(park_id, None)


class _Parked:
    __slots__ = ("index", "keyed", "keyed_limits", "lock", "spots")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spots: Dict[Spot, _SpotState] = {}
        self.index: Set[Spot] = set()
        #: Limits whose caller keys parked (the index's ``ck:<limit>`` members).
        self.keyed_limits: Set[str] = set()
        #: Limit -> digests of its caller keys whose spot holds entries (the key indexes).
        self.keyed: Dict[str, Set[str]] = {}


class _Bells:
    """One process's standby bells: spot -> the events its releases set."""

    __slots__ = ("by_spot", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_spot: Dict[Spot, Set[threading.Event]] = {}

    def add(self, spot: Spot) -> threading.Event:
        bell = threading.Event()
        with self.lock:
            self.by_spot.setdefault(Spot(*spot), set()).add(bell)
        return bell

    def remove(self, spot: Spot, bell: threading.Event) -> None:
        with self.lock:
            bells = self.by_spot.get(Spot(*spot))
            if bells is not None:
                bells.discard(bell)
                if not bells:
                    del self.by_spot[Spot(*spot)]

    def ring(self, spot: Spot) -> None:
        with self.lock:
            bells = list(self.by_spot.get(Spot(*spot), ()))
        for bell in bells:
            bell.set()


class MemoryParkStore:
    """Parked entries in this process only: the reference for the contract and differential tests.

    Mirrors the ``park_*.lua`` scripts exactly (keys' TTLs aside). A forked child starts empty.

    Arguments:
        clock: Now in integer microseconds (inject a manual clock in tests).
        leases: The lease store whose live leases :meth:`promote` counts (the concurrency
            limits' store); a private in-process one by default.
        ticket_ttl_us: How long a ticket is kept after its last change (``tuning_park_ticket_ttl``).
    """

    def __init__(self, clock: Callable[[], int] = now_us, leases: Optional[LeaseStore] = None,
                 ticket_ttl_us: int = DEFAULT_TICKET_TTL_US) -> None:
        self.clock = clock
        self.leases: LeaseStore = leases if leases is not None else MemoryLeaseStore(clock=clock)
        self.ticket_ttl_us = int(ticket_ttl_us)
        self._process: PerProcess[_Parked] = PerProcess(_Parked, name="memory parked tasks")
        self._bells: PerProcess[_Bells] = PerProcess(_Bells, name="memory standby bells")

    def _state(self, spot: Spot) -> _SpotState:
        _check_spot(spot)
        spots = self._process.get().spots
        state = spots.get(spot)
        if state is None:
            state = spots[spot] = _SpotState()
        return state

    @property
    def _lock(self) -> threading.Lock:
        return self._process.get().lock

    def _stamp(self, state: _SpotState, park_id: str, ticket: str, now: int) -> None:
        state.tix[park_id] = ticket
        state.tixat[park_id] = now + self.ticket_ttl_us

    def _unindex(self, spot: Spot, state: _SpotState) -> None:
        keyed = _keyed(spot)
        if keyed is None or state.due or state.wait or state.claim:
            return
        digests = self._process.get().keyed.get(keyed[0])
        if digests is not None:
            digests.discard(keyed[1])
            if not digests:
                del self._process.get().keyed[keyed[0]]

    def park(self, spot: Spot, park_id: str, payload: str, delay_us: Optional[int],
             seq_us: Optional[int] = None) -> bool:
        with self._lock:
            now = self.clock()
            parked = self._process.get()
            keyed = _keyed(spot)
            if keyed is None:
                parked.index.add(Spot(*spot))
            else:
                parked.keyed_limits.add(keyed[0])
            held = self._state(spot).tix.get(park_id)
            if held is not None and str(held).endswith(":r"):
                return False
            if keyed is not None:
                parked.keyed.setdefault(keyed[0], set()).add(keyed[1])
            state = self._state(spot)
            state.trim(now)
            state.drop(park_id)
            if delay_us is None:
                state.wait[park_id] = now if seq_us is None else int(seq_us)
            else:
                state.due[park_id] = now + max(0, int(delay_us))
            state.msg[park_id] = payload
            ticket = state.tix.get(park_id)
            if ticket is not None:
                self._stamp(state, park_id, str(_ticket_pub(ticket) + 1), now)
            return True

    def claim(self, spot: Spot, batch: int, claim_ttl_us: int) -> List[Claimed]:
        with self._lock:
            now = self.clock()
            state = self._state(spot)
            state.trim(now)
            expired = _ordered({k: v for k, v in state.claim.items() if v <= now})[:RECLAIM_PER_CALL]
            for park_id, _ in expired:
                del state.claim[park_id]
                state.due[park_id] = now
            if batch <= 0:
                self._unindex(spot, state)
                return []
            ready = _ordered({k: v for k, v in state.due.items() if v <= now})[:batch]
            claimed = []
            for park_id, _ in ready:
                del state.due[park_id]
                payload = state.msg.get(park_id)
                if payload is None:
                    continue
                ticket = state.tix.get(park_id)
                if ticket is not None and ticket.endswith(":r"):
                    del state.msg[park_id]  # it ran already
                    continue
                pub = (_ticket_pub(ticket) if ticket is not None else 0) + 1
                self._stamp(state, park_id, str(pub), now)
                state.claim[park_id] = now + int(claim_ttl_us)
                claimed.append(Claimed(park_id, payload, pub))
            self._unindex(spot, state)
            return claimed

    def ack(self, spot: Spot, park_id: str, pub: int) -> bool:
        with self._lock:
            now = self.clock()
            state = self._state(spot)
            state.trim(now)
            ticket = state.tix.get(park_id)
            if ticket is None or _ticket_pub(ticket) != int(pub):
                return False
            until = state.claim.pop(park_id, None)
            if until is not None and spot.reason == "concurrency":
                state.pub[park_id] = until  # on its way to take a slot
            state.due.pop(park_id, None)
            state.msg.pop(park_id, None)
            self._stamp(state, park_id, ticket, now)
            self._unindex(spot, state)
            return True

    def unclaim(self, spot: Spot, park_id: str, pub: int, delay_us: int = 0) -> bool:
        with self._lock:
            now = self.clock()
            state = self._state(spot)
            ticket = state.tix.get(park_id)
            if ticket is None or _ticket_pub(ticket) != int(pub) or park_id not in state.claim:
                return False
            del state.claim[park_id]
            state.due[park_id] = now + int(delay_us)
            return True

    def redeem(self, spot: Spot, park_id: str, pub: int) -> bool:
        with self._lock:
            now = self.clock()
            state = self._state(spot)
            state.trim(now)
            ticket = state.tix.get(park_id)
            if ticket is not None and _ticket_pub(ticket) > int(pub):
                return False
            self._stamp(state, park_id, f"{int(pub)}:r", now)
            state.drop(park_id)
            state.pub.pop(park_id, None)
            self._unindex(spot, state)
            return True

    def seen(self, spot: Spot, park_id: str) -> bool:
        with self._lock:
            state = self._state(spot)
            return park_id in state.msg or park_id in state.tix

    def _promote(self, state: _SpotState, lease_key: str, cap: int, most: int, now: int) -> int:
        if not state.wait:
            return 0
        for park_id in [k for k, v in state.pub.items() if v <= now]:
            del state.pub[park_id]
        live = self.leases.count(lease_key, now=now)
        standbys = sum(1 for v in state.standby.values() if v > now)
        free = cap - live - len(state.due) - len(state.claim) - len(state.pub) - standbys
        count = max(0, min(free, len(state.wait), most))
        for park_id, _ in _ordered(state.wait)[:count]:
            del state.wait[park_id]
            state.due[park_id] = now
        return count

    def promote(self, spot: Spot, lease_key: str, cap: int, standby: int = 0) -> int:
        with self._lock:
            now = self.clock()
            return self._promote(self._state(spot), lease_key, int(cap) + int(standby), MOVE_PER_CALL, now)

    def release_lease(self, spot: Spot, lease_key: str, lease_id: str, cap: int, standby: int = 0) -> None:
        with self._lock:
            now = self.clock()
            self.leases.release(lease_key, lease_id)
            state = self._state(spot)
            held_on = any(v > now for v in state.standby.values())
            self._promote(state, lease_key, int(cap) + int(standby), 1, now)
        if held_on:
            self._bells.get().ring(spot)

    def standby(self, spot: Spot, token: str, ttl_us: int, slots: int = 1) -> bool:
        with self._lock:
            now = self.clock()
            state = self._state(spot)
            for gone in [k for k, v in state.standby.items() if v <= now]:
                del state.standby[gone]
            if len(state.standby) >= int(slots):
                return False
            state.standby[token] = now + int(ttl_us)
            return True

    def unstandby(self, spot: Spot, token: str) -> bool:
        with self._lock:
            return self._state(spot).standby.pop(token, None) is not None

    def standby_bell(self, spot: Spot) -> threading.Event:
        return self._bells.get().add(spot)

    def standby_unbell(self, spot: Spot, bell: threading.Event) -> None:
        self._bells.get().remove(spot, bell)

    def next_due_us(self, spot: Spot) -> Optional[int]:
        with self._lock:
            due = self._state(spot).due
            return min(due.values()) if due else None

    def now_us(self) -> int:
        return self.clock()

    def snapshot(self, spot: Spot) -> ParkSnapshot:
        with self._lock:
            state = self._state(spot)
            next_due = min(state.due.values()) if state.due else None
            heads = [score for score in (next_due, min(state.wait.values()) if state.wait else None)
                     if score is not None]
            return ParkSnapshot(len(state.due), len(state.wait), len(state.claim), next_due,
                                min(heads) if heads else None, len(state.pub), len(state.standby))

    def release(self, spot: Spot) -> int:
        with self._lock:
            now = self.clock()
            state = self._state(spot)
            later = [park_id for park_id, score in state.due.items() if score > now]
            moved = later + list(state.wait)
            for park_id in moved:
                state.due[park_id] = now
            state.wait.clear()
            return len(moved)

    def purge(self, spot: Spot) -> int:
        with self._lock:
            state = self._state(spot)
            count = len(state.due) + len(state.wait) + len(state.claim)
            state.due.clear()
            state.wait.clear()
            state.claim.clear()
            state.msg.clear()
            self._unindex(spot, state)
            return count

    def spots(self) -> List[Spot]:
        with self._lock:
            parked = self._process.get()
            found = set(parked.index)
            for limit in parked.keyed_limits:
                found.update(Spot("concurrency", keys.keyed_spot_name(limit, digest))
                             for digest in parked.keyed.get(limit, ()))
            return sorted(found)


class RedisParkStore(RedisHeldStore):
    """Parked entries in Redis (see :mod:`celery_tuning.storage.keys` for the layout); one script per call.

    Raises :class:`~celery_tuning.errors.StorageError` when Redis fails.

    Arguments:
        connector: The tuning Redis.
        prefix: ``tuning_key_prefix``.
        clock: Now in µs sent to the scripts (tests); None, the default: the Redis server's TIME.
        ticket_ttl_us: How long a ticket is kept after its last change (``tuning_park_ticket_ttl``).
    """

    def __init__(self, connector: RedisConnector, prefix: str = "tuning",
                 clock: Optional[Callable[[], int]] = None,
                 ticket_ttl_us: int = DEFAULT_TICKET_TTL_US) -> None:
        super().__init__(connector, prefix, clock, ticket_ttl_us)
        self.index_key = keys.park_index_key(prefix)
        self.wake_channel = keys.park_wake_channel(prefix)
        self.standby_channel = keys.park_standby_channel(prefix)
        self._cluster = connector.target.kind == "cluster"
        self._keys: Dict[Spot, ParkKeys] = {}
        self._handover: Dict[Spot, ParkHandoverKeys] = {}
        self._key_index: Dict[Spot, str] = {}
        self._bells: PerProcess[_Bells] = PerProcess(_Bells, name="standby bells")

    def keys(self, spot: Spot) -> ParkKeys:
        """The spot's keys (cached)."""
        found = self._keys.get(spot)
        if found is None:
            found = self._keys[spot] = keys.park_keys(self.prefix, spot.reason, spot.name)
        return found

    def handover_keys(self, spot: Spot) -> ParkHandoverKeys:
        """The spot's published and standby keys (cached)."""
        found = self._handover.get(spot)
        if found is None:
            found = self._handover[spot] = keys.park_handover_keys(self.prefix, spot.reason, spot.name)
        return found

    def key_index(self, spot: Spot) -> str:
        """The key index of the spot's limit (KEYS[9] of every spot script; cached)."""
        found = self._key_index.get(spot)
        if found is None:
            found = self._key_index[spot] = keys.park_key_index_key(self.prefix, spot.reason, spot.name)
        return found

    def _run(self, script: str, spot: Spot, args: Iterable[Any], extra_keys: Tuple[str, ...] = ()) -> Any:
        now = "" if self.clock is None else int(self.clock())
        return self.connector.evalsha(
            script, [*self.keys(spot), *self.handover_keys(spot), self.key_index(spot), *extra_keys],
            [now, self.ticket_ttl_us, *args])

    def park(self, spot: Spot, park_id: str, payload: str, delay_us: Optional[int],
             seq_us: Optional[int] = None) -> bool:
        keyed = _keyed(spot)
        # A caller key's spot is listed under its limit's one member, and by its limit's key index.
        member = (keys.park_index_member(spot.reason, spot.name) if keyed is None
                  else keys.park_keyed_index_member(keyed[0]))
        args = ["" if delay_us is None else int(delay_us), "" if seq_us is None else int(seq_us),
                park_id, payload, member]
        horizon = max(0, int(delay_us or 0))
        if self._cluster:
            # The index has its own slot: a separate script, before the entry exists.
            now = "" if self.clock is None else int(self.clock())
            self.connector.evalsha("park_index", [self.index_key],
                                   [now, self.ticket_ttl_us + horizon, member])
            return bool(int(self._run("park_add", spot, args)))
        return bool(int(self._run("park_add", spot, args, (self.index_key,))))

    def claim(self, spot: Spot, batch: int, claim_ttl_us: int) -> List[Claimed]:
        reply = self._run("park_claim", spot, [int(batch), int(claim_ttl_us), RECLAIM_PER_CALL])
        return [Claimed(_text(reply[i]), _text(reply[i + 1]), int(reply[i + 2])) for i in range(0, len(reply), 3)]

    def ack(self, spot: Spot, park_id: str, pub: int) -> bool:
        return bool(int(self._run("park_ack", spot, [park_id, int(pub), "1" if spot.reason == "concurrency" else ""])))

    def unclaim(self, spot: Spot, park_id: str, pub: int, delay_us: int = 0) -> bool:
        return bool(int(self._run("park_unclaim", spot, [park_id, int(pub), int(delay_us)])))

    def redeem(self, spot: Spot, park_id: str, pub: int) -> bool:
        return bool(int(self._run("park_redeem", spot, [park_id, int(pub)])))

    def seen(self, spot: Spot, park_id: str) -> bool:
        return bool(int(self._run("park_seen", spot, [park_id])))

    def promote(self, spot: Spot, lease_key: str, cap: int, standby: int = 0) -> int:
        return int(self._run("park_promote", spot, [int(cap), MOVE_PER_CALL, "", "", "", int(standby), ""],
                             (lease_key,)))

    def release_lease(self, spot: Spot, lease_key: str, lease_id: str, cap: int, standby: int = 0) -> None:
        # The waiter made due is announced on the wake channel: a mover publishes it at once
        # instead of at its next round. A standby holding on hears the release on its own channel.
        self._run("park_promote", spot, [int(cap), 1, lease_id, self.wake_channel,
                                         keys.park_index_member(spot.reason, spot.name), int(standby),
                                         self.standby_channel], (lease_key,))

    def standby(self, spot: Spot, token: str, ttl_us: int, slots: int = 1) -> bool:
        return bool(int(self._run("park_standby", spot, ["+", token, int(ttl_us), int(slots)])))

    def unstandby(self, spot: Spot, token: str) -> bool:
        return bool(int(self._run("park_standby", spot, ["-", token, "", ""])))

    def standby_bell(self, spot: Spot) -> threading.Event:
        from .pubsub import channel_listener

        bells = self._bells.get()
        listener = channel_listener(self.connector, self.standby_channel)
        listener.add(self._ring)
        if not listener.subscribed.is_set():
            listener.subscribed.wait(1.0)  # once per process: a release sent before would be missed
        return bells.add(spot)

    def standby_unbell(self, spot: Spot, bell: threading.Event) -> None:
        self._bells.get().remove(spot, bell)

    def _ring(self, data: Any) -> None:
        found = keys.park_spot_of(_text(data))
        if found is not None:
            self._bells.get().ring(Spot(*found))

    def next_due_us(self, spot: Spot) -> Optional[int]:
        due = self.keys(spot).due
        head = self.connector.run(lambda c: c.zrange(due, 0, 0, withscores=True), what="ZRANGE parked due")
        return int(head[0][1]) if head else None


    def snapshot(self, spot: Spot) -> ParkSnapshot:
        due, waiting, claimed, next_due, oldest, published, standbys = self._run("park_snapshot", spot, [])
        return ParkSnapshot(int(due), int(waiting), int(claimed), _optional_int(next_due), _optional_int(oldest),
                            int(published), int(standbys))

    def release(self, spot: Spot) -> int:
        total = 0
        while True:
            moved = int(self._run("park_release", spot, [MOVE_PER_CALL]))
            total += moved
            if moved < MOVE_PER_CALL:
                return total

    def purge(self, spot: Spot) -> int:
        return int(self._run("park_purge", spot, []))

    def spots(self) -> List[Spot]:
        members = [_text(m) for m in
                   self.connector.run(lambda c: c.smembers(self.index_key), what="SMEMBERS park index")]
        found = [Spot(*spot) for spot in (keys.park_spot_of(m) for m in members) if spot is not None]
        for limit in sorted(filter(None, (keys.park_keyed_limit_of(m) for m in members))):
            index = keys.park_key_index_key(self.prefix, "concurrency", limit)
            digests = self.connector.run(_members_of(index), what="SMEMBERS park key index")
            named = (keys.keyed_spot_name(limit, _text(d)) for d in digests)
            # A member that is no digest (foreign data) would name another spot: left out.
            found += [Spot("concurrency", name) for name in named if keys.split_keyed_spot(name)[1]]
        found.sort()
        if members:
            # Read by the movers about once a second: a spot whose entries outlive the last park
            # (concurrency waiters queued longer than the ticket TTL) stays listed while movers run.
            self.connector.evalsha("park_index_keep", [self.index_key], [self.ticket_ttl_us])
        return found


def _members_of(key: str) -> Callable[[Any], Any]:
    return lambda client: client.smembers(key)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _optional_int(value: Any) -> Optional[int]:
    return None if value is None or value is False or value == b"" or value == "" else int(value)
