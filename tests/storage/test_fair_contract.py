"""One contract for the fair-queue stores (in-process reference and Redis/Lua, single server and
Cluster), and a differential state machine that holds the two together on random sequences.

A manual clock drives every store (the Redis store sends it to the scripts as their "now").
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from celery_tuning.storage.fair import (
    ADDED,
    ALREADY_WAITING,
    RAN,
    TRY_AGAIN,
    UNDELIVERABLE,
    FairCap,
    FairStore,
    MemoryFairStore,
    RedisFairStore,
)
from celery_tuning.storage.keys import lease_key
from celery_tuning.storage.lease import MemoryLeaseStore, RedisLeaseStore
from celery_tuning.storage.redis import RedisConnector

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000
SEC = 1_000_000
CLAIM = 30 * SEC
Q = "tenants"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class World:
    def __init__(self, store: FairStore, clock: Clock, leases: Any, cluster: bool = False) -> None:
        self.store, self.clock, self.leases, self.cluster = store, clock, leases, cluster


@pytest.fixture(params=["memory", "redis", "cluster"])
def w(request) -> World:
    clock = Clock()
    if request.param == "memory":
        leases = MemoryLeaseStore(clock=clock)
        return World(MemoryFairStore(clock=clock, leases=leases), clock, leases)
    if request.param == "cluster":
        connector = RedisConnector(request.getfixturevalue("cluster_clean").url)
    else:
        connector = RedisConnector(request.getfixturevalue("redis_clean").db_url(5))
    return World(RedisFairStore(connector, clock=clock), clock, RedisLeaseStore(connector),
                 cluster=request.param == "cluster")


def _release(s: FairStore, batch: int = 100, window: Optional[int] = 1000, **kw: Any):
    return s.release(Q, batch, CLAIM, CLAIM, window=window, **kw)


def _ids(done) -> List[str]:
    return [r.msg_id for r in done.released]


def test_release_takes_one_message_per_key_in_turn_whatever_the_backlog(w):
    s = w.store
    for i in range(50):
        assert s.add(Q, f"a{i}", "A", f"pa{i}") == ADDED
    for i in range(3):
        assert s.add(Q, f"b{i}", "B", f"pb{i}") == ADDED
    assert s.add(Q, "c0", "C", "pc0") == ADDED
    done = _release(s, batch=8)
    assert _ids(done) == ["a0", "b0", "c0", "a1", "b1", "a2", "b2", "a3"]
    assert done.waiting == 54 - 8 and done.in_window == 8
    assert [r.payload for r in done.released][:3] == ["pa0", "pb0", "pc0"]
    assert all(r.pub == 1 for r in done.released)
    snap = s.snapshot(Q, top=2)
    assert (snap.waiting, snap.keys, snap.in_window, snap.claimed, snap.released_total) == (46, 1, 8, 8, 8)
    assert snap.deepest == [("A", 46)]


def test_weights_give_a_key_several_messages_per_turn(w):
    s = w.store
    for i in range(10):
        s.add(Q, f"a{i}", "A", "p", weight=3)
        s.add(Q, f"b{i}", "B", "p")
    assert _ids(_release(s, batch=8)) == ["a0", "a1", "a2", "b0", "a3", "a4", "a5", "b1"]


def test_a_turn_cut_short_by_a_window_of_one_goes_on_at_the_next_release(w):
    s = w.store
    for i in range(6):
        s.add(Q, f"a{i}", "A", "p", weight=3)
        s.add(Q, f"b{i}", "B", "p")
    order = []
    for _ in range(8):
        done = _release(s, window=1)
        order += _ids(done)
        for r in done.released:
            s.start(Q, r.msg_id, r.pub, "A")
    assert order == ["a0", "a1", "a2", "b0", "a3", "a4", "a5", "b1"]


def test_the_window_bounds_what_is_released_and_not_started_and_a_start_frees_room(w):
    s = w.store
    for i in range(10):
        s.add(Q, f"a{i}", "A", "p")
    done = _release(s, window=3)
    assert _ids(done) == ["a0", "a1", "a2"] and done.window == 3
    assert _ids(_release(s, window=3)) == []
    for r in done.released:
        assert s.ack(Q, r.msg_id, r.pub)
    assert _ids(_release(s, window=3)) == [], "published is still in the window until started"
    assert s.start(Q, "a0", 1, "A")
    assert _ids(_release(s, window=3)) == ["a3"]


def test_the_window_defaults_to_the_live_consumers_capacity(w):
    s = w.store
    for i in range(10):
        s.add(Q, f"a{i}", "A", "p")
    assert _ids(_release(s, window=None)) == [], "no consumer: nothing released"
    done = _release(s, window=None, node="w1", capacity=2, node_ttl_us=10 * SEC)
    assert len(done.released) == 2 and done.window == 2
    done = _release(s, window=None, node="w2", capacity=3, node_ttl_us=10 * SEC)
    assert len(done.released) == 3 and done.window == 5
    w.clock.now += 11 * SEC  # both registrations lapse; the window entries are still live (claim TTL)
    assert _release(s, window=None).window == 0


def test_a_lost_start_leaves_the_window_when_its_time_passes(w):
    s = w.store
    for i in range(4):
        s.add(Q, f"a{i}", "A", "p")
    for r in _release(s, window=2).released:
        s.ack(Q, r.msg_id, r.pub)
    w.clock.now += CLAIM + 1
    assert _ids(_release(s, window=2)) == ["a2", "a3"]


def test_an_expired_claim_is_released_again_with_a_higher_pub_and_the_stale_copy_is_dropped(w):
    s = w.store
    s.add(Q, "a0", "A", "p0")
    first = _release(s).released[0]
    w.clock.now += CLAIM + 1  # its dispatcher died after publishing, before acking
    again = _release(s).released
    assert [(r.msg_id, r.pub, r.payload) for r in again] == [("a0", 2, "p0")]
    assert not s.ack(Q, "a0", first.pub), "the dead dispatcher's ack no longer owns it"
    assert s.ack(Q, "a0", 2)
    assert not s.start(Q, "a0", 1, "A"), "the first copy is a stale duplicate"
    assert s.start(Q, "a0", 2, "A")
    assert s.start(Q, "a0", 2, "A"), "a broker redelivery of the same publication runs"
    w.clock.now += CLAIM + 1
    assert _ids(_release(s)) == []


def test_a_message_started_before_its_claim_expired_is_never_released_again(w):
    s = w.store
    s.add(Q, "a0", "A", "p0")
    r = _release(s).released[0]
    assert s.start(Q, "a0", r.pub, "A")  # it ran; the dispatcher died before acking
    w.clock.now += CLAIM + 1
    assert _ids(_release(s)) == []
    assert not s.ack(Q, "a0", r.pub)
    assert s.add(Q, "a0", "A", "p0") == RAN


def test_an_id_added_twice_waits_once(w):
    s = w.store
    assert s.add(Q, "a0", "A", "p") == ADDED
    assert s.add(Q, "a0", "A", "p") == ALREADY_WAITING
    assert _ids(_release(s)) == ["a0"]
    assert s.add(Q, "a0", "A", "p") == ALREADY_WAITING, "claimed"


def test_a_key_at_its_concurrency_cap_is_passed_over_without_losing_its_turn(w):
    s = w.store
    lk = lease_key("tuning", "sync", "A")
    for i in range(5):
        s.add(Q, f"a{i}", "A", "p", cap=FairCap(2, lk))
        s.add(Q, f"b{i}", "B", "p")
    done = _release(s, batch=6)
    if w.cluster:
        assert _ids(done) == ["a0", "b0", "a1", "b1", "a2", "b2"], "on a Cluster caps are the step's"
        return
    assert _ids(done) == ["a0", "b0", "a1", "b1", "b2", "b3"], "A holds 2 released: at its cap"
    s.start(Q, "a0", 1, "A")
    w.leases.acquire(lk, 2, "lease-a0", 30 * SEC, now=w.clock.now)  # a0 runs holding a lease
    assert _ids(_release(s, batch=6)) == ["b4"], "a0 running + a1 on its way: still at the cap"
    s.start(Q, "a1", 1, "A")
    w.leases.release(lk, "lease-a0")
    assert _ids(_release(s, batch=6)) == [], "a1 just started: it counts until it holds its lease"
    w.clock.now += SEC
    assert _ids(_release(s, batch=6)) == ["a2", "a3"], "nothing runs or is on its way: two slots"


def test_an_uncapped_call_of_a_capped_key_leaves_the_cap_in_place(w):
    # Another task of the queue, without @concurrency_limit, called with the same key value.
    s = w.store
    lk = lease_key("tuning", "sync", "A")
    for i in range(3):
        s.add(Q, f"a{i}", "A", "p", cap=FairCap(2, lk))
    s.add(Q, "u0", "A", "p")
    s.add(Q, "b0", "B", "p")
    done = _release(s, batch=6)
    if w.cluster:
        assert _ids(done) == ["a0", "b0", "a1", "a2", "u0"], "on a Cluster caps are the step's"
        return
    assert _ids(done) == ["a0", "b0", "a1"], "A is at its cap of 2: a2 would only be refused and parked"
    s.start(Q, "a0", 1, "A")
    w.clock.now += SEC
    assert _ids(_release(s, batch=6)) == ["a2"]
    s.start(Q, "a1", 1, "A")
    s.start(Q, "a2", 1, "A")
    w.clock.now += SEC
    assert _ids(_release(s, batch=6)) == ["u0"]
    s.add(Q, "u1", "A", "p")
    assert _ids(_release(s, batch=6)) == ["u1"], "A left the ring with its last call: its cap went with it"


def test_purge_drops_waiting_claimed_and_undeliverable_messages_and_a_copy_in_flight_never_runs(w):
    s = w.store
    for i in range(5):
        s.add(Q, f"a{i}", "A", "p")
    s.add(Q, "b0", "B", "p")
    claimed = _release(s, batch=3).released  # a0, b0, a1: claimed, not acknowledged
    assert s.ack(Q, "a0", 1)  # a0 was published: released, no longer the store's to drop
    assert s.reject(Q, "b0", 1, SEC, attempts=1) == UNDELIVERABLE
    assert s.purge(Q) == 3 + 1 + 1, "a2..a4 waiting, a1 claimed, b0 undeliverable"
    snap = s.snapshot(Q)
    assert (snap.waiting, snap.keys, snap.claimed, snap.undeliverable, snap.in_window) == (0, 0, 0, 0, 1)
    assert Q in s.queues()
    a1 = next(r for r in claimed if r.msg_id == "a1")
    assert not s.ack(Q, "a1", a1.pub), "its dispatcher's ack no longer owns it"
    assert not s.start(Q, "a1", a1.pub, "A"), "a copy published as the purge ran is dropped, never run"
    assert s.start(Q, "a0", 1, "A"), "a message already published still runs"
    w.clock.now += CLAIM + 1
    assert _ids(_release(s)) == []


def test_a_message_that_cannot_be_published_leaves_the_window_and_after_its_attempts_becomes_undeliverable(w):
    s = w.store
    for i in range(2):
        s.add(Q, f"x{i}", "X", "bad")
    for i in range(3):
        s.add(Q, f"a{i}", "A", "good")
    done = _release(s, window=2)
    assert _ids(done) == ["x0", "a0"]
    assert s.reject(Q, "x0", 1, 2 * SEC, attempts=3) == TRY_AGAIN
    assert s.reject(Q, "x0", 1, 2 * SEC, attempts=3) == TRY_AGAIN, "the same claim: no second attempt"
    assert not s.reject(Q, "x0", 7, 2 * SEC, attempts=3), "a claim it no longer holds"
    assert _ids(_release(s, window=2)) == ["x1"], "x0 left the window at once"
    assert s.reject(Q, "x1", 1, 2 * SEC, attempts=3) == TRY_AGAIN
    assert s.ack(Q, "a0", 1) and s.start(Q, "a0", 1, "A")
    good = _release(s, window=2).released
    assert [r.msg_id for r in good] == ["a1", "a2"], "the bad messages hold no window place"
    for r in good:
        assert s.ack(Q, r.msg_id, r.pub)
    for attempt in (2, 3):
        w.clock.now += 2 * SEC + 1
        again = _release(s, window=2).released
        assert [(r.msg_id, r.pub) for r in again] == [("x0", attempt), ("x1", attempt)]
        answer = UNDELIVERABLE if attempt == 3 else TRY_AGAIN
        assert [s.reject(Q, r.msg_id, r.pub, 2 * SEC, attempts=3) for r in again] == [answer, answer]
    snap = s.snapshot(Q)
    assert (snap.claimed, snap.undeliverable, snap.in_window) == (0, 2, 2)
    w.clock.now += CLAIM + 1
    assert _ids(_release(s, window=2)) == [], "an undeliverable message is never released again"
    assert s.add(Q, "x0", "X", "bad") == ALREADY_WAITING
    assert s.purge(Q, "A") == 0 and s.purge(Q, "X") == 2
    assert s.snapshot(Q).undeliverable == 0


def test_undeliverable_messages_are_bounded(w):
    s = w.store
    for i in range(4):
        s.add(Q, f"x{i}", "X", "bad")
    for r in _release(s).released:
        assert s.reject(Q, r.msg_id, r.pub, SEC, attempts=1, most=3) == UNDELIVERABLE
    assert s.snapshot(Q).undeliverable == 3, "the oldest went"
    assert s.add(Q, "x0", "X", "bad") == ALREADY_WAITING, "its ticket remains: the id is not queued again"


def test_an_id_added_again_after_its_release_is_dropped_not_queued_with_new_arguments(w):
    s = w.store
    s.add(Q, "a0", "A", "first")
    r = _release(s).released[0]
    assert s.ack(Q, "a0", r.pub)
    assert s.add(Q, "a0", "A", "second") == ALREADY_WAITING, "released, not started: it keeps its arguments"
    assert s.start(Q, "a0", r.pub, "A")
    assert s.add(Q, "a0", "A", "third") == RAN


def test_a_snapshot_that_scans_no_key_shows_no_deepest_key(w):
    s = w.store
    s.add(Q, "a0", "A", "p")
    assert s.snapshot(Q, top=3, scan=0).deepest == []
    assert s.snapshot(Q, top=3, scan=1).deepest == [("A", 1)]


def test_purge_of_one_key_leaves_the_others_their_turns(w):
    s = w.store
    for i in range(3):
        s.add(Q, f"a{i}", "A", "p", weight=2)
        s.add(Q, f"b{i}", "B", "p")
        s.add(Q, f"c{i}", "C", "p")
    assert s.purge(Q, "B") == 3
    assert s.purge(Q, "B") == 0
    assert s.purge(Q, "nobody") == 0
    snap = s.snapshot(Q)
    assert (snap.waiting, snap.keys) == (6, 2)
    assert _ids(_release(s, batch=6)) == ["a0", "a1", "c0", "a2", "c1", "c2"]
    s.add(Q, "b9", "B", "p")
    assert _ids(_release(s, batch=6)) == ["b9"], "the purged key queues again, at weight 1"


def test_purge_of_a_key_mid_turn_drops_its_place(w):
    s = w.store
    for i in range(4):
        s.add(Q, f"a{i}", "A", "p", weight=3)
    s.add(Q, "b0", "B", "p")
    assert _ids(_release(s, batch=2)) == ["a0", "a1"]  # A's turn of 3 was cut short: A stays at the head
    assert s.purge(Q, "A") == 2 + 2, "a2, a3 waiting; a0, a1 claimed"
    assert _ids(_release(s, batch=6)) == ["b0"]
    assert s.snapshot(Q).waiting == 0


# -- expiry (Redis only: the memory store keeps no TTLs) --------------------------------------------


@pytest.fixture(params=["redis", "cluster"])
def short_lived(request) -> RedisFairStore:
    """A Redis store on the server's clock whose idle queues' keys expire after 0.2 s + 1 s."""
    if request.param == "cluster":
        connector = RedisConnector(request.getfixturevalue("cluster_clean").url)
    else:
        connector = RedisConnector(request.getfixturevalue("redis_clean").db_url(5))
    return RedisFairStore(connector, ticket_ttl_us=200_000)


def test_waiting_calls_outlive_the_ticket_ttl_while_a_dispatcher_comes_by(short_lived):
    # No worker consumes the queue (its window is 0), but a dispatcher comes by every 0.2 s: none
    # of the queue's calls may expire, whichever key they wait under.
    s = short_lived
    for i in range(2):
        s.add(Q, f"a{i}", "A", "p")
        s.add(Q, f"b{i}", "B", "p")
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        done = s.release(Q, 100, CLAIM, CLAIM, node="elsewhere", capacity=0, node_ttl_us=10 * SEC)
        assert (done.released, done.waiting, done.keys) == ([], 4, 2)
        time.sleep(0.2)
    assert _ids(_release(s)) == ["a0", "b0", "a1", "b1"]


def test_an_idle_queue_expires_whole(short_lived):
    s = short_lived
    s.add(Q, "a0", "A", "p")
    s.add(Q, "b0", "B", "p")
    time.sleep(1.5)
    done = _release(s)
    assert (done.released, done.waiting, done.keys) == ([], 0, 0), "nothing half-expired is left behind"
    assert s.add(Q, "a1", "A", "p") == ADDED
    assert _ids(_release(s)) == ["a1"]


# -- differential: random sequences through the memory reference and the Lua -------------------


class FairMachine(RuleBasedStateMachine):
    connector: RedisConnector

    def __init__(self) -> None:
        super().__init__()
        self.connector.run(lambda c: c.flushdb(), what="FLUSHDB")
        self.clock = Clock()
        self.mem_leases = MemoryLeaseStore(clock=self.clock)
        self.mem = MemoryFairStore(clock=self.clock, leases=self.mem_leases)
        self.red = RedisFairStore(self.connector, clock=self.clock)
        self.red_leases = RedisLeaseStore(self.connector)
        self.n = 0
        self.released: Dict[str, int] = {}

    @rule(key=st.sampled_from(["A", "B", "C", "D"]), weight=st.integers(1, 3), capped=st.booleans())
    def add(self, key: str, weight: int, capped: bool) -> None:
        self.n += 1
        cap = FairCap(2, lease_key("tuning", "lim", key)) if capped else None
        args = (Q, f"m{self.n}", key, f"p{self.n}", weight, cap)
        assert self.mem.add(*args) == self.red.add(*args)

    @rule(batch=st.integers(0, 6), window=st.one_of(st.none(), st.integers(0, 8)),
          capacity=st.integers(0, 4))
    def release(self, batch: int, window: Optional[int], capacity: int) -> None:
        args = (Q, batch, 5 * SEC, 7 * SEC, "node", capacity, 10 * SEC, window)
        a, b = self.mem.release(*args), self.red.release(*args)
        assert a == b
        for r in a.released:
            self.released[r.msg_id] = r.pub

    @rule(data=st.data())
    def ack_or_start(self, data: Any) -> None:
        if not self.released:
            return
        msg_id = data.draw(st.sampled_from(sorted(self.released)))
        pub = self.released[msg_id] - data.draw(st.integers(0, 1))
        if data.draw(st.booleans()):
            assert self.mem.ack(Q, msg_id, pub) == self.red.ack(Q, msg_id, pub)
        else:
            key = "A"
            assert self.mem.start(Q, msg_id, pub, key) == self.red.start(Q, msg_id, pub, key)

    @rule(key=st.sampled_from(["A", "B"]), held=st.booleans())
    def lease(self, key: str, held: bool) -> None:
        lk = lease_key("tuning", "lim", key)
        if held:
            self.mem_leases.acquire(lk, 5, "x", 3 * SEC, now=self.clock.now)
            self.red_leases.acquire(lk, 5, "x", 3 * SEC, now=self.clock.now)
        else:
            self.mem_leases.release(lk, "x")
            self.red_leases.release(lk, "x")

    @rule(data=st.data(), attempts=st.integers(1, 3), rest=st.integers(0, 3))
    def reject(self, data: Any, attempts: int, rest: int) -> None:
        if not self.released:
            return
        msg_id = data.draw(st.sampled_from(sorted(self.released)))
        pub = self.released[msg_id] - data.draw(st.integers(0, 1))
        args = (Q, msg_id, pub, rest * SEC, attempts, 2)
        assert self.mem.reject(*args) == self.red.reject(*args)

    @rule(key=st.sampled_from([None, "A", "B", "Z"]))
    def purge(self, key: Optional[str]) -> None:
        assert self.mem.purge(Q, key) == self.red.purge(Q, key)

    @rule(seconds=st.integers(0, 8))
    def tick(self, seconds: int) -> None:
        self.clock.now += seconds * SEC

    @invariant()
    def same_snapshot(self) -> None:
        assert self.mem.snapshot(Q, top=3) == self.red.snapshot(Q, top=3)


def test_memory_and_redis_stores_agree_on_random_sequences(redis_clean):
    FairMachine.connector = RedisConnector(redis_clean.db_url(6))
    run_state_machine_as_test(FairMachine, settings=settings(
        max_examples=60, stateful_step_count=40, deadline=None, phases=[Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow]))


def test_an_undeliverable_message_goes_after_the_ticket_ttl_on_a_busy_queue(w):
    """Swept by the next write after its keeping time (it was only swept when another was set
    aside: on a busy queue it stayed, payload and all, and kept its id from being queued again)."""
    from celery_tuning.storage.tickets import DEFAULT_TICKET_TTL_US

    s = w.store
    s.add(Q, "x0", "X", "bad")
    [r] = _release(s).released
    assert s.reject(Q, "x0", r.pub, SEC, attempts=1) == UNDELIVERABLE
    w.clock.now += DEFAULT_TICKET_TTL_US // 2
    s.add(Q, "a0", "A", "good")
    assert s.snapshot(Q).undeliverable == 1, "kept for the ticket TTL"
    w.clock.now += DEFAULT_TICKET_TTL_US // 2 + 1
    s.add(Q, "a1", "A", "good")  # any write trims
    assert s.snapshot(Q).undeliverable == 0
    assert s.add(Q, "x0", "X", "again") != ALREADY_WAITING, "its id is free again"
