"""Every name, however odd, pins all keys of its limiter, breaker, lease set, cache, parking spots to one slot.

And the key formats themselves: deployed data and docs/upgrading.md depend on them, so they are
pinned here literally, as storage/keys.py's table documents them.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from celery_tuning.concurrency import ConcurrencyLimiter
from celery_tuning.errors import ConfigurationError
from celery_tuning.storage import keys
from celery_tuning.storage.breaker import BreakerParams
from celery_tuning.storage.cache import CacheKeys
from celery_tuning.storage.gcra import Bucket
from celery_tuning.storage.keys import hash_tag
from celery_tuning.storage.lease import MemoryLeaseStore
from celery_tuning.storage.park import REASONS, RedisParkStore, Spot
from celery_tuning.storage.redis import RedisConnector

ODD = ["}x", "a{b}c", "{", "", "}", "{}", "a}b", "}{", "%7D", "%", "x%7D", "{x}"]


def tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes (its hash-tag rule), or '' when it hashes the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else ""


def entity_keys(name: str) -> list:
    """Every key one name can own, each built where the code builds it."""
    bucket, keyed = Bucket.for_limiter("tuning", name), Bucket.for_limiter("tuning", name, "0123abcd")
    cache = CacheKeys("tuning", name, 1)
    return [bucket.tat, bucket.conf, keyed.tat, cache.generation_key,  # keyed.conf is bucket.conf
            cache.value(3, "ab" * 32), cache.lock(3, "ab" * 32), *park_keys_of(name)]


def park_keys_of(name: str) -> list:
    """Every key of the three parking spots of ``name``, built by the store that uses them."""
    store = RedisParkStore(RedisConnector("redis://127.0.0.1:1/0"))  # lazy: never connects here
    return [k for reason in REASONS for k in store.keys(Spot(reason, name))]


def script_key_sets(name: str) -> list:
    """The keys each script receives together: each set must hash to one slot (else CROSSSLOT)."""
    bucket, keyed = Bucket.for_limiter("tuning", name), Bucket.for_limiter("tuning", name, "0123abcd")
    cache = CacheKeys("tuning", name, 1)
    breaker = BreakerParams.make("tuning", name, reset_timeout=1, fail_max=1, success_threshold=1,
                                 trial_timeout=1)
    lease = ConcurrencyLimiter(name, 1, MemoryLeaseStore())
    return [
        [bucket.tat, bucket.conf], [keyed.tat, keyed.conf],               # gcra_*.lua
        [cache.value(3, "ab" * 32), cache.lock(3, "ab" * 32), cache.generation_key],  # cache_*.lua
        [breaker.key], [lease.key],                                        # breaker.lua, lease_*.lua
        # park_*.lua: one spot's keys, with the lease set for park_promote.lua
        *[[*keys.park_keys("tuning", reason, name), lease.key] for reason in REASONS],
    ]


def test_key_formats_are_the_documented_ones():
    assert Bucket.for_limiter("tuning", "openai") == Bucket("tuning:rl:{openai}", "tuning:rl:{openai}:conf")
    assert Bucket.for_limiter("t", "openai", "0123abcd").tat == "t:rl:{openai}:k:0123abcd"
    params = BreakerParams.make("tuning", "payments", reset_timeout=1, fail_max=1, success_threshold=1,
                                trial_timeout=1)
    assert (params.key, params.channel) == ("tuning:cb:{payments}", "tuning:cb:failures")
    assert ConcurrencyLimiter("pdf-render", 2, MemoryLeaseStore()).key == "tuning:cc:{pdf-render}"
    cache = CacheKeys("tuning", "proj.add", 2)
    assert cache.stem == "tuning:cache:{proj.add}"
    assert cache.generation_key == "tuning:cache:{proj.add}:gen"
    assert cache.value(7, "d1") == "tuning:cache:{proj.add}:v2:g7:d1"
    assert cache.lock(7, "d1") == "tuning:cache:{proj.add}:v2:g7:d1:lock"
    assert cache.channel == "tuning:cache:invalidate"
    assert keys.prefixed_key("tuning", "a", "b") == "tuning:a:b"
    assert keys.park_keys("tuning", "concurrency", "pdf-render") == (
        "tuning:park:{pdf-render}:cc:due", "tuning:park:{pdf-render}:cc:wait", "tuning:park:{pdf-render}:cc:msg",
        "tuning:park:{pdf-render}:cc:claim", "tuning:park:{pdf-render}:cc:tix", "tuning:park:{pdf-render}:cc:tixat")
    assert keys.park_stem("tuning", "rate_limit", "openai") == "tuning:park:{openai}:rl"
    assert keys.park_stem("tuning", "circuit_open", "payments") == "tuning:park:{payments}:cb"
    assert keys.park_index_key("tuning") == "tuning:park:index"
    assert keys.park_index_member("circuit_open", "pay:ments") == "cb:pay:ments"


@pytest.mark.parametrize("name", ["openai", *ODD])
def test_park_index_members_read_back_as_their_spot(name):
    for reason in REASONS:
        assert keys.park_spot_of(keys.park_index_member(reason, name)) == (reason, name)
    assert keys.park_spot_of("zz:" + name) is None
    assert keys.park_spot_of("rl") is None


def test_an_unknown_parking_reason_is_refused():
    with pytest.raises(ConfigurationError, match="reason"):
        keys.park_stem("tuning", "whim", "x")


def test_the_key_module_and_the_builders_agree():
    """storage/keys.py is the one place formats live: the builders answer what it answers."""
    for name in ["openai", *ODD]:
        cache = CacheKeys("p", name, 4)
        assert cache.value(1, "x") == keys.cache_value_key(keys.cache_stem("p", name), 4, 1, "x")
        assert cache.lock(1, "x") == keys.cache_lock_key(keys.cache_stem("p", name), 4, 1, "x")
        assert cache.generation_key == keys.cache_generation_key("p", name)
        assert Bucket.for_limiter("p", name, "k1").tat == keys.rate_limit_bucket_key("p", name, "k1")
        assert Bucket.for_limiter("p", name).conf == keys.rate_limit_conf_key("p", name)
        assert keys.rate_limit_stem("p", name) == keys.rate_limit_bucket_key("p", name)
        assert keys.breaker_key("p", name) == hash_tag("p", "cb", name)
        assert keys.lease_key("p", name) == hash_tag("p", "cc", name)
    # the old import path keeps working
    from celery_tuning.storage.redis import hash_tag as old_hash_tag

    assert old_hash_tag is hash_tag


@pytest.mark.parametrize("name", ["openai", *ODD])
def test_every_script_key_set_shares_one_slot(name):
    for key_set in script_key_sets(name):
        assert all(tag(k) for k in key_set), key_set
        assert len({key_slot(k.encode()) for k in key_set}) == 1, key_set


def test_plain_names_keep_their_readable_keys():
    assert hash_tag("tuning", "rl", "openai") == "tuning:rl:{openai}"
    assert hash_tag("tuning", "cache", "proj.tasks.add") == "tuning:cache:{proj.tasks.add}"


@pytest.mark.parametrize("name", ["openai", *ODD])
def test_every_key_of_an_entity_has_one_nonempty_tag(name):
    keys = entity_keys(name)
    assert all(tag(k) for k in keys), keys
    assert len({tag(k) for k in keys}) == 1, keys
    assert len({key_slot(k.encode()) for k in keys}) == 1, keys


def test_odd_names_never_share_a_key_with_each_other_or_with_plain_names():
    names = list(dict.fromkeys(["openai", "x", "7D", "{x", "x}", *ODD]))
    stems = [hash_tag("tuning", "rl", n) for n in names]
    assert len(set(stems)) == len(names)
    keys = [k for n in names for k in entity_keys(n)]
    assert len(set(keys)) == len(keys)


@given(st.text(max_size=12), st.text(max_size=12))
def test_any_names(a, b):
    for name in (a, b):
        keys = [k.encode("utf-8", "surrogatepass") for k in entity_keys(name)]
        assert len({key_slot(k) for k in keys}) == 1
        assert all(tag(k) for k in entity_keys(name))
        for key_set in script_key_sets(name):
            assert len({key_slot(k.encode("utf-8", "surrogatepass")) for k in key_set}) == 1
    if a != b:
        assert hash_tag("tuning", "rl", a) != hash_tag("tuning", "rl", b)


@pytest.mark.parametrize("prefix", ["x{}", "{tuning}", "tu}ning", ""])
def test_a_prefix_redis_would_read_as_a_tag_is_refused_naming_it(prefix):
    with pytest.raises(ConfigurationError, match="prefix"):
        hash_tag(prefix, "rl", "openai")
