"""One contract for both GCRA stores, plus the Lua-vs-oracle differential test on real Redis."""

import math

import pytest
from hypothesis import HealthCheck, given, settings

from celery_tuning.policy.gcra import gcra_acquire
from celery_tuning.storage.gcra import AdaptiveSpec, Bucket, MemoryGcraStore, RedisGcraStore
from celery_tuning.storage.redis import RedisConnector
from tests.support import gcra

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000  # a fixed "now" in µs: both stores get the same clock


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request, redis_clean):
    if request.param == "memory":
        return MemoryGcraStore(clock=lambda: T0)
    if request.param == "cluster":  # hash-tagged keys: every script's keys share a slot
        return RedisGcraStore(RedisConnector(request.getfixturevalue("cluster_clean").url))
    return RedisGcraStore(RedisConnector(redis_clean.db_url(3)))


def bucket(name="api", key=None):
    return Bucket.for_limiter("tuning", name, key)


def test_burst_then_refusal(store):
    b = bucket()
    assert [store.acquire(b, 1000, 3, 1, -1, now=T0).allowed for _ in range(4)] == [True, True, True, False]
    refused = store.acquire(b, 1000, 3, 1, -1, now=T0)
    assert refused.wait_us == 1000
    assert store.acquire(b, 1000, 3, 1, -1, now=T0 + 1000).allowed


def test_reservation(store):
    b = bucket()
    waits = [store.acquire(b, 1000, 1, 1, 10_000, now=T0).wait_us for _ in range(4)]
    assert waits == [0, 1000, 2000, 3000]


def test_buckets_are_independent(store):
    assert store.acquire(bucket(key="a"), 1000, 1, 1, -1, now=T0).allowed
    assert store.acquire(bucket(key="b"), 1000, 1, 1, -1, now=T0).allowed
    assert not store.acquire(bucket(key="a"), 1000, 1, 1, -1, now=T0).allowed


def test_pause(store):
    b = bucket()
    store.pause(b, 1000, 5, 50_000, now=T0)
    r = store.acquire(b, 1000, 5, 1, -1, now=T0 + 49_999)
    assert not r.allowed and r.wait_us == 1
    assert store.acquire(b, 1000, 5, 1, -1, now=T0 + 50_000).allowed


def test_override_and_reset(store):
    b = bucket()
    store.set_override(b, interval=10_000, burst=1)
    assert store.get_override(b) == {"interval": 10_000, "burst": 1}
    assert store.acquire(b, 1000, 5, 1, -1, now=T0).allowed
    second = store.acquire(b, 1000, 5, 1, -1, now=T0)
    assert not second.allowed and second.wait_us == 10_000
    store.reset(b)
    assert store.get_override(b) == {}
    assert store.acquire(b, 1000, 5, 1, -1, now=T0).allowed


def test_adaptive_decrease_and_recovery(store):
    b = bucket()
    spec = AdaptiveSpec(decrease=0.5, min_factor=0.1, recovery_seconds=1.0)
    store.pause(b, 1000, 1, 0, adaptive=spec, now=T0)
    # right after throttling the interval doubles
    assert store.acquire(b, 1000, 1, 1, -1, now=T0 + 1000).allowed
    r = store.acquire(b, 1000, 1, 1, -1, now=T0 + 1000)
    assert not r.allowed and 1990 <= r.wait_us <= 2000  # recovers 0.1 % per ms
    # after the recovery time the configured rate is back
    late = T0 + 2_000_000
    assert store.acquire(b, 1000, 1, 1, -1, now=late).allowed
    r = store.acquire(b, 1000, 1, 1, -1, now=late)
    assert r.wait_us == 1000


def test_idle_bucket_expires_in_redis(redis_clean):
    store = RedisGcraStore(RedisConnector(redis_clean.db_url(3)))
    b = bucket(key="tenant")
    store.acquire(b, 1000, 1, 1, -1)
    ttl = redis_clean.client(3).pttl(b.tat)
    assert 0 < ttl <= 1002


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(interval=gcra.intervals, burst=gcra.bursts, steps=gcra.steps(max_size=60))
def test_lua_matches_the_oracle(redis_clean, interval, burst, steps):
    """Identical sequences through the Lua script and the Python oracle give identical decisions."""
    client = redis_clean.client(3)
    client.flushdb()
    store = RedisGcraStore(RedisConnector(redis_clean.db_url(3)))
    b = bucket("diff")
    tat, now = None, T0
    for gap, cost, reserve in steps:
        now += gap
        cost = min(cost, burst)
        expected = gcra_acquire(tat, now, interval, burst, cost, reserve)
        got = store.acquire(b, interval, burst, cost, reserve, now=now)
        assert (got.allowed, got.wait_us) == (expected.allowed, expected.wait_us)
        if expected.new_tat is not None:
            tat = expected.new_tat
            assert int(client.get(b.tat)) == tat


def test_adaptive_throttle_holds_every_worker_for_the_whole_pause(store):
    """10/s burst 60 adaptive, throttle(5 s): nothing is admitted before the pause ends.

    The pause is computed at the halved rate (what an acquire uses); as the rate recovers the
    first admission comes (burst - 1) x the interval's shrink later.
    """
    b = bucket()
    interval, burst, pause, spec = 100_000, 60, 5_000_000, AdaptiveSpec()
    store.pause(b, interval, burst, pause, adaptive=spec, now=T0)
    first = store.acquire(b, interval, burst, 1, -1, now=T0)
    assert not first.allowed and first.wait_us == pause
    end = T0 + pause
    assert not store.acquire(b, interval, burst, 1, -1, now=end - 1).allowed
    tat = T0 + pause + (burst - 1) * 2 * interval
    resumes = next(t for t in range(end, end + 3_000_000, 1000)
                   if tat - (burst - 1) * math.floor(interval / (0.5 + spec.recover_per_us * (t - T0))) <= t)
    assert not store.acquire(b, interval, burst, 1, -1, now=resumes - 1000).allowed
    assert store.acquire(b, interval, burst, 1, -1, now=resumes).allowed


def test_throttle_without_adaptive_keeps_a_lowered_rate(store):
    """A plain pause on a limiter an earlier throttle slowed is computed at the slowed rate too."""
    b = bucket()
    store.pause(b, 100_000, 10, 0, adaptive=AdaptiveSpec(decrease=0.5, recovery_seconds=1e6), now=T0)
    store.pause(b, 100_000, 10, 1_000_000, now=T0)
    r = store.acquire(b, 100_000, 10, 1, -1, now=T0)
    assert not r.allowed and r.wait_us == 1_000_000


def test_adaptive_interval_rounds_the_same_in_both_stores(store):
    """interval / factor is floored the way Lua does it (1 µs / 0.1 is 10 µs, not 9)."""
    b = bucket()
    store.pause(b, 1, 1, 0, adaptive=AdaptiveSpec(decrease=0.1, min_factor=0.1), now=T0)
    assert store.acquire(b, 1, 1, 1, -1, now=T0).allowed
    assert store.acquire(b, 1, 1, 1, -1, now=T0).wait_us == 10


def test_adaptive_factor_is_stored_at_full_precision(store):
    b = bucket()
    spec = AdaptiveSpec()
    store.pause(b, 1000, 1, 0, adaptive=spec, now=T0)
    store.pause(b, 1000, 1, 0, adaptive=spec, now=T0 + 1_234_567)
    expected = max(spec.min_factor, (spec.decrease + spec.recover_per_us * 1_234_567) * spec.decrease)
    assert store.get_override(b)["factor"] == expected


def test_a_clock_behind_the_throttle_counts_as_no_time_passed(store):
    """After a failover the new server's clock may trail factor_at: the factor must not sink below its floor."""
    store.pause(bucket(key="slow"), 1000, 1, 0, adaptive=AdaptiveSpec(decrease=0.5, recovery_seconds=1.0), now=T0)
    b = bucket(key="other")  # same limiter, so the same factor; a bucket of its own
    assert store.acquire(b, 1000, 1, 1, -1, now=T0 - 10_000_000).allowed
    r = store.acquire(b, 1000, 1, 1, -1, now=T0 - 10_000_000)
    assert not r.allowed and r.wait_us == 2000


@pytest.mark.parametrize("name", ["}x", "a{b}c", "{", "", "}", "{}"])
def test_any_limiter_name_keeps_its_keys_in_one_slot(store, name):
    """On a Cluster a name starting with '}' (or empty) used to give an empty tag: CROSSSLOT."""
    shared, keyed = bucket(name), bucket(name, key="tenant")
    store.set_override(shared, interval=2000, burst=None)
    store.pause(keyed, 1000, 1, 0, adaptive=AdaptiveSpec(decrease=0.5, recovery_seconds=1e6), now=T0)
    assert store.acquire(shared, 1000, 1, 1, -1, now=T0).allowed
    assert store.acquire(shared, 1000, 1, 1, -1, now=T0).wait_us == 4000
    assert store.get_override(shared)["interval"] == 2000
    store.reset(shared)
    assert store.get_override(shared) == {}
    assert store.acquire(bucket("other"), 1000, 1, 1, -1, now=T0).allowed, "another limiter is untouched"
