"""The connector against a real Redis Cluster and a real Sentinel deployment on loopback."""

import pytest
import redis

from celery_tuning.storage.redis import RedisConnector, hash_tag
from celery_tuning.testing import RedisSentinelServers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture()
def cluster(cluster_clean):
    return cluster_clean


def test_cluster_scripts_and_hash_tagged_keys(cluster):
    conn = RedisConnector(cluster.url)
    assert conn.ping() >= 0
    assert conn.evalsha("server_time", keys=[], args=[]) > 0
    stem = hash_tag("tuning", "rl", "openai")
    # Keys of one entity share a slot, so multi-key commands and scripts work across the cluster.
    conn.run(lambda c: c.mset({f"{stem}:tat": 1, f"{stem}:paused": 2}))
    assert conn.run(lambda c: c.mget([f"{stem}:tat", f"{stem}:paused"])) == [b"1", b"2"]
    with pytest.raises((redis.RedisError, redis.exceptions.RedisClusterException)):  # no shared tag: refused
        conn.client.execute_command("MSET", "tuning:a:1", 1, "tuning:b:2", 2)


def test_sentinel_url_reaches_the_master():
    servers = RedisSentinelServers().start()
    try:
        conn = RedisConnector(servers.url)
        conn.run(lambda c: c.set("tuning:probe", "x"))
        assert servers.master.client().get("tuning:probe") == b"x"
        assert conn.evalsha("server_time", keys=[], args=[]) > 0
    finally:
        servers.close()


def test_cache_and_leases_work_unchanged_on_the_cluster(cluster):
    import inspect

    from celery_tuning.cache import TwoLevelCache
    from celery_tuning.concurrency import ConcurrencyLimiter
    from celery_tuning.storage.cache import RedisCacheStore

    def embed(text):
        return {"text": text}

    connector = RedisConnector(cluster.url)
    runs = []

    def compute():
        runs.append(1)
        return {"text": "a"}

    first = TwoLevelCache("t.embed", inspect.signature(embed), store=RedisCacheStore(connector), l1_ttl=0)
    other = TwoLevelCache("t.embed", inspect.signature(embed), store=RedisCacheStore(connector), l1_ttl=0)
    digest = first.digest(("a",), {})
    assert first.get_or_compute(digest, compute) == {"text": "a"}
    assert other.get_or_compute(digest, compute) == {"text": "a"}  # served from L2 on the cluster
    assert runs == [1]
    assert other.clear() >= 1 and other.l2_entries() == 0
    limiter = ConcurrencyLimiter("pdf", 2, connector)
    leases = [limiter.acquire() for _ in range(3)]
    assert [lease.granted for lease in leases] == [True, True, False]
    limiter.release(leases[0])
    assert limiter.acquire().granted
