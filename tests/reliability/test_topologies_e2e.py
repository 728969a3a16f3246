"""Workers whose tuning state lives on a Redis Cluster, and on Sentinel through a failover."""

from __future__ import annotations

import time

import pytest
import redis

from celery_tuning.testing import RedisSentinelServers
from tests.support.reliable import run_reliable

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]


def test_every_capability_with_tuning_state_on_a_cluster(redis_clean, cluster_clean):
    seen = set()

    def look():  # limiter buckets expire as soon as they are full again: look while tasks run
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(k.startswith("tuning:rl:{") for k in seen):
            for node in cluster_clean.nodes:
                seen.update(k.decode() for k in node.client().keys("tuning:*"))
            time.sleep(0.01)

    values, runs, output, _ = run_reliable(redis_clean, cluster_clean.url, 120, during=look)
    assert values == list(range(120))
    assert sorted(runs) == list(range(120)) and set(runs.values()) == {1}
    assert "Traceback" not in output, output[-3000:]
    # the state really went to the cluster, keys of one owner in one slot (hash tags)
    for node in cluster_clean.nodes:
        seen.update(k.decode() for k in node.client().keys("tuning:*"))
    assert any(k.startswith("tuning:rl:{") for k in seen), sorted(seen)[:10]
    assert any(k.startswith("tuning:cache:{") for k in seen), sorted(seen)[:10]
    # (a closed breaker that never failed writes no key; its script ran on the cluster all along, and
    # tests/storage/test_breaker_contract.py runs every breaker transition against the cluster)


def test_a_sentinel_failover_during_a_run_loses_nothing(redis_clean):
    servers = RedisSentinelServers().start()
    promoted = []

    def fail_over():
        servers.master.stop()  # SIGKILL: the sentinel promotes the replica after ~1 s
        sentinel = redis.Redis(host="127.0.0.1", port=servers.sentinel_port, socket_timeout=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the sentinel names the replica as the master
            try:
                addr = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", servers.master_name)
                if addr and int(addr[1]) == servers.replica.port:
                    promoted.append(len(servers.replica.client().keys("tuning:cache:*")))
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)

    try:
        values, runs, output, _ = run_reliable(redis_clean, servers.url, 200, during=fail_over)
        cache_keys_after = len(servers.replica.client().keys("tuning:cache:*"))
    finally:
        servers.close()
    assert promoted, "the sentinel did not promote the replica"
    assert values == list(range(200))
    assert sorted(runs) == list(range(200)) and set(runs.values()) == {1}
    # the 100 calls published after the promotion stored their results on the promoted replica
    assert cache_keys_after >= promoted[0] + 50, (promoted, cache_keys_after)
    assert "Traceback" not in output, output[-3000:]
