"""Differential state machine: random parking sequences through MemoryParkStore and the park_*.lua scripts.

One manual clock drives both stores and both lease stores (the Redis ones send it to the scripts as
their "now"). Rules: park (delayed, FIFO with and without a sequence, re-parks of the same id),
claim, ack and redeem with current and stale pubs, promote and release_lease (with and without a
standby slot) against leases added and removed on the limit's lease set, standbys holding on and
letting go, release, purge, time passing (claims, published ids and standbys expire, tickets are
trimmed) and Redis losing everything (FLUSHDB), whose reference is a memory store that never saw
anything. Any answer or snapshot that differs fails, and so does an entry that vanishes.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Set, Tuple

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from celery_tuning.storage import keys
from celery_tuning.storage.lease import MemoryLeaseStore, RedisLeaseStore
from celery_tuning.storage.park import MemoryParkStore, RedisParkStore, Spot
from celery_tuning.storage.redis import RedisConnector

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000
SEC = 1_000_000
#: Short enough for tickets to be trimmed within an example (the keys' real TTLs stay > 60 s).
TICKET_TTL = 60 * SEC
CC = Spot("concurrency", "pdf")
#: Two caller keys' spots of limit pdf (listed by its key index only while they hold entries).
KEYED = [Spot("concurrency", keys.keyed_spot_name("pdf", keys.key_digest(t))) for t in ("acme", "}b")]
SPOTS = [Spot("rate_limit", "api"), CC, Spot("circuit_open", "}x"), *KEYED]
LEASES = keys.lease_key("tuning", CC.name)
#: The lease set each concurrency spot's promote counts.
LEASES_OF = {CC: LEASES, **{spot: keys.lease_key("tuning", "pdf", keys.split_keyed_spot(spot.name)[1])
                            for spot in KEYED}}
IDS = ["t0:1", "t0:2", "t1:1", "t2:1", "t3:1", "é:1"]
TOKENS = ["s0", "s1", "s2"]

spots = st.sampled_from([*SPOTS, CC])  # the concurrency spot (promote, leases) twice as often
ids = st.sampled_from(IDS)
delays = st.one_of(st.none(), st.none(), st.just(0), st.integers(0, 5 * SEC), st.integers(-SEC, 40 * SEC))
seqs = st.one_of(st.none(), st.integers(T0 - 10 * SEC, T0 + 10 * SEC))
claim_ttls = st.sampled_from([SEC, 5 * SEC, 30 * SEC])
gaps = st.one_of(st.integers(0, 2 * SEC), st.integers(0, 70 * SEC))


class ParkStoresAgree(RuleBasedStateMachine):
    """The machine on one Redis server; the Cluster subclass swaps the connector and the flush."""

    server = None

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        connector = self.connector()
        self.redis = RedisParkStore(connector, clock=self.clock, ticket_ttl_us=TICKET_TTL)
        self.redis_leases = RedisLeaseStore(connector)
        self._fresh_memory()
        self.lease_ids = itertools.count()
        self.held: List[str] = []
        #: (spot, id) -> pubs a mover was handed; ids the model knows are parked somewhere.
        self.pubs: Dict[Tuple[Spot, str], List[int]] = {}
        self.parked: Set[Tuple[Spot, str]] = set()

    def clock(self) -> int:
        return self.now

    def connector(self) -> RedisConnector:
        return RedisConnector(self.server.db_url(0))

    def wipe(self) -> None:
        self.server.client(0).flushdb()

    def _fresh_memory(self) -> None:
        self.memory_leases = MemoryLeaseStore(clock=self.clock)
        self.memory = MemoryParkStore(clock=self.clock, leases=self.memory_leases, ticket_ttl_us=TICKET_TTL)

    @initialize(population=st.lists(st.tuples(spots, ids, delays, seqs), max_size=10))
    def populate(self, population: List[Tuple[Spot, str, int, int]]) -> None:
        """Start from an empty Redis, with some entries parked already (most rules need some)."""
        self.wipe()
        for spot, park_id, delay, seq in population:
            self.park(spot, park_id, delay, seq, 3)

    @rule(spot=spots, park_id=ids, delay=delays, seq=seqs, size=st.sampled_from([0, 3, 300]))
    def park(self, spot: Spot, park_id: str, delay: int, seq: int, size: int) -> None:
        payload = f'{{"id": "{park_id}", "at": {self.now}, "pad": "{"x" * size}"}}'
        parked = self.redis.park(spot, park_id, payload, delay, seq)
        assert parked == self.memory.park(spot, park_id, payload, delay, seq)
        if parked:  # False: that id's call already ran (redeemed), nothing parks
            self.parked.add((spot, park_id))

    @rule(spot=spots, batch=st.integers(0, 4), ttl=claim_ttls)
    def claim(self, spot: Spot, batch: int, ttl: int) -> None:
        got = self.redis.claim(spot, batch, ttl)
        assert got == self.memory.claim(spot, batch, ttl)
        assert len(got) <= batch
        for claimed in got:
            self.pubs.setdefault((spot, claimed.park_id), []).append(claimed.pub)

    def _pub(self, data: st.DataObject, spot: Spot, park_id: str) -> int:
        known = self.pubs.get((spot, park_id), [])
        return data.draw(st.sampled_from(known) if known else st.integers(0, 3))

    @rule(spot=spots, park_id=ids, data=st.data())
    def ack(self, spot: Spot, park_id: str, data: st.DataObject) -> None:
        pub = self._pub(data, spot, park_id)
        acked = self.redis.ack(spot, park_id, pub)
        assert acked == self.memory.ack(spot, park_id, pub)
        if acked:
            self.parked.discard((spot, park_id))

    @rule(spot=spots, park_id=ids, data=st.data())
    def unclaim(self, spot: Spot, park_id: str, data: st.DataObject) -> None:
        pub = self._pub(data, spot, park_id)
        assert self.redis.unclaim(spot, park_id, pub) == self.memory.unclaim(spot, park_id, pub)

    @rule(data=st.data(), any_id=st.integers(0, 4))
    def redeem(self, data: st.DataObject, any_id: int) -> None:
        # Mostly what a worker receives: an entry a mover was handed; now and then anything.
        if self.pubs and any_id:
            spot, park_id = data.draw(st.sampled_from(sorted(self.pubs)))
        else:
            spot, park_id = data.draw(spots), data.draw(ids)
        pub = self._pub(data, spot, park_id)
        ran = self.redis.redeem(spot, park_id, pub)
        assert ran == self.memory.redeem(spot, park_id, pub)
        if ran:
            self.parked.discard((spot, park_id))
            assert self.redis.redeem(spot, park_id, pub)  # the same publication again: still runs
            assert self.memory.redeem(spot, park_id, pub)

    @rule(seq=seqs, park_id=ids, spot=st.sampled_from([CC, CC, *KEYED]))
    def wait(self, seq: int, park_id: str, spot: Spot) -> None:
        self.park(spot, park_id, None, seq, 0)

    @rule(ttl=st.sampled_from([5 * SEC, 20 * SEC]))  # the lease set lives ttl + 1 s in real time
    def lease(self, ttl: int) -> None:
        lease_id = f"lease-{next(self.lease_ids)}"
        self.memory_leases.acquire(LEASES, 100, lease_id, ttl)
        self.redis_leases.acquire(LEASES, 100, lease_id, ttl, now=self.now)
        self.held.append(lease_id)

    @rule(data=st.data())
    def drop_lease(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(self.held)) if self.held else "never-held"
        self.memory_leases.release(LEASES, lease_id)
        self.redis_leases.release(LEASES, lease_id)

    @rule(cap=st.integers(0, 4), standby=st.integers(0, 1), spot=st.sampled_from([CC, CC, *KEYED]))
    def promote(self, cap: int, standby: int, spot: Spot = CC) -> None:
        live = self.memory_leases.count(LEASES_OF[spot])
        moved = self.redis.promote(spot, LEASES_OF[spot], cap, standby)
        assert moved == self.memory.promote(spot, LEASES_OF[spot], cap, standby)
        assert moved <= max(0, cap + standby - live)

    @rule(cap=st.integers(0, 4), standby=st.integers(0, 1), data=st.data())
    def release_lease(self, cap: int, standby: int, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(self.held)) if self.held else "never-held"
        self.memory.release_lease(CC, LEASES, lease_id, cap, standby)
        self.redis.release_lease(CC, LEASES, lease_id, cap, standby)

    @rule(batch=st.integers(1, 3), ttl=claim_ttls, cap=st.integers(0, 3), standby=st.integers(0, 1),
          spot=st.sampled_from([CC, CC, *KEYED]))
    def mover_round(self, batch: int, ttl: int, cap: int, standby: int, spot: Spot = CC) -> None:
        """What a mover does at a concurrency spot (the limit's, or a caller key's: no standby there):
        promote, claim, publish (ack): the acked ids are on their way (published) and count against
        the free slots."""
        self.promote(cap, standby if spot == CC else 0, spot)
        self.claim(spot, batch, ttl)
        for (at, park_id), pubs in sorted(self.pubs.items()):
            if at == spot:
                acked = self.redis.ack(at, park_id, pubs[-1])
                assert acked == self.memory.ack(at, park_id, pubs[-1])
                if acked:
                    self.parked.discard((at, park_id))

    # The standby set lives its latest standby's time + 1 s in real time: 5 s at least here.
    @rule(token=st.sampled_from(TOKENS), ttl=st.sampled_from([5 * SEC, 20 * SEC]), slots=st.integers(1, 2))
    def standby(self, token: str, ttl: int, slots: int) -> None:
        assert self.redis.standby(CC, token, ttl, slots) == self.memory.standby(CC, token, ttl, slots)

    @rule(token=st.sampled_from(TOKENS))
    def unstandby(self, token: str) -> None:
        assert self.redis.unstandby(CC, token) == self.memory.unstandby(CC, token)

    @rule(spot=spots, park_id=ids)
    def seen(self, spot: Spot, park_id: str) -> None:
        assert self.redis.seen(spot, park_id) == self.memory.seen(spot, park_id)

    @rule(spot=spots)
    def release(self, spot: Spot) -> None:
        assert self.redis.release(spot) == self.memory.release(spot)

    @rule(spot=spots, roll=st.integers(0, 3))
    def purge(self, spot: Spot, roll: int) -> None:
        if roll:
            return  # rarer than the rest: it empties a spot
        assert self.redis.purge(spot) == self.memory.purge(spot)
        self.parked = {entry for entry in self.parked if entry[0] != spot}

    @rule(gap=gaps)
    def advance(self, gap: int) -> None:
        self.now += gap

    @rule(spot=spots, edge=st.sampled_from(["due", "claim", "tixat", "pub", "standby"]),
          off=st.sampled_from([-1, 0, 1]))
    def advance_to_an_edge(self, spot: Spot, edge: str, off: int) -> None:
        """Step to just before, onto or just past the next due time, claim expiry, ticket drop,
        published id's expiry or standby's end."""
        times = [t for t in getattr(self.memory._state(spot), edge).values() if t + off > self.now]
        if times:
            self.now = min(times) + off

    @rule(roll=st.integers(0, 5))
    def flushdb(self, roll: int) -> None:
        if roll:
            return  # rarer than the rest: it empties everything
        self.wipe()
        self._fresh_memory()
        self.parked.clear()
        self.pubs.clear()

    @invariant()
    def same_state(self) -> None:
        for spot in SPOTS:
            snapshot = self.redis.snapshot(spot)
            assert snapshot == self.memory.snapshot(spot)
            assert self.redis.next_due_us(spot) == snapshot.next_due_us
        assert self.redis.spots() == self.memory.spots()
        assert self.redis.now_us() == self.now

    @invariant()
    def nothing_vanishes(self) -> None:
        """Every entry parked and not redeemed, acked, purged or flushed since is due, waiting or
        claimed in Redis, with its payload (expired claims included: they come back)."""
        client = self.redis.connector.client
        for spot, park_id in self.parked:
            k = self.redis.keys(spot)
            where = [client.zscore(key, park_id) is not None for key in (k.due, k.wait, k.claim)]
            assert sum(where) == 1, (spot, park_id, where)
            assert client.hexists(k.msg, park_id), (spot, park_id)


#: No "explain" phase: its line tracer makes shrinking a failure here outlast the test timeout.
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])


def test_memory_and_redis_park_stores_agree(redis_clean):
    ParkStoresAgree.server = redis_clean
    try:
        run_state_machine_as_test(ParkStoresAgree,
                                  settings=settings(max_examples=80, stateful_step_count=50, **SETTINGS))
    finally:
        ParkStoresAgree.server = None


class ClusterParkStoresAgree(ParkStoresAgree):
    """The same machine on a Redis Cluster (the index lives in another slot than the spots)."""

    cluster = None
    shared = None

    def connector(self) -> RedisConnector:
        return self.shared

    def wipe(self) -> None:
        for node in self.cluster.nodes:
            node.client().flushall()


def test_memory_and_cluster_park_stores_agree(cluster_clean):
    ClusterParkStoresAgree.cluster = cluster_clean
    ClusterParkStoresAgree.shared = RedisConnector(cluster_clean.url)
    try:
        run_state_machine_as_test(ClusterParkStoresAgree,
                                  settings=settings(max_examples=40, stateful_step_count=40, **SETTINGS))
    finally:
        ClusterParkStoresAgree.cluster = ClusterParkStoresAgree.shared = None
