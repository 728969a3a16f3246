"""Every name, however odd, pins all keys of its limiter, breaker, lease set or cache to one Cluster slot."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from celery_tuning.errors import ConfigurationError
from celery_tuning.storage.cache import CacheKeys
from celery_tuning.storage.gcra import Bucket
from celery_tuning.storage.redis import hash_tag

ODD = ["}x", "a{b}c", "{", "", "}", "{}", "a}b", "}{", "%7D", "%", "x%7D", "{x}"]


def tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes (its hash-tag rule), or '' when it hashes the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else ""


def entity_keys(name: str) -> list:
    bucket, keyed = Bucket.for_limiter("tuning", name), Bucket.for_limiter("tuning", name, "0123abcd")
    cache = CacheKeys("tuning", name, 1)
    return [bucket.tat, bucket.conf, keyed.tat, cache.generation_key,  # keyed.conf is bucket.conf
            cache.value(3, "ab" * 32), cache.lock(3, "ab" * 32)]


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
    if a != b:
        assert hash_tag("tuning", "rl", a) != hash_tag("tuning", "rl", b)


@pytest.mark.parametrize("prefix", ["x{}", "{tuning}", "tu}ning", ""])
def test_a_prefix_redis_would_read_as_a_tag_is_refused_naming_it(prefix):
    with pytest.raises(ConfigurationError, match="prefix"):
        hash_tag(prefix, "rl", "openai")
