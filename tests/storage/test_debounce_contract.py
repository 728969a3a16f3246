"""One contract for the debounce stores (in-process reference and Redis/Lua, single server and Cluster),
and a differential state machine that holds the two together on random sequences.

A manual clock drives every store (the Redis store sends it to the scripts as their "now").
"""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from celery_tuning.storage.debounce import (
    STALE_DUPLICATE,
    STARTED_UNMARKED,
    STARTED_WITH_MARK,
    DebounceClaimed,
    DebounceStore,
    MemoryDebounceStore,
    RedisDebounceStore,
    debounce_keys,
)
from celery_tuning.storage.redis import RedisConnector

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000
SEC = 1_000_000
MS = 1_000
CLAIM = 30 * SEC
SENT = 30 * SEC
LEASE = 30 * SEC
T = "tasks.sync"
K = "-"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class World:
    def __init__(self, store: DebounceStore, clock: Clock, connector: Optional[RedisConnector] = None) -> None:
        self.store, self.clock, self.connector = store, clock, connector

    def flush(self) -> None:
        """Redis loses everything (FLUSHALL); the memory reference: a store that never saw anything."""
        if self.connector is None:
            self.store = MemoryDebounceStore(clock=self.clock)
        else:
            self.connector.run(lambda c: c.flushall(), what="FLUSHALL")


@pytest.fixture(params=["memory", "redis", "cluster"])
def w(request) -> World:
    clock = Clock()
    if request.param == "memory":
        return World(MemoryDebounceStore(clock=clock), clock)
    if request.param == "cluster":
        connector = RedisConnector(request.getfixturevalue("cluster_clean").url)
    else:
        connector = RedisConnector(request.getfixturevalue("redis_clean").db_url(5))
    return World(RedisDebounceStore(connector, clock=clock), clock, connector)


def test_calls_within_the_delay_collapse_into_one_run_with_the_latest_payload_due_after_the_last(w):
    s = w.store
    assert s.call(T, K, "a", "p1", 500 * MS) == ("a", False)
    for i in range(2, 21):
        w.clock.now += 50 * MS
        assert s.call(T, K, f"id{i}", f"p{i}", 500 * MS) == ("a", True)
    last = w.clock.now
    entry = s.entry(T, K)
    assert entry is not None and (entry.pending_id, entry.first_us, entry.due_us) == ("a", T0, last + 500 * MS)
    assert s.next_due_us(T) == last + 500 * MS
    w.clock.now = last + 500 * MS - 1
    assert s.claim(T, 10, CLAIM) == []
    w.clock.now += 1
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "a", "p20", 1)]
    assert s.claim(T, 10, CLAIM) == []  # claimed once


def test_max_wait_bounds_the_due_time_from_the_first_call(w):
    s = w.store
    s.call(T, K, "a", "p", 500 * MS, SEC)
    for _ in range(30):
        w.clock.now += 50 * MS
        s.call(T, K, "b", "p", 500 * MS, SEC)
    entry = s.entry(T, K)
    assert entry is not None and entry.due_us == T0 + SEC
    w.clock.now = T0 + SEC
    assert [c.task_id for c in s.claim(T, 10, CLAIM)] == ["a"]
    assert s.call(T, K, "c", "p", 500 * MS, SEC) == ("c", False)  # a new run, a new first call


def test_keys_are_kept_apart_and_tasks_too(w):
    s = w.store
    assert s.call(T, "k1", "a", "p1", SEC) == ("a", False)
    assert s.call(T, "k2", "b", "p2", SEC) == ("b", False)
    assert s.call("other", "k1", "c", "p3", SEC) == ("c", False)
    w.clock.now += SEC
    assert sorted(s.claim(T, 10, CLAIM)) == [DebounceClaimed("k1", "a", "p1", 1), DebounceClaimed("k2", "b", "p2", 1)]
    assert s.claim("other", 10, CLAIM) == [DebounceClaimed("k1", "c", "p3", 1)]


def test_a_call_while_the_run_is_in_flight_waits_for_its_end_then_runs_once(w):
    s = w.store
    s.call(T, K, "a", "p1", SEC)
    w.clock.now += SEC
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "a", "p1", 1)]
    assert s.ack(T, K, "a", 1, SENT)
    assert s.start(T, K, "a", 1, LEASE) == STARTED_WITH_MARK
    assert s.call(T, K, "b", "p2", SEC) == ("b", False)  # during the run: the next one
    w.clock.now += 2 * SEC
    assert s.call(T, K, "c", "p3", SEC) == ("b", True)  # and more calls collapse into it
    w.clock.now += 2 * SEC  # due, but the run still holds the key
    assert s.claim(T, 10, CLAIM) == []
    assert s.next_due_us(T) == T0 + SEC + LEASE  # looked at again when the mark would expire
    assert s.renew(T, K, "a", LEASE) == 1
    assert s.end(T, K, "a") is True
    assert s.next_due_us(T) == T0 + 4 * SEC  # its own due time: now
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "b", "p3", 1)]
    assert s.end(T, K, "a") is False
    assert s.claim(T, 10, CLAIM) == []


def test_a_run_published_but_not_started_holds_the_key_until_the_sent_ttl(w):
    s = w.store
    s.call(T, K, "a", "p1", 0)
    assert len(s.claim(T, 10, CLAIM)) == 1 and s.ack(T, K, "a", 1, SENT)
    s.call(T, K, "b", "p2", 0)
    w.clock.now += SENT - 1
    assert s.claim(T, 10, CLAIM) == []
    w.clock.now += 1  # its message never arrived (a purged queue): the key is free again
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "b", "p2", 1)]


def test_a_worker_that_dies_frees_the_key_within_the_lease(w):
    s = w.store
    s.call(T, K, "a", "p1", 0)
    s.claim(T, 10, CLAIM)
    s.ack(T, K, "a", 1, SENT)
    assert s.start(T, K, "a", 1, LEASE) == STARTED_WITH_MARK
    s.call(T, K, "b", "p2", 0)
    w.clock.now += LEASE - 1
    assert s.claim(T, 10, CLAIM) == []
    w.clock.now += 1  # never renewed: its worker died
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "b", "p2", 1)]
    assert s.renew(T, K, "a", LEASE) == 0  # a late renewal does not take the key back
    assert s.end(T, K, "a") is False


def test_a_run_claimed_by_a_dead_mover_is_claimed_again_and_its_first_copy_is_a_stale_duplicate(w):
    s = w.store
    s.call(T, K, "a", "p1", 0)
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "a", "p1", 1)]  # published; the mover dies
    w.clock.now += CLAIM - 1
    assert s.claim(T, 10, CLAIM) == []
    w.clock.now += 1
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "a", "p1", 2)]
    assert s.ack(T, K, "a", 1, SENT) is False  # the dead mover's ack: a no-op
    assert s.ack(T, K, "a", 2, SENT) is True
    assert s.start(T, K, "a", 1, LEASE) == STALE_DUPLICATE
    assert s.start(T, K, "a", 2, LEASE) == STARTED_WITH_MARK
    assert s.start(T, K, "a", 2, LEASE) == STARTED_WITH_MARK  # a broker redelivery of the same copy
    assert s.start(T, K, "a", 1, LEASE) == STALE_DUPLICATE
    assert s.end(T, K, "a")
    assert s.start(T, K, "a", 1, LEASE) == STALE_DUPLICATE  # also once it ended


def test_a_worker_may_start_before_the_mover_acks(w):
    s = w.store
    s.call(T, K, "a", "p1", 0)
    s.claim(T, 10, CLAIM)
    assert s.start(T, K, "a", 1, LEASE) == STARTED_WITH_MARK
    assert s.ack(T, K, "a", 1, SENT) is False  # already running: the ack changes nothing
    entry = s.entry(T, K)
    assert entry is not None and (entry.in_flight_id, entry.state) == ("a", "r")
    assert s.end(T, K, "a") and s.entry(T, K) is None


def test_an_older_run_started_again_does_not_take_another_runs_key(w):
    s = w.store
    s.call(T, K, "a", "p1", 0)
    s.claim(T, 10, CLAIM)
    s.start(T, K, "a", 1, LEASE)
    s.end(T, K, "a")
    s.call(T, K, "b", "p2", 0)
    s.claim(T, 10, CLAIM)
    assert s.start(T, K, "a", 1, LEASE) == STARTED_UNMARKED  # a retry of a: b holds the key
    entry = s.entry(T, K)
    assert entry is not None and (entry.in_flight_id, entry.state) == ("b", "c")


def test_redis_losing_everything_loses_the_pending_run_and_a_renewal_recreates_the_mark(w):
    s = w.store
    s.call(T, K, "a", "p1", 0)
    s.claim(T, 10, CLAIM)
    s.start(T, K, "a", 1, LEASE)
    s.call(T, K, "b", "p2", SEC)
    w.flush()
    s = w.store
    assert s.entry(T, K) is None and s.claim(T, 10, CLAIM) == []  # the pending call is gone
    assert s.renew(T, K, "a", LEASE) == 2  # the running run holds the key again
    s.call(T, K, "c", "p3", 0)
    assert s.claim(T, 10, CLAIM) == []
    assert s.end(T, K, "a")
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "c", "p3", 1)]
    assert s.start(T, K, "a", 1, LEASE) in (STARTED_UNMARKED, STARTED_WITH_MARK)  # no ticket: it runs


def test_a_run_published_again_under_its_id_keeps_its_key_until_its_next_attempt_ends(w):
    """Task.retry or a deferral: the attempt's end keeps the key, queued, for the same id."""
    s = w.store
    s.call(T, K, "a", "p1", 0)
    s.claim(T, 10, CLAIM)
    assert s.start(T, K, "a", 1, LEASE) == STARTED_WITH_MARK
    s.call(T, K, "b", "p2", 0)  # during the first attempt
    assert s.requeue(T, K, "a", 60 * SEC) is True
    w.clock.now += LEASE + SEC  # well past a running mark's lease: still held, queued
    assert s.claim(T, 10, CLAIM) == []
    entry = s.entry(T, K)
    assert entry is not None and (entry.in_flight_id, entry.state) == ("a", "a")
    assert s.start(T, K, "a", 1, LEASE) == STARTED_WITH_MARK  # the retry runs, holding the key
    assert s.end(T, K, "a")
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "b", "p2", 1)]
    assert s.requeue(T, K, "a", 60 * SEC) is False  # another run holds the key: left alone


def test_a_queued_run_whose_attempt_never_comes_frees_the_key_at_its_bound(w):
    s = w.store
    s.call(T, K, "a", "p1", 0)
    s.claim(T, 10, CLAIM)
    s.start(T, K, "a", 1, LEASE)
    assert s.requeue(T, K, "a", 5 * SEC)
    s.call(T, K, "b", "p2", 0)
    w.clock.now += 5 * SEC
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "b", "p2", 1)]


def test_a_run_given_back_is_claimed_again_soon_under_a_higher_ticket(w):
    s = w.store
    s.call(T, K, "a", "p1", 0)
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "a", "p1", 1)]
    assert s.unclaim(T, K, "a", 2, SEC) is False  # not that claim's
    assert s.unclaim(T, K, "a", 1, SEC) is True
    w.clock.now += SEC - 1
    assert s.claim(T, 10, CLAIM) == []
    w.clock.now += 1
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "a", "p1", 2)]
    assert s.ack(T, K, "a", 2, SENT) and s.unclaim(T, K, "a", 2, SEC) is False  # published: too late


def test_a_call_with_its_own_id_never_changes_another_pending_run(w):
    s = w.store
    assert s.call(T, K, "a", "p1", SEC, own_id=True) == ("a", False)  # no pending run: it becomes it
    assert s.call(T, K, "a", "p2", 2 * SEC, own_id=True) == ("a", True)  # its own id: collapses
    assert s.call(T, K, "b", "p3", 5 * SEC, own_id=True) == ("a", True)  # another id: nothing changes
    entry = s.entry(T, K)
    assert entry is not None and entry.due_us == T0 + 2 * SEC
    w.clock.now += 2 * SEC
    assert s.claim(T, 10, CLAIM) == [DebounceClaimed(K, "a", "p2", 1)]


def test_batch_caps_a_claim(w):
    for i in range(5):
        w.store.call(T, f"k{i}", f"t{i}", "p", 0)
    assert [c.task_id for c in w.store.claim(T, 2, CLAIM)] == ["t0", "t1"]
    assert w.store.claim(T, 0, CLAIM) == []
    assert [c.task_id for c in w.store.claim(T, 10, CLAIM)] == ["t2", "t3", "t4"]


def test_odd_task_names_share_one_slot_per_task():
    keys = debounce_keys("tuning", "a}{b")
    tags = {k[k.index("{") + 1:k.index("}", k.index("{") + 1)] for k in keys}
    assert len(tags) == 1
    assert keys.due.startswith("tuning:db:{")


def test_every_redis_key_expires(redis_clean):
    clock = Clock()
    connector = RedisConnector(redis_clean.db_url(5))
    s = RedisDebounceStore(connector, clock=clock, ticket_ttl_us=60 * SEC)
    s.call(T, K, "a", "p1", SEC)
    clock.now += SEC
    s.claim(T, 10, CLAIM)
    s.ack(T, K, "a", 1, SENT)
    client = connector.client
    for key in debounce_keys("tuning", T):
        ttl = client.pttl(key)
        assert 0 < ttl <= (SENT + 60 * SEC) // 1000 + 1000, (key, ttl)


# -- differential: the memory reference and the scripts agree on random sequences ------------------

DIGESTS = ["-", "k1"]
IDS = ["a", "b", "c", "d"]
TASKS = [T, "x}y"]
TICKET_TTL = 60 * SEC


class DebounceStoresAgree(RuleBasedStateMachine):
    connector_url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.connector = RedisConnector(self.connector_url)
        self.connector.run(lambda c: c.flushall(), what="FLUSHALL")
        self.redis = RedisDebounceStore(self.connector, clock=lambda: self.now, ticket_ttl_us=TICKET_TTL)
        self.memory = MemoryDebounceStore(clock=lambda: self.now, ticket_ttl_us=TICKET_TTL)
        self.claimed: List[Any] = []

    def both(self, op: str, *args: Any) -> Any:
        mine, theirs = getattr(self.memory, op)(*args), getattr(self.redis, op)(*args)
        assert mine == theirs, (op, args, mine, theirs)
        return mine

    @rule(task=st.sampled_from(TASKS), digest=st.sampled_from(DIGESTS), run_id=st.sampled_from(IDS),
          delay=st.sampled_from([0, 0, SEC, 5 * SEC]), max_wait=st.sampled_from([None, 2 * SEC]),
          own_id=st.sampled_from([False, False, True]))
    def call(self, task: str, digest: str, run_id: str, delay: int, max_wait: Optional[int], own_id: bool) -> None:
        self.both("call", task, digest, run_id, f"p{self.now}", delay, max_wait, own_id)

    @rule(task=st.sampled_from(TASKS), batch=st.sampled_from([0, 1, 10]), ttl=st.sampled_from([SEC, 30 * SEC]))
    def claim(self, task: str, batch: int, ttl: int) -> None:
        self.claimed += [(task, c) for c in self.both("claim", task, batch, ttl)]

    @rule(data=st.data(), op=st.sampled_from(["ack", "start", "start", "renew", "end", "requeue", "unclaim"]),
          stale=st.integers(0, 3), ttl=st.sampled_from([SEC, 30 * SEC]))
    def follow_a_claim(self, data: Any, op: str, stale: int, ttl: int) -> None:
        """What movers and workers do with what was claimed (a stale pub now and then)."""
        if not self.claimed:
            return
        task, c = data.draw(st.sampled_from(self.claimed[-3:]))
        pub = c.pub - 1 if stale == 3 else c.pub
        if op in ("ack", "start", "unclaim"):
            self.both(op, task, c.digest, c.task_id, pub, ttl)
        elif op == "requeue":
            self.both(op, task, c.digest, c.task_id, ttl)
        elif op == "renew":
            self.both(op, task, c.digest, c.task_id, ttl)
        else:
            self.both(op, task, c.digest, c.task_id)

    @rule(task=st.sampled_from(TASKS), digest=st.sampled_from(DIGESTS), run_id=st.sampled_from(IDS),
          pub=st.integers(0, 3), ttl=st.sampled_from([SEC, 30 * SEC]))
    def ack(self, task: str, digest: str, run_id: str, pub: int, ttl: int) -> None:
        self.both("ack", task, digest, run_id, pub, ttl)

    @rule(task=st.sampled_from(TASKS), digest=st.sampled_from(DIGESTS), run_id=st.sampled_from(IDS),
          pub=st.integers(0, 3), op=st.sampled_from(["start", "renew", "end"]), often=st.integers(0, 3))
    def stray(self, task: str, digest: str, run_id: str, pub: int, op: str, often: int) -> None:
        """Now and then, a worker's call for a run nobody claimed just now (redeliveries, retries, a
        renewal after Redis lost the mark): rare, or the marks they leave would block every claim."""
        if often != 3:
            return
        if op == "start":
            self.both(op, task, digest, run_id, pub, 10 * SEC)
        elif op == "renew":
            self.both(op, task, digest, run_id, 10 * SEC)
        else:
            self.both(op, task, digest, run_id)

    @rule(gap=st.one_of(st.integers(0, 6 * SEC), st.integers(0, 70 * SEC)))
    def wait(self, gap: int) -> None:
        self.now += gap

    @rule(often=st.integers(0, 3))
    def flush(self, often: int) -> None:
        if often != 3:
            return  # rare: it forgets everything the other rules built
        self.connector.run(lambda c: c.flushall(), what="FLUSHALL")
        self.memory = MemoryDebounceStore(clock=lambda: self.now, ticket_ttl_us=TICKET_TTL)

    @invariant()
    def same_state(self) -> None:
        for task in TASKS:
            assert self.memory.next_due_us(task) == self.redis.next_due_us(task)
            for digest in DIGESTS:
                assert self.memory.entry(task, digest) == self.redis.entry(task, digest), (task, digest)


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_memory_and_redis_agree_on_random_sequences(where, request):
    url = (request.getfixturevalue("cluster_clean").url if where == "cluster"
           else request.getfixturevalue("redis_clean").db_url(6))

    class Bound(DebounceStoresAgree):
        connector_url = url

    run_state_machine_as_test(Bound, settings=settings(
        max_examples=40 if where == "redis" else 15, stateful_step_count=30, deadline=None,
        phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck)))
