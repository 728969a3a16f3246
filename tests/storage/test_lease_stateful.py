"""Differential state machine: random lease operations through MemoryLeaseStore and the Lua scripts.

One injected clock drives both; Redis losing everything (FLUSHDB, a restart without persistence)
is modelled by a fresh memory store. Any answer that differs fails the test.
"""

from __future__ import annotations

import itertools
from typing import Dict, List

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from celery_tuning.errors import StorageError
from celery_tuning.storage.lease import MemoryLeaseStore, RedisLeaseStore
from celery_tuning.storage.redis import RedisConnector, hash_tag

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000
SEC = 1_000_000
KEYS = [hash_tag("tuning", "cc", "a"), hash_tag("tuning", "cc", "b")]
# Redis expires the set itself in real time (its longest lease + 1 s); every TTL here outlives an example.
TTLS = st.sampled_from([10 * SEC, 30 * SEC, 90 * SEC])
keys = st.sampled_from(KEYS)


class LeaseMachine(RuleBasedStateMachine):
    server = None  # the fault_redis of the running test
    real_restarts = 0  # how many restarts may still kill the server for real
    max_restarts = 1  # per example

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.memory = MemoryLeaseStore(clock=lambda: self.now)
        self.redis = RedisLeaseStore(self.connector())
        self.held: Dict[str, List[str]] = {key: [] for key in KEYS}
        self.ids = itertools.count()
        self.restarts = 0

    def connector(self) -> RedisConnector:
        return RedisConnector(self.server.db_url(0))

    def wipe(self) -> None:
        self.server.client(0).flushdb()

    @initialize()
    def empty(self) -> None:
        self.wipe()

    def _lost(self) -> None:
        self.memory = MemoryLeaseStore(clock=lambda: self.now)

    @rule(key=keys, cap=st.integers(1, 3), ttl=TTLS)
    def acquire(self, key: str, cap: int, ttl: int) -> None:
        lease = f"lease-{next(self.ids)}"
        expected = self.memory.acquire(key, cap, lease, ttl)  # the memory store reads the clock itself
        got = self.redis.acquire(key, cap, lease, ttl, now=self.now)
        assert got == expected
        if got.granted:
            self.held[key].append(lease)

    @rule(key=keys, ttl=TTLS, data=st.data())
    def renew(self, key: str, ttl: int, data: st.DataObject) -> None:
        held = self.held[key]
        leases = data.draw(st.lists(st.sampled_from(held), unique=True)) if held else []
        assert self.redis.renew(key, leases, ttl, now=self.now) == self.memory.renew(key, leases, ttl)
        live = self.redis.count(key, now=self.now)
        assert live >= len(leases)  # whatever was lost, the renewed leases are all back

    @rule(key=keys, data=st.data())
    def release(self, key: str, data: st.DataObject) -> None:
        held = self.held[key]
        lease = data.draw(st.sampled_from(held)) if held else "never-held"
        if lease in held:
            held.remove(lease)
        self.memory.release(key, lease)
        self.redis.release(key, lease)

    @rule(gap=st.one_of(st.integers(0, 2 * SEC), st.integers(0, 100 * SEC)))
    def advance(self, gap: int) -> None:
        self.now += gap

    @rule()
    def flushdb(self) -> None:
        self.wipe()
        self._lost()

    @precondition(lambda self: self.restarts < self.max_restarts)
    @rule()
    def restart(self) -> None:
        """No persistence: data and loaded scripts are gone; the pool's sockets are dead."""
        self.restarts += 1
        if LeaseMachine.real_restarts > 0:
            LeaseMachine.real_restarts -= 1
            self.server.restart()
        else:
            # A real restart costs ~2 s here; what clients see of one, for a fraction of that.
            admin = self.server.client(0)
            admin.script_flush()
            admin.flushall()
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        self._lost()
        for _ in range(3):
            try:
                self.redis.count(KEYS[0], now=self.now)
                return
            except StorageError:
                continue  # a dead pooled connection is dropped; the next call reconnects
        raise AssertionError("the store did not reconnect after a restart")

    @invariant()
    def same_counts(self) -> None:
        for key in KEYS:
            assert self.redis.count(key, now=self.now) == self.memory.count(key)


def test_memory_and_redis_lease_stores_agree(fault_redis):
    LeaseMachine.server = fault_redis
    LeaseMachine.real_restarts = 2
    try:
        run_state_machine_as_test(
            LeaseMachine,
            settings=settings(max_examples=80, stateful_step_count=40, deadline=None,
                              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]),
        )
    finally:
        LeaseMachine.server = None


class ClusterLeaseMachine(LeaseMachine):
    """The same machine on a Redis Cluster (both keys' slots differ; restarts are left to the single server)."""

    cluster = None
    shared = None
    max_restarts = 0

    def connector(self) -> RedisConnector:
        return self.shared

    def wipe(self) -> None:
        for node in self.cluster.nodes:
            node.client().flushall()


def test_memory_and_cluster_lease_stores_agree(cluster_clean):
    ClusterLeaseMachine.cluster = cluster_clean
    ClusterLeaseMachine.shared = RedisConnector(cluster_clean.url)
    try:
        run_state_machine_as_test(
            ClusterLeaseMachine,
            settings=settings(max_examples=30, stateful_step_count=30, deadline=None,
                              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]),
        )
    finally:
        ClusterLeaseMachine.cluster = ClusterLeaseMachine.shared = None
