"""One contract for the parking stores (in-process reference and Redis/Lua, single server and Cluster).

A manual clock drives every store (the Redis store sends it to the scripts as their "now").
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import pytest

from celery_tuning.storage import keys
from celery_tuning.storage.lease import LeaseStore, MemoryLeaseStore, RedisLeaseStore
from celery_tuning.storage.park import Claimed, MemoryParkStore, ParkSnapshot, ParkStore, RedisParkStore, Spot
from celery_tuning.storage.redis import RedisConnector

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000
SEC = 1_000_000
RL = Spot("rate_limit", "openai")
CC = Spot("concurrency", "pdf")
CB = Spot("circuit_open", "payments")
LEASES = keys.lease_key("tuning", "pdf")
CLAIM = 30 * SEC


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class World:
    """A store, the lease store its promote counts, the clock both read and (for Redis) the connector."""

    def __init__(self, store: ParkStore, leases: LeaseStore, clock: Clock,
                 connector: Optional[RedisConnector] = None, make: Optional[Callable[..., Any]] = None) -> None:
        self.store, self.leases, self.clock, self.connector, self.make = store, leases, clock, connector, make

    def lease(self, lease_id: str, ttl: int = 60 * SEC) -> None:
        assert self.leases.acquire(LEASES, 100, lease_id, ttl, now=self.clock.now).granted

    def flush(self) -> None:
        """Redis loses everything (FLUSHDB); the memory reference: a store that never saw anything."""
        if self.connector is None:
            self.store = MemoryParkStore(clock=self.clock, leases=self.leases)
        else:
            self.connector.run(lambda c: c.flushall(), what="FLUSHALL")


def memory_world(ticket_ttl_us: int = 86_400 * SEC) -> World:
    clock = Clock()
    leases = MemoryLeaseStore(clock=clock)
    return World(MemoryParkStore(clock=clock, leases=leases, ticket_ttl_us=ticket_ttl_us), leases, clock)


@pytest.fixture(params=["memory", "redis", "cluster"])
def where(request):
    return request.param


@pytest.fixture()
def make_world(where, request):
    def make(ticket_ttl_us: int = 86_400 * SEC) -> World:
        if where == "memory":
            return memory_world(ticket_ttl_us)
        if where == "cluster":
            connector = RedisConnector(request.getfixturevalue("cluster_clean").url)
        else:
            connector = RedisConnector(request.getfixturevalue("redis_clean").db_url(5))
        clock = Clock()
        store = RedisParkStore(connector, clock=clock, ticket_ttl_us=ticket_ttl_us)
        return World(store, RedisLeaseStore(connector), clock, connector)

    return make


@pytest.fixture()
def w(make_world) -> World:
    return make_world()


def test_a_delayed_entry_is_claimed_when_due_oldest_first(w):
    s = w.store
    s.park(RL, "t1:1", '{"a": 1}', 5 * SEC)
    s.park(RL, "t2:1", '{"a": 2}', 2 * SEC)
    s.park(RL, "t3:1", '{"a": 3}', 9 * SEC)
    assert s.next_due_us(RL) == T0 + 2 * SEC
    assert s.claim(RL, 10, CLAIM) == []
    w.clock.now = T0 + 5 * SEC
    assert s.claim(RL, 10, CLAIM) == [Claimed("t2:1", '{"a": 2}', 1), Claimed("t1:1", '{"a": 1}', 1)]
    assert s.snapshot(RL) == ParkSnapshot(1, 0, 2, T0 + 9 * SEC, T0 + 9 * SEC)
    assert s.ack(RL, "t2:1", 1) and s.ack(RL, "t1:1", 1)
    assert s.snapshot(RL) == ParkSnapshot(1, 0, 0, T0 + 9 * SEC, T0 + 9 * SEC)
    assert s.claim(RL, 10, CLAIM) == []


def test_batch_caps_a_claim(w):
    for i in range(5):
        w.store.park(CB, f"t{i}:0", "{}", 0)
    assert [c.park_id for c in w.store.claim(CB, 2, CLAIM)] == ["t0:0", "t1:0"]
    assert len(w.store.claim(CB, 0, CLAIM)) == 0
    assert [c.park_id for c in w.store.claim(CB, 10, CLAIM)] == ["t2:0", "t3:0", "t4:0"]


def test_spots_are_kept_apart_and_listed_from_the_index(w):
    w.store.park(RL, "same:1", "rl", 0)
    w.store.park(CB, "same:1", "cb", 0)
    w.store.park(Spot("rate_limit", "a:b}{"), "x:1", "odd", 0)
    assert w.store.claim(RL, 10, CLAIM) == [Claimed("same:1", "rl", 1)]
    assert w.store.claim(CB, 10, CLAIM) == [Claimed("same:1", "cb", 1)]
    assert w.store.spots() == sorted([RL, CB, Spot("rate_limit", "a:b}{")])


def test_an_unknown_reason_is_refused(w):
    from celery_tuning.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="reason"):
        w.store.park(Spot("whim", "x"), "t:1", "{}", 0)


def test_an_entry_held_by_a_dead_mover_comes_back_when_its_claim_expires(w):
    s = w.store
    s.park(RL, "t:1", "p", 0)
    assert s.claim(RL, 10, CLAIM) == [Claimed("t:1", "p", 1)]  # the mover dies here
    w.clock.now += CLAIM - 1
    assert s.claim(RL, 10, CLAIM) == []  # still held
    w.clock.now += 1
    again = s.claim(RL, 10, CLAIM)
    assert again == [Claimed("t:1", "p", 2)]  # back, with pub + 1
    assert s.ack(RL, "t:1", 1) is False  # the dead mover's ack (stale pub): a no-op
    assert s.snapshot(RL).claimed == 1
    assert s.redeem(RL, "t:1", 1) is False  # what it published is a stale duplicate
    assert s.redeem(RL, "t:1", 2) is True
    assert s.redeem(RL, "t:1", 2) is True  # a broker redelivery of the same publication
    assert s.redeem(RL, "t:1", 1) is False
    assert s.ack(RL, "t:1", 2) is True
    assert s.snapshot(RL) == ParkSnapshot(0, 0, 0, None, None)


def test_an_unclaimed_entry_is_due_again_for_another_mover(w):
    """A mover that finds another app's entry gives it back: due now, claimed again with a new pub."""
    s = w.store
    s.park(RL, "t1:0:1", "{}", 0)
    [first] = s.claim(RL, 10, CLAIM)
    assert not s.unclaim(RL, "t1:0:1", first.pub + 1)  # not that claim's
    assert s.unclaim(RL, "t1:0:1", first.pub)
    assert not s.unclaim(RL, "t1:0:1", first.pub)  # given back already
    assert s.snapshot(RL).due == 1 and s.snapshot(RL).claimed == 0
    [again] = s.claim(RL, 10, CLAIM)
    assert again.park_id == "t1:0:1" and again.pub == first.pub + 1
    assert s.unclaim(RL, "t1:0:1", again.pub, 2 * SEC)  # behind the mover's own entries
    assert s.claim(RL, 10, CLAIM) == []
    w.clock.now += 2 * SEC
    [third] = s.claim(RL, 10, CLAIM)
    assert s.ack(RL, "t1:0:1", third.pub)


def test_seen_tells_a_park_id_that_was_parked_at_the_spot_in_any_state(w):
    s = w.store
    assert not s.seen(RL, "t1:0:1")
    s.park(RL, "t1:0:1", "{}", 0)
    assert s.seen(RL, "t1:0:1") and not s.seen(RL, "t1:0:2") and not s.seen(CB, "t1:0:1")
    [entry] = s.claim(RL, 10, CLAIM)
    assert s.ack(RL, entry.park_id, entry.pub) and s.seen(RL, "t1:0:1")  # published
    assert s.redeem(RL, "t1:0:1", entry.pub) and s.seen(RL, "t1:0:1")  # ran
    w.flush()
    assert not s.seen(RL, "t1:0:1") if w.connector is not None else not w.store.seen(RL, "t1:0:1")


def test_a_redeemed_entry_is_never_published_again(w):
    s = w.store
    s.park(RL, "t:1", "p", 0)
    [claimed] = s.claim(RL, 10, CLAIM)
    assert s.redeem(RL, "t:1", claimed.pub)  # the worker runs it; the mover died before its ack
    w.clock.now += 2 * CLAIM
    assert s.claim(RL, 10, CLAIM) == []
    assert s.snapshot(RL) == ParkSnapshot(0, 0, 0, None, None)


def test_a_call_that_already_ran_is_not_parked_again(w):
    # The broker redelivers the original message after the worker that parked it died before its
    # ack: the same park id comes back, and must not run a second time.
    s = w.store
    assert s.park(RL, "t:0:1", "p", 0) is True
    [claimed] = s.claim(RL, 10, CLAIM)
    assert s.redeem(RL, "t:0:1", claimed.pub)
    assert s.park(RL, "t:0:1", "p", 0) is False
    w.clock.now += 2 * CLAIM
    assert s.claim(RL, 10, CLAIM) == []
    assert s.snapshot(RL) == ParkSnapshot(0, 0, 0, None, None)


def test_redeem_fails_open_when_redis_lost_the_ticket(w):
    w.store.park(RL, "t:1", "p", 0)
    [claimed] = w.store.claim(RL, 10, CLAIM)
    w.flush()
    assert w.store.redeem(RL, "t:1", claimed.pub) is True
    assert w.store.ack(RL, "t:1", claimed.pub) is True  # the redeem left a ticket with that pub
    assert w.store.redeem(RL, "t:7", 3) is True  # never seen at all


def test_re_parking_replaces_the_entry_and_makes_older_publications_stale(w):
    s = w.store
    s.park(RL, "t:1", "old", 0)
    [claimed] = s.claim(RL, 10, CLAIM)
    s.park(RL, "t:1", "new", 3 * SEC)  # same id parked again while a mover holds it
    assert s.ack(RL, "t:1", claimed.pub) is False  # the mover's ack cannot remove the new entry
    assert s.snapshot(RL) == ParkSnapshot(1, 0, 0, T0 + 3 * SEC, T0 + 3 * SEC)
    w.clock.now += 3 * SEC
    assert s.claim(RL, 10, CLAIM) == [Claimed("t:1", "new", claimed.pub + 2)]
    assert s.redeem(RL, "t:1", claimed.pub) is False


def test_fifo_waiters_keep_their_place_when_re_parked_with_their_sequence(w):
    s = w.store
    for i, seq in enumerate([T0 - 30, T0 - 20, T0 - 10]):
        s.park(CC, f"t{i}:1", f"p{i}", None, seq)
    s.park(CC, "t0:2", "p0 again", None, T0 - 30)  # t0 deferred once more, first seq kept
    s.park(CC, "late:1", "late", None)  # no seq: now
    w.clock.now += SEC
    assert s.snapshot(CC) == ParkSnapshot(0, 5, 0, None, T0 - 30)
    assert s.promote(CC, LEASES, 2) == 2
    assert [c.park_id for c in s.claim(CC, 10, CLAIM)] == ["t0:1", "t0:2"]  # both seq T0-30: by id
    w.clock.now += SEC
    assert s.promote(CC, LEASES, 3) == 1  # 2 of the 3 slots are claimed: on their way
    assert s.release(CC) == 2
    assert [c.park_id for c in s.claim(CC, 10, CLAIM)] == ["late:1", "t1:1", "t2:1"]


def test_promote_never_moves_more_than_the_free_slots(w):
    s = w.store
    for i in range(6):
        s.park(CC, f"t{i}:1", "{}", None, T0 + i)
    w.lease("a")
    w.lease("b", ttl=2 * SEC)
    assert s.promote(CC, LEASES, 1) == 0  # over the cap already
    assert s.promote(CC, LEASES, 3) == 1
    assert s.promote(CC, LEASES, 3) == 0  # the promoted one is due: it will take the slot
    w.clock.now += 2 * SEC  # b expired
    assert s.promote(CC, LEASES, 3) == 1
    assert s.snapshot(CC) == ParkSnapshot(2, 4, 0, T0, T0)
    [first, second] = s.claim(CC, 10, CLAIM)
    assert s.ack(CC, first.park_id, first.pub) and s.ack(CC, second.park_id, second.pub)
    assert s.snapshot(CC) == ParkSnapshot(0, 4, 0, None, T0 + 2, 2, 0)
    assert s.promote(CC, LEASES, 3) == 0  # published, not arrived yet: on their way to take a slot
    assert s.redeem(CC, first.park_id, first.pub)  # arrived (it leases, or parks again, now)
    assert s.promote(CC, LEASES, 3) == 1
    w.clock.now += CLAIM  # the second never arrived (lost): its claim's expiry frees its slot
    assert s.promote(CC, LEASES, 3) == 1
    assert s.snapshot(CC).published == 0


def test_a_published_id_is_counted_only_at_a_concurrency_spot(w):
    s = w.store
    s.park(RL, "a:1", "{}", 0)
    [claimed] = s.claim(RL, 10, CLAIM)
    assert s.ack(RL, claimed.park_id, claimed.pub)
    assert s.snapshot(RL) == ParkSnapshot(0, 0, 0, None, None, 0, 0)


def test_promotion_aims_one_over_the_cap_for_a_standby(w):
    """Standby slots: one waiter more than the cap is woken, to hold on for the next slot; a live
    standby fills that slot, an expired one does not, and only ``slots`` standbys hold on at once."""
    s = w.store
    for i in range(4):
        s.park(CC, f"t{i}:1", "{}", None, T0 + i)
    w.lease("a")
    w.lease("b")
    assert s.promote(CC, LEASES, 2) == 0
    assert s.standby(CC, "x", 5 * SEC)
    assert not s.standby(CC, "y", 5 * SEC)  # one standby per limit
    assert s.promote(CC, LEASES, 2, standby=1) == 0  # the standby holds the extra slot
    assert s.snapshot(CC).standbys == 1
    w.clock.now += 5 * SEC  # its time is up (its worker died): not counted, replaced
    assert s.promote(CC, LEASES, 2, standby=1) == 1
    assert s.standby(CC, "y", 5 * SEC)
    assert s.snapshot(CC).standbys == 1  # the expired one was dropped
    assert not s.unstandby(CC, "x") and s.unstandby(CC, "y") and not s.unstandby(CC, "y")
    assert s.promote(CC, LEASES, 2, standby=1) == 0  # one due already fills the extra slot
    assert s.standby(CC, "z", 5 * SEC, slots=2) and s.standby(CC, "w", 5 * SEC, slots=2)
    assert not s.standby(CC, "v", 5 * SEC, slots=2)


def test_a_release_rings_the_standby_and_promotes_its_successor(w):
    """A release while a standby holds on rings its bell in this process (Redis: over the standby
    channel) and wakes the next waiter, the standby's successor."""
    s = w.store
    s.park(CC, "t0:1", "{}", None, T0)
    s.park(CC, "t1:1", "{}", None, T0 + 1)
    w.lease("a")
    bell = s.standby_bell(CC)
    other = s.standby_bell(Spot("concurrency", "other"))
    try:
        s.release_lease(CC, LEASES, "a", 1, 1)  # no standby: not rung; 2 slots free (cap + 1)
        assert not bell.wait(0.3)
        assert s.snapshot(CC).due == 1  # one per release
        w.lease("b")
        assert s.standby(CC, "x", 5 * SEC)
        s.release_lease(CC, LEASES, "b", 1, 1)
        assert bell.wait(5) and not other.is_set()
        assert s.snapshot(CC).due == 1  # b's slot goes to the standby: the due one still fills cap + 1
        assert w.leases.acquire(LEASES, 1, "x-lease", 60 * SEC, now=w.clock.now).granted
        assert s.unstandby(CC, "x")
        bell.clear()
        s.release_lease(CC, LEASES, "x-lease", 1, 1)  # nobody holds on
        assert not bell.wait(0.3)
        assert s.snapshot(CC).due == 2
    finally:
        s.standby_unbell(CC, bell)
        s.standby_unbell(Spot("concurrency", "other"), other)


def test_releasing_a_lease_wakes_one_waiter_in_the_same_step(w):
    s = w.store
    w.lease("a")
    w.lease("b")
    s.park(CC, "t0:1", "{}", None, T0 - 2)
    s.park(CC, "t1:1", "{}", None, T0 - 1)
    s.release_lease(CC, LEASES, "a", 2)
    assert w.leases.count(LEASES, now=w.clock.now) == 1
    assert s.snapshot(CC) == ParkSnapshot(1, 1, 0, w.clock.now, T0 - 1)
    s.release_lease(CC, LEASES, "never-held", 2)  # the promoted one has not leased yet: no slot
    assert s.snapshot(CC).due == 1
    s.release_lease(CC, LEASES, "b", 2)
    assert s.snapshot(CC) == ParkSnapshot(2, 0, 0, w.clock.now, w.clock.now)


def test_a_release_that_makes_a_waiter_due_announces_its_spot_to_the_movers(w, where):
    """Only a release that moved a waiter publishes (movers then claim at once, not next round)."""
    if where == "memory":
        pytest.skip("the wake channel is Redis pub/sub; a mover on the memory store runs rounds only")
    redis_world = w
    s, connector = w.store, w.connector
    pubsub = connector.client.pubsub()
    pubsub.subscribe(keys.park_wake_channel("tuning"))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    def heard() -> list:
        out = []
        while True:
            message = pubsub.get_message(timeout=0.5)
            if message is None:
                return out
            out.append(message["data"])

    redis_world.lease("a")
    redis_world.lease("b")
    s.release_lease(CC, LEASES, "a", 2)  # nobody waits
    assert heard() == []
    s.park(CC, "t0:1", "{}", None, T0)
    s.release_lease(CC, LEASES, "b", 2)
    assert heard() == [b"cc:pdf"]
    assert s.promote(CC, LEASES, 2) == 0 and heard() == []  # a mover's own promote stays quiet
    pubsub.close()


def test_release_makes_everything_due_now_and_purge_drops_everything(w):
    s = w.store
    s.park(RL, "a:1", "{}", 100 * SEC)
    s.park(RL, "b:1", "{}", 0)
    s.park(RL, "c:1", "{}", None)
    assert s.release(RL) == 2
    assert len(s.claim(RL, 1, CLAIM)) == 1
    assert s.snapshot(RL) == ParkSnapshot(2, 0, 1, T0, T0)
    assert s.purge(RL) == 3
    assert s.snapshot(RL) == ParkSnapshot(0, 0, 0, None, None)
    w.clock.now += 2 * CLAIM
    assert s.claim(RL, 10, CLAIM) == []
    assert s.purge(RL) == 0


def test_entries_whose_payload_is_gone_are_dropped(w):
    if w.connector is None:
        pytest.skip("only Redis can lose one key of a spot (a partial eviction)")
    w.store.park(RL, "a:1", "{}", 0)
    w.store.park(RL, "b:1", "{}", 0)
    msg = keys.park_keys("tuning", RL.reason, RL.name).msg
    w.connector.run(lambda c: c.hdel(msg, "a:1"))
    assert w.store.claim(RL, 10, CLAIM) == [Claimed("b:1", "{}", 1)]
    assert w.store.snapshot(RL).due == 0


def test_tickets_are_trimmed_a_bounded_number_per_call(make_world):
    w = make_world(ticket_ttl_us=10 * SEC)
    s = w.store
    for i in range(150):
        s.park(RL, f"t{i:03}:1", "{}", 0)
    claimed = s.claim(RL, 200, CLAIM)
    assert len(claimed) == 150
    for c in claimed:
        assert s.ack(RL, c.park_id, c.pub)
    w.clock.now += 10 * SEC  # every ticket may go now: one call drops 100 of them
    assert s.redeem(RL, "t149:1", 0) is False  # t000..t099 went; t149's ticket (pub 1) is still there
    assert s.redeem(RL, "t149:1", 0) is True  # the next call dropped the other 50
    assert s.redeem(RL, "t000:1", 0) is True
    if w.connector is not None:
        tix = keys.park_keys("tuning", RL.reason, RL.name).tix
        assert w.connector.run(lambda c: c.hlen(tix)) == 2  # the two redeemed just now


def test_now_is_the_stores_clock(w):
    assert w.store.now_us() == T0


def test_a_64_kib_payload_round_trips(w):
    payload = json.dumps({"args": ["é" * 10 + "x" * (64 * 1024)], "kwargs": {"k": "\u2603"}})
    w.store.park(RL, "big:1", payload, 0)
    [claimed] = w.store.claim(RL, 1, CLAIM)
    assert claimed.payload == payload


@pytest.fixture()
def redis_world(make_world, where) -> World:
    if where == "memory":
        pytest.skip("key expiry and memory are Redis matters")
    return make_world()


def test_reading_the_index_keeps_it_alive_for_waiters_older_than_the_ticket_ttl(make_world, where):
    if where == "memory":
        pytest.skip("key expiry is a Redis matter")
    w = make_world(ticket_ttl_us=3 * SEC)
    index = keys.park_index_key("tuning")
    w.store.park(CC, "c:0:1", "{}", None)
    w.connector.run(lambda c: c.pexpire(index, 100))  # as if the last park was long ago
    assert w.store.spots() == [CC]
    assert w.connector.run(lambda c: c.pttl(index)) > 3000


def test_every_key_has_a_bounded_ttl(redis_world):
    w = redis_world
    s = w.store
    s.park(RL, "a:1", "{}", 100 * SEC)
    s.park(RL, "b:1", "{}", 0)
    s.park(CC, "c:1", "{}", None)
    [claimed] = s.claim(RL, 10, CLAIM)
    assert s.ack(RL, claimed.park_id, claimed.pub)
    assert s.redeem(RL, "b:1", claimed.pub)
    s.promote(CC, LEASES, 5)
    s.park(CC, "d:1", "{}", 0)
    published = s.claim(CC, 10, CLAIM)[0]  # c:1 (promoted) acked; d:1 stays claimed
    assert s.ack(CC, published.park_id, published.pub)
    spot_keys = [*keys.park_keys("tuning", RL.reason, RL.name), *keys.park_keys("tuning", CC.reason, CC.name),
                 keys.park_handover_keys("tuning", CC.reason, CC.name).pub]
    present = [k for k in spot_keys if w.connector.run(lambda c, k=k: c.exists(k))]
    assert len(present) >= 7  # due, msg, tix, tixat of RL; msg, claim, pub of CC at least
    day_ms = 86_400_000
    for key in [*present, keys.park_index_key("tuning")]:
        pttl = w.connector.run(lambda c, key=key: c.pttl(key))
        # longest due (100 s) + ticket TTL + 1 s of slack, and never without one
        assert day_ms < pttl <= day_ms + 101_000, (key, pttl)
    # A standby's entry lives its own short time, never the ticket TTL.
    assert s.standby(CC, "x", 5 * SEC)
    standby_key = keys.park_handover_keys("tuning", CC.reason, CC.name).standby
    assert 5000 < w.connector.run(lambda c: c.pttl(standby_key)) <= 6000
    s.park(CC, "e:1", "{}", None)
    assert 5000 < w.connector.run(lambda c: c.pttl(standby_key)) <= 6000


def test_redis_memory_per_parked_entry(redis_world, capsys):
    """The issue's bound: Redis memory per parked task <= message size + 512 bytes."""
    w = redis_world
    s = w.store
    n, size = 2000, 1024
    payload = json.dumps({"x": "y" * (size - 9)})
    assert len(payload) == size
    spot_keys = keys.park_keys("tuning", RL.reason, RL.name)

    def used() -> int:
        return sum(int(w.connector.run(lambda c, k=k: c.memory_usage(k, samples=0)) or 0) for k in spot_keys)

    import uuid

    ids = [f"{uuid.uuid4()}:{i % 7}" for i in range(n)]
    for i, park_id in enumerate(ids):
        s.park(RL, park_id, payload, i)
    parked = used() / n
    w.clock.now += n  # all due
    claimed = [c for _ in range(n // 100) for c in s.claim(RL, 100, CLAIM)]
    assert len(claimed) == n
    in_flight = used() / n  # claimed, with a ticket each
    for c in claimed:
        s.ack(RL, c.park_id, c.pub)
    ticket = used() / n  # what stays after publishing: the ticket only
    with capsys.disabled():
        print(f"\nRedis bytes per entry with a {size}-byte payload: parked {parked:.0f}, "
              f"claimed {in_flight:.0f}, ticket after publishing {ticket:.0f}")
    assert parked <= size + 512
    # A claimed entry also holds its ticket; at most `batch` per mover are claimed at any time.
    assert in_flight <= parked + 512
    assert ticket <= 512


# -- the spots of a per-key limit's caller keys (issue #18) ---------------------------------------

def keyed(tenant: str, limit: str = "pdf") -> Spot:
    return Spot("concurrency", keys.keyed_spot_name(limit, keys.key_digest(tenant)))


def key_leases(tenant: str, limit: str = "pdf") -> str:
    return keys.lease_key("tuning", limit, keys.key_digest(tenant))


def test_a_caller_keys_spot_is_listed_while_it_holds_entries_and_only_then(w):
    """A key's spot joins the index with its first entry and leaves it in the step that removes its
    last (ack, redeem, purge); published ids do not keep it listed; parking lists it again."""
    s = w.store
    acme, other = keyed("acme"), keyed("other")
    s.park(acme, "a:0:1", "{}", None)
    s.park(other, "o:0:1", "{}", None)
    s.park(CC, "c:0:1", "{}", None)  # the limit's own spot stays listed as before
    assert s.spots() == sorted([CC, acme, other])
    assert s.promote(acme, key_leases("acme"), 1) == 1
    [claimed] = s.claim(acme, 10, CLAIM)
    assert s.spots() == sorted([CC, acme, other])  # claimed: still the mover's
    assert s.ack(acme, claimed.park_id, claimed.pub)
    assert s.snapshot(acme).published == 1  # on its way to a worker: no mover needed
    assert s.spots() == sorted([CC, other])
    assert s.redeem(acme, claimed.park_id, claimed.pub)
    assert s.spots() == sorted([CC, other])
    assert s.purge(other) == 1
    assert s.spots() == [CC]
    s.park(acme, "a:0:2", "{}", None)
    assert s.spots() == sorted([CC, acme])
    assert s.redeem(acme, "a:0:2", 1)  # the worker ran it straight from a waiter (a redelivery)
    assert s.spots() == [CC]


def test_a_call_that_already_ran_does_not_list_its_keys_spot(w):
    s, acme = w.store, keyed("acme")
    s.park(acme, "a:0:1", "{}", 0)
    [claimed] = s.claim(acme, 10, CLAIM)
    assert s.redeem(acme, claimed.park_id, claimed.pub) and s.spots() == []
    assert s.park(acme, "a:0:1", "{}", None) is False  # the redelivered original: nothing parks
    assert s.spots() == []


def test_a_thousand_tenants_parked_and_drained_leave_nothing_in_the_index(w, where):
    """Review finding: every tenant that ever parked stayed in the index and each mover round visited
    it. 1,000 keys park (as FIFO waiters, promoted, or made due at once, as a release does), are
    claimed, published (acked) and run (redeemed), or purged: no spot of theirs is listed, and the
    index holds one member for the limit (a count, not a time)."""
    s = w.store
    tenants = [f"tenant-{i}" for i in range(1000)]
    for i, tenant in enumerate(tenants):
        s.park(keyed(tenant), f"t{i}:0:1", "{}", None if i % 2 else 0)
    assert len(s.spots()) == len(tenants)
    for i, tenant in enumerate(tenants):
        spot = keyed(tenant)
        if i % 10 == 0:
            assert s.purge(spot) == 1
            continue
        if i % 2:
            assert s.promote(spot, key_leases(tenant), 1) == 1
        [claimed] = s.claim(spot, 10, CLAIM)
        assert s.ack(spot, claimed.park_id, claimed.pub)
        if i % 4 == 1:
            assert s.redeem(spot, claimed.park_id, claimed.pub)
    assert s.spots() == []
    if where != "memory":
        index = w.connector.run(lambda c: c.smembers(keys.park_index_key("tuning")))
        assert index == {keys.park_keyed_index_member("pdf").encode()}
        key_index = keys.park_key_index_key("tuning", "concurrency", "pdf")
        assert w.connector.run(lambda c: c.scard(key_index)) == 0


def test_a_keys_index_outlives_its_spots_keys(make_world, where):
    if where == "memory":
        pytest.skip("key expiry is a Redis matter")
    w = make_world(ticket_ttl_us=3 * SEC)
    acme = keyed("acme")
    w.store.park(acme, "a:0:1", "{}", 50 * SEC)
    key_index = keys.park_key_index_key("tuning", "concurrency", "pdf")
    assert key_index.startswith("tuning:park:{pdf}:")  # the limit's slot, with its keys' spots
    spot_ttl = w.connector.run(lambda c: c.pttl(w.store.keys(acme).due))
    index_ttl = w.connector.run(lambda c: c.pttl(key_index))
    assert 53_000 <= spot_ttl <= 54_000 and spot_ttl - 100 <= index_ttl <= 54_000  # read a moment apart
    w.connector.run(lambda c: c.pexpire(key_index, 100))  # a spot with a shorter life does not cut it
    w.store.park(keyed("other"), "o:0:1", "{}", None)
    assert w.connector.run(lambda c: c.pttl(key_index)) >= 3000
