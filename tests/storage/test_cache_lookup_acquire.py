"""cache_lookup_acquire.lua: the cache lookup and the limiter decision in one round trip, on a real Redis."""

from hypothesis import HealthCheck, given, settings

from celery_tuning.policy.gcra import gcra_acquire
from celery_tuning.storage.cache import RedisCacheStore
from celery_tuning.storage.gcra import Bucket, RedisGcraStore
from celery_tuning.storage.redis import RedisConnector, load_lua
from tests.support import gcra

T0 = 1_700_000_000_000_000
VALUE, LOCK = "t:cache:{job}:v1:g0:abc", "t:cache:{job}:v1:g0:abc:lock"
BUCKET = Bucket.for_limiter("t", "api")


def stores(server):
    connector = RedisConnector(server.db_url(3))
    return RedisCacheStore(connector), server.client(3)


def combined(cache, *, interval=1000, burst=1, cost=1, reserve=-1, now=None, token="me"):
    keys, packed = RedisGcraStore.script_args(BUCKET, interval, burst, cost, reserve)
    if now is None:
        return cache.lookup_acquire(VALUE, LOCK, token, 5000, keys, packed)
    # The fixed clock rides as ARGV[4] (the public method always uses the server's clock).
    raw, pttl, role, reply = cache.connector.evalsha(
        "cache_lookup_acquire", [VALUE, LOCK, *keys], [token, 5000, packed, now])
    return raw, pttl, role, reply


def test_included_scripts_become_local_functions():
    source = load_lua("cache_lookup_acquire")
    assert not [line for line in source.splitlines() if line.startswith("--@include")]
    assert "local function cache_lookup(KEYS, ARGV)" in source and "local function gcra_acquire(KEYS, ARGV)" in source


def test_leader_takes_the_lock_and_a_token_in_one_call(redis_clean):
    cache, client = stores(redis_clean)
    cache.lookup(VALUE + "-warm", LOCK + "-warm", "me", 0)  # client and scripts set up outside the count
    combined(cache, token="warm-up")
    client.delete(LOCK, BUCKET.tat)
    before = client.info("commandstats")["cmdstat_evalsha"]["calls"]
    raw, _, role, reply = cache.lookup_acquire(VALUE, LOCK, "me", 5000, *RedisGcraStore.script_args(
        BUCKET, 1000, 1, 1, -1))
    assert (raw, role, reply) == (None, 1, 0)
    assert client.get(LOCK) == b"me"
    assert client.get(BUCKET.tat) is not None, "the token was taken"
    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] - before == 1


def test_found_value_or_another_leader_takes_no_token(redis_clean):
    cache, client = stores(redis_clean)
    client.set(LOCK, "someone-else")
    raw, _, role, reply = combined(cache)
    assert (raw, role, reply) == (None, 0, None)
    client.delete(LOCK)
    client.set(VALUE, b"cached")
    raw, pttl, role, reply = combined(cache)
    assert (raw, pttl, role, reply) == (b"cached", -1, -1, None)
    assert client.get(BUCKET.tat) is None, "no token was spent"
    assert client.get(LOCK) is None


def test_refused_decision_still_elects_the_leader(redis_clean):
    """A refusal comes back negative; the caller defers and releases the lock (TwoLevelCache does)."""
    cache, client = stores(redis_clean)
    assert combined(cache, now=T0)[2:] == (1, 0)
    client.delete(LOCK)
    raw, _, role, reply = combined(cache, now=T0 + 10)
    assert raw is None
    assert role == 1 and reply == -(1000 - 10)
    assert client.get(LOCK) == b"me"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(interval=gcra.intervals, burst=gcra.bursts, steps=gcra.steps(max_size=40))
def test_decisions_match_the_oracle(redis_clean, interval, burst, steps):
    """Each leader's decision equals the Python GCRA oracle's for the same clock and bucket."""
    cache, client = stores(redis_clean)
    client.flushdb()
    tat, now = None, T0
    for gap, cost, reserve in steps:
        now += gap
        cost = min(cost, burst)
        client.delete(LOCK)  # become the leader every time
        expected = gcra_acquire(tat, now, interval, burst, cost, reserve)
        _, _, role, reply = combined(cache, interval=interval, burst=burst, cost=cost, reserve=reserve, now=now)
        assert role == 1
        assert (reply >= 0, abs(reply)) == (expected.allowed, expected.wait_us)
        if expected.new_state is not None:
            tat = expected.new_state


def test_not_offered_on_a_cluster(redis_cluster):
    cache = RedisCacheStore(RedisConnector(redis_cluster.url))
    assert not cache.can_combine


def test_offered_on_standalone(redis_clean):
    assert stores(redis_clean)[0].can_combine


