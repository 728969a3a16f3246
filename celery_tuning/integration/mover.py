"""The parking mover: publishes parked calls back to their queues when they are due.

One daemon thread per worker (started by the worker bootstep in the main process when
``tuning_defer_via="park"`` and ``tuning_park_mover``). Each round it walks the spots that may hold
entries (from the store's index, cached about a second), and for each spot:

- a concurrency limit first gets ``promote``: as many FIFO waiters as there are free slots become
  due (this covers leases that expired: a release already promotes in the same script);
- ``claim`` takes up to ``batch`` due entries under a claim that expires after
  ``tuning_park_claim_ttl``; a mover killed mid-way loses nothing, another mover claims them again;
- each claimed entry is published to its queue through the app's producer pool with the
  :data:`~celery_tuning.integration.deferral.HEADER_PARK` header, then acknowledged (``ack``).
  A mover that dies between the two leaves an entry that is published again: the worker-side
  guard drops the older copy by its publication number.

It sleeps until the earliest due entry, at most ``busy_sleep`` (50 ms) while anything is parked
and ``idle_sleep`` (100 ms: how late the first entry of a burst can be published; an idle round
costs one SMEMBERS, plus a claim per spot seen recently) when nothing is; the spot list is read
again on every idle round and at most every ``spots_ttl`` (1 s) while busy. A lease release that
makes a waiter due announces its spot on ``P:park:wake`` in the same script: the mover wakes at
once and claims from that spot alone, so a freed slot's waiter is published within a round trip
or two, not at the next round. Several workers'
movers cooperate through the atomic claim (no election). Redis or broker errors back off (up
to 5 s) and are logged once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Set

from .. import events
from ..errors import StorageError
from ..storage.keys import lease_key, park_spot_of, split_keyed_spot
from ..storage.park import Spot
from .deferral import HEADER_PARK, decode_payload, route_declarations
from .otel import HEADER_TRACE, continued_trace, trace_headers

__all__ = ["ForeignEntry", "Mover", "ParkedRow", "Round", "parked_by_limit", "parked_rows", "parked_snapshot"]

logger = logging.getLogger("celery_tuning.parking")

_MAX_BACKOFF = 5.0
#: Seconds between a mover's counts of what is parked (for the gauge; only while metrics listen).
COUNT_EVERY = 5.0


#: Seconds until another app's entry a mover gave back is due again (for that app's movers).
FOREIGN_REST = 1.0


#: Held while the mover uses the broker's connection pool. The worker's main process forks pool
#: children (at start, on max_tasks_per_child, on a lost child); a child forked while this thread
#: held the pool's lock would inherit it locked and hang for good in kombu's after-fork cleanup
#: (seen once by a review: ForkPoolWorker stuck in redis-py's ConnectionPool.reset). A fork waits
#: for the publish in progress instead.
_NO_FORK_WHILE_PUBLISHING = threading.Lock()


def _release_after_fork() -> None:
    if _NO_FORK_WHILE_PUBLISHING.locked():
        _NO_FORK_WHILE_PUBLISHING.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_NO_FORK_WHILE_PUBLISHING.acquire, after_in_parent=_release_after_fork,
                        after_in_child=_release_after_fork)


class ForeignEntry(Exception):
    """A parked entry whose task the mover's app does not have (another app parked it)."""

    def __init__(self, task: str) -> None:
        super().__init__(task)
        self.task = task


class Round(NamedTuple):
    """What one round of the mover did, and how long it should sleep."""

    published: int
    sleep: float


class ParkedRow(NamedTuple):
    """One spot's counts, for the gauge ``celery_tuning_parked_tasks{reason,name}`` and the CLI."""

    reason: str
    name: str
    due: int
    waiting: int
    claimed: int
    next_due_in: Optional[float]
    oldest_age: Optional[float]
    #: Caller keys of a per-key limit with entries, in a row of :func:`parked_by_limit` (0 otherwise).
    keys: int = 0

    @property
    def parked(self) -> int:
        return self.due + self.waiting + self.claimed


def _limit_of(where: Any) -> str:
    """The name a spot is filed under: a concurrency spot of one caller key belongs to its limit."""
    return split_keyed_spot(where.name)[0] if where.reason == "concurrency" else str(where.name)


def parked_snapshot(store: Any) -> List[ParkedRow]:
    """Every spot's counts (one round trip per spot); for metrics and ``tuning parked``.

    Raises:
        StorageError: When the tuning Redis fails.
    """
    now = store.now_us()
    rows = []
    for where in sorted(store.spots()):
        snap = store.snapshot(where)
        next_in = None if snap.next_due_us is None else max(0.0, (snap.next_due_us - now) / 1e6)
        # A spot whose entries are all due later has no age to show (its scores are due times).
        age = None if snap.oldest_us is None or snap.oldest_us > now else (now - snap.oldest_us) / 1e6
        rows.append(ParkedRow(where.reason, where.name, snap.due, snap.waiting, snap.claimed, next_in, age))
    return rows


def parked_by_limit(rows: List[ParkedRow]) -> List[ParkedRow]:
    """``rows`` with the spots of a per-key limit's caller keys added up under the limit's name
    (``keys``: how many), so neither the CLI nor a metric label ever names a tenant's spot."""
    groups: Dict[Any, List[ParkedRow]] = {}
    for row in rows:
        groups.setdefault((row.reason, _limit_of(row)), []).append(row)
    out = []
    for (reason, name), group in sorted(groups.items()):
        nexts = [r.next_due_in for r in group if r.next_due_in is not None]
        ages = [r.oldest_age for r in group if r.oldest_age is not None]
        keyed = sum(1 for r in group if r.name != name)
        out.append(ParkedRow(reason, name, sum(r.due for r in group), sum(r.waiting for r in group),
                             sum(r.claimed for r in group), min(nexts) if nexts else None,
                             max(ages) if ages else None, keyed))
    return out


def parked_rows(app: Any) -> List[ParkedRow]:
    """:func:`parked_snapshot` of ``app``'s park store (the gauge ``celery_tuning_parked_tasks``).

    Raises:
        StorageError: When the tuning Redis fails.
    """
    from .runtime import runtime_for

    return parked_snapshot(runtime_for(app).registry.park_store())


class Mover:
    """Publishes one app's due parked calls.

    Arguments:
        app: The Celery app (its producer pool publishes).
        store: The park store (default: the app's, from the registry).
        batch: Entries claimed per spot per round.
        busy_sleep: Longest sleep while anything is parked (s).
        idle_sleep: Sleep when nothing is parked (s).
        spots_ttl: How long the spot list from the index is reused while entries are parked (s).
    """

    def __init__(self, app: Any, store: Any = None, *, batch: int = 100, busy_sleep: float = 0.05,
                 idle_sleep: float = 0.1, spots_ttl: float = 1.0) -> None:
        from .runtime import runtime_for

        self.app = app
        self.runtime = runtime_for(app)
        self._store = store
        config = self.runtime.config
        self.claim_ttl_us = int(config.park_claim_ttl * 1_000_000)
        self.batch = batch
        self.busy_sleep = busy_sleep
        self.idle_sleep = idle_sleep
        self.spots_ttl = spots_ttl
        self._spots: List[Any] = []
        self._names: Dict[str, Set[str]] = {}
        self._spots_at = -1e9
        self._counted_at = -1e9
        #: Labels last counted above 0 (set to 0 when they leave the index).
        self._counted: Set[Any] = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failing = False
        self._idle = True
        self._backoff = 0.0
        #: Set by :meth:`stop` and by a release announcing a waiter it made due.
        self._warned_foreign: Set[Any] = set()
        self._wake = threading.Event()
        self._woken: Set[str] = set()
        self._woken_lock = threading.Lock()
        #: Entries published since start (all spots).
        self.published = 0
        from .steps.debounce import DebounceMoving

        #: Its part for ``@debounce``: due debounced runs are published in the same rounds.
        self.debounce = DebounceMoving(self)
        from .steps.fair import FairMoving

        #: Its part for ``@fair``: the dispatcher releasing fair queues round-robin, in the same rounds.
        self.fair = FairMoving(self)

    @property
    def store(self) -> Any:
        """The park store given, else the app's current one: looked up in the registry on every use,
        because a test's ``reset_stores()`` (``tuning_memory`` under a session-wide worker) moves the
        app to new stores while this thread runs."""
        store = self._store
        return store if store is not None else self.runtime.registry.mover_park_store()

    # -- the thread ---------------------------------------------------------------------------

    def start(self) -> Mover:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._listen()
        self._thread = threading.Thread(target=self._loop, name="celery-tuning-mover", daemon=True)
        self._thread.start()
        return self

    def _listen(self) -> None:
        """Hear releases that made a waiter due (the store's wake channel), when it has one."""
        channel = getattr(self.store, "wake_channel", None)
        connector = getattr(self.store, "connector", None)
        if channel is None or connector is None:
            return  # the memory store: rounds alone
        from ..storage.pubsub import channel_listener

        channel_listener(connector, channel).add(self._on_wake)

    def _on_wake(self, data: Any) -> None:
        member = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        with self._woken_lock:
            self._woken.add(member)
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        due_round = 0.0  # monotonic time of the next full round
        while not self._stop.is_set():
            try:
                woken = self._take_woken()
                if woken and time.monotonic() < due_round:
                    self.run_woken(woken)  # only the spots a release named; the round comes later
                    sleep = due_round - time.monotonic()
                else:
                    sleep = self.run_once().sleep
                    due_round = time.monotonic() + sleep
                if self._failing:
                    self._failing, self._backoff = False, 0.0
                    logger.info("parking mover: the tuning Redis and the broker answer again")
            except Exception as exc:  # the mover must outlive any one bad round
                self._backoff = min(max(self._backoff * 2, 0.1), _MAX_BACKOFF)
                sleep = self._backoff
                if not self._failing:
                    self._failing = True
                    if isinstance(exc, StorageError):
                        logger.warning("parking mover: tuning Redis failed (%s); retrying with backoff", exc)
                    else:
                        logger.exception("parking mover: a round failed; retrying with backoff")
            if sleep > 0 and not self._stop.is_set():
                self._wake.wait(sleep)
            self._wake.clear()

    def _take_woken(self) -> Set[str]:
        with self._woken_lock:
            woken, self._woken = self._woken, set()
        return woken

    # -- one round ----------------------------------------------------------------------------

    def spots(self) -> List[Any]:
        """The spots that may hold entries (the store's index, reused for ``spots_ttl`` s)."""
        now = time.monotonic()
        if self._idle or now - self._spots_at >= self.spots_ttl:
            names = self._names = self.names()
            # Only this app's spots: another app sharing the tuning Redis (and prefix) may publish
            # through another broker, and its entries are its own movers' to publish.
            # A concurrency spot of one caller key (<limit>:k:<digest>) belongs to its limit.
            self._spots = [where for where in self.store.spots()
                           if _limit_of(where) in names.get(where.reason, ())]
            self._spots_at = now
        if events.PARKED_COUNT.subscribers and now - self._counted_at >= COUNT_EVERY:
            self._counted_at = now
            self.count()
        return self._spots

    def names(self) -> Dict[str, Set[str]]:
        """The limiter, concurrency-limit and breaker names this app defers under, by reason: the
        configured ones and those its tasks' decorators name (an inline limiter is the task's)."""
        config = self.runtime.config
        names: Dict[str, Set[str]] = {"rate_limit": set(config.rate_limits),
                                      "concurrency": set(config.concurrency_limits),
                                      "circuit_open": set(config.circuit_breakers)}
        for task in list(self.app.tasks.values()):
            policies = getattr(type(task), "_tuning_policies", None) or {}
            limit = policies.get("rate_limit")
            if limit is not None:
                names["rate_limit"].add(getattr(limit, "name", None) or task.name)
            for reason, kind in (("concurrency", "concurrency"), ("circuit_open", "breaker")):
                policy = policies.get(kind)
                if policy is not None and getattr(policy, "name", None):
                    names[reason].add(policy.name)
                elif policy is not None and kind == "concurrency":
                    names[reason].add(task.name)  # an inline limit is the task's
        return names

    def count(self) -> None:
        """Tell the events sink what is parked at each spot (the ``celery_tuning_parked_tasks`` gauge)."""
        # By limit: the spots of a per-key limit's keys add up under its name (labels stay bounded).
        totals = {(row.reason, row.name): row.parked for row in parked_by_limit(parked_snapshot(self.store))}
        # A per-key limit whose keys all drained leaves the index: its count is 0, not the last one.
        for label in self._counted - set(totals):
            totals[label] = 0
        self._counted = {label for label, parked in totals.items() if parked}
        for (reason, name), parked in totals.items():
            events.parked_count(reason, name, parked)

    def run_once(self) -> Round:
        """Promote, claim, publish and acknowledge once over every spot.

        Raises:
            StorageError: When the tuning Redis fails (entries claimed so far come back after the
            claim TTL); the broker's errors likewise.
        """
        store = self.store
        published = 0
        full = False
        parked = False
        earliest: Optional[int] = None
        for where in self.spots():
            if where.reason == "concurrency":
                parked = self._promote(where) or parked
            claimed = store.claim(where, self.batch, self.claim_ttl_us)
            if claimed:
                parked = True
                published += self._publish(where, claimed)
                full = full or len(claimed) >= self.batch
            due = store.next_due_us(where)
            if due is not None:
                parked = True
                earliest = due if earliest is None else min(earliest, due)
        debounced = self.debounce.run_once(time.monotonic())
        published += debounced.published
        full = full or debounced.full
        if debounced.next_due_us is not None:
            parked = True
            earliest = debounced.next_due_us if earliest is None else min(earliest, debounced.next_due_us)
        fair = self.fair.run_once(time.monotonic())
        published += fair.published
        full = full or fair.full
        parked = parked or fair.waiting
        self.published += published
        self._idle = not parked
        if full:
            return Round(published, 0.0)
        if not parked:
            return Round(published, self.idle_sleep)
        sleep = self.busy_sleep
        if earliest is not None:
            sleep = min(sleep, max(0.0, (earliest - store.now_us()) / 1e6))
        return Round(published, sleep)

    def run_woken(self, members: Set[str]) -> int:
        """Claim and publish what is due at the spots named by releases (index members
        ``<r>:<name>``) that are this mover's; returns how many were published."""
        published = 0
        from ..storage.fair import WAKE_PREFIX

        fair = {member[len(WAKE_PREFIX):] for member in members if member.startswith(WAKE_PREFIX)}
        if fair:
            # A fair message started: its queue's window has room (see steps/fair.py).
            published += self.fair.run_woken(fair)
            members = members - {WAKE_PREFIX + queue for queue in fair}
        if not self._names:
            self.spots()
        for member in sorted(members):
            # Read from the message, not the cached spot list: a caller key's spot parked since
            # the list was read is not in it.
            found = park_spot_of(member)
            if found is None:
                continue
            where = Spot(*found)
            if _limit_of(where) in self._names.get(where.reason, ()):
                claimed = self.store.claim(where, self.batch, self.claim_ttl_us)
                if claimed:
                    published += self._publish(where, claimed)
        self.published += published
        return published

    def _promote(self, where: Any) -> bool:
        """Free slots of a concurrency limit go to its first waiters (slots a release freed were
        handed on by the release itself; this covers leases that expired); True when any moved.

        Waiters left without a free slot do not keep the mover busy: a release wakes it."""
        # A spot of one caller key (<limit>:k:<digest>) promotes against that key's lease set and cap.
        name, key_hash = split_keyed_spot(where.name)
        spec = self.runtime.registry.concurrency_spec(name)  # configured, or a task's inline limit
        if spec is None:
            return False  # not a limit of this app (another app shares the Redis)
        cap = spec.cap_for_digest(key_hash)
        # One more than the cap while standbys are on: the waiter on its way to hold on for the next
        # slot (a caller key's waiters have none, nor a limit whose tasks' waiters cannot stand by:
        # not acks_late, or under a time limit).
        standby = 1 if (self.runtime.config.concurrency_standby > 0 and key_hash is None
                        and self.runtime.registry.standby_able(name)) else 0
        return self.store.promote(where, lease_key(self.runtime.config.key_prefix, name, key_hash), cap, standby) > 0

    def _publish(self, where: Any, claimed: List[Any]) -> int:
        done = 0
        with _NO_FORK_WHILE_PUBLISHING, self.app.producer_or_acquire() as producer:
            for entry in claimed:
                try:
                    self.publish(where, entry, producer=producer)
                except ForeignEntry as exc:
                    # Another app shares the tuning Redis, its prefix and this spot's name: its
                    # entry goes back for its own movers, which publish through its broker (this
                    # app's would discard the task as unregistered), due a little later so that
                    # this mover's next claims reach its own entries behind it.
                    self.store.unclaim(where, entry.park_id, entry.pub, int(FOREIGN_REST * 1_000_000))
                    if (where, exc.task) not in self._warned_foreign:
                        self._warned_foreign.add((where, exc.task))
                        logger.warning(
                            "parking mover: %s:%s holds task %r, which this app does not have: left for "
                            "the movers of the app that parked it (give each app its own limit names or "
                            "tuning_key_prefix)", where.reason, where.name, exc.task)
                    continue
                except (TypeError, ValueError, KeyError):
                    # A payload this version cannot read would fail again on every claim: it stays
                    # claimed (and comes back after the claim TTL); say which one.
                    logger.exception("parking mover: cannot decode parked entry %s of %s:%s", entry.park_id,
                                     where.reason, where.name)
                    continue
                self.store.ack(where, entry.park_id, entry.pub)
                events.task_unparked(where.reason, _limit_of(where))
                done += 1
        return done

    def publish(self, where: Any, entry: Any, producer: Any = None) -> Any:
        """Publish one claimed entry to its queue with the :data:`HEADER_PARK` ticket (no ack).

        Raises:
            ForeignEntry: When the entry's task is not one of this app's.
        """
        signature = self.app.signature(decode_payload(entry.payload))
        if signature.task not in self.app.tasks:
            raise ForeignEntry(signature.task)
        headers: Dict[str, Any] = dict(signature.options.get("headers") or {})
        headers[HEADER_PARK] = {"id": entry.park_id, "pub": entry.pub, "r": where.reason, "n": where.name}
        # The worker's main process, where this thread runs, is seldom instrumented (the SDK is set
        # up in each pool child): the parking run's context goes in the message itself, for the
        # consuming side's instrumentation to extract; an instrumented publish injects over it.
        headers.update(trace_headers(headers.get(HEADER_TRACE)))
        signature.options["headers"] = headers
        declare = route_declarations(self.app, signature.options)
        if declare:
            signature.options["declare"] = declare
        with continued_trace(headers.get(HEADER_TRACE)):
            return signature.apply_async(producer=producer)
