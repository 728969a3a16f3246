"""One contract for both lease stores (in-process and Redis/Lua), with a fixed clock."""

import pytest

from celery_tuning.storage.lease import LeaseGrant, MemoryLeaseStore, RedisLeaseStore
from celery_tuning.storage.redis import RedisConnector, hash_tag

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000
SEC = 1_000_000
KEY = hash_tag("tuning", "cc", "pdf")


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request, redis_clean):
    if request.param == "memory":
        return MemoryLeaseStore(clock=lambda: T0)
    if request.param == "cluster":
        return RedisLeaseStore(RedisConnector(request.getfixturevalue("cluster_clean").url))
    return RedisLeaseStore(RedisConnector(redis_clean.db_url(4)))


def test_grants_up_to_the_cap_then_says_when_a_slot_frees(store):
    assert store.acquire(KEY, 2, "a", 10 * SEC, now=T0) == LeaseGrant(True, 1)
    assert store.acquire(KEY, 2, "b", 5 * SEC, now=T0 + SEC) == LeaseGrant(True, 2)
    assert store.acquire(KEY, 2, "c", 10 * SEC, now=T0 + 2 * SEC) == LeaseGrant(False, 4 * SEC)  # b ends first
    assert store.count(KEY, now=T0 + 2 * SEC) == 2


def test_an_unrenewed_lease_expires_at_its_ttl(store):
    assert store.acquire(KEY, 1, "a", 10 * SEC, now=T0).granted
    assert store.acquire(KEY, 1, "b", 10 * SEC, now=T0 + 10 * SEC - 1) == LeaseGrant(False, 1)
    assert store.count(KEY, now=T0 + 10 * SEC) == 0  # live while its expiry is after now
    assert store.acquire(KEY, 1, "b", 10 * SEC, now=T0 + 10 * SEC) == LeaseGrant(True, 1)


def test_renewal_extends_and_release_frees(store):
    assert store.acquire(KEY, 1, "a", 10 * SEC, now=T0).granted
    assert store.renew(KEY, ["a"], 10 * SEC, now=T0 + 8 * SEC) == 0  # still there: nothing re-created
    assert not store.acquire(KEY, 1, "b", 10 * SEC, now=T0 + 15 * SEC).granted
    store.release(KEY, "a")
    store.release(KEY, "never-held")  # harmless
    assert store.acquire(KEY, 1, "b", 10 * SEC, now=T0 + 15 * SEC).granted
    assert store.renew(KEY, [], 10 * SEC, now=T0 + 15 * SEC) == 0


def test_renewal_re_creates_a_lost_lease_even_past_the_cap(store):
    assert store.acquire(KEY, 1, "a", 10 * SEC, now=T0).granted
    # a's renewer was late (or Redis lost the set): b took the free slot
    assert store.acquire(KEY, 1, "b", 10 * SEC, now=T0 + 11 * SEC).granted
    assert store.renew(KEY, ["a", "a"], 20 * SEC, now=T0 + 12 * SEC) == 1
    assert store.count(KEY, now=T0 + 12 * SEC) == 2  # both run: both count
    # a slot frees only when two have gone: b at +21 s, a at +32 s
    assert store.acquire(KEY, 1, "c", 10 * SEC, now=T0 + 13 * SEC) == LeaseGrant(False, 19 * SEC)
    assert store.acquire(KEY, 1, "c", 10 * SEC, now=T0 + 22 * SEC) == LeaseGrant(False, 10 * SEC)
    store.release(KEY, "a")
    assert store.acquire(KEY, 1, "c", 10 * SEC, now=T0 + 22 * SEC) == LeaseGrant(True, 1)


def test_two_caller_keys_hold_their_own_caps_side_by_side(store):
    from celery_tuning.storage.keys import key_digest, lease_key

    acme, other = lease_key("tuning", "pdf", key_digest("acme")), lease_key("tuning", "pdf", key_digest("other"))
    assert len({acme, other, KEY}) == 3 and all(k.startswith(KEY + ":k:") for k in (acme, other))  # one slot
    for i in range(3):
        assert store.acquire(acme, 3, f"a{i}", 10 * SEC, now=T0) == LeaseGrant(True, i + 1)
    assert store.acquire(acme, 3, "a3", 10 * SEC, now=T0) == LeaseGrant(False, 10 * SEC)
    assert store.acquire(other, 1, "o0", 10 * SEC, now=T0) == LeaseGrant(True, 1)  # a full key blocks no other
    assert store.acquire(other, 1, "o1", 5 * SEC, now=T0) == LeaseGrant(False, 10 * SEC)
    assert store.acquire(KEY, 1, "shared", 10 * SEC, now=T0).granted  # nor the limit's shared set
    assert (store.count(acme, now=T0), store.count(other, now=T0), store.count(KEY, now=T0)) == (3, 1, 1)
    store.release(other, "o0")
    assert store.acquire(other, 1, "o1", 10 * SEC, now=T0 + SEC).granted
    assert store.renew(acme, ["a0", "a1", "a2"], 10 * SEC, now=T0 + 2 * SEC) == 0
    assert store.count(acme, now=T0 + 11 * SEC) == 3 and store.count(other, now=T0 + 11 * SEC) == 0


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_the_set_outlives_its_longest_lease(where, redis_clean, request):
    if where == "cluster":
        cluster = request.getfixturevalue("cluster_clean")
        connector = RedisConnector(cluster.url)
    else:
        connector = RedisConnector(redis_clean.db_url(4))
    store = RedisLeaseStore(connector)
    assert store.acquire(KEY, 3, "long", 60 * SEC).granted  # the server's clock
    assert store.acquire(KEY, 3, "short", 1 * SEC).granted
    store.renew(KEY, ["short"], 1 * SEC)
    assert connector.run(lambda c: c.pttl(KEY)) > 59_000
    store.release(KEY, "long")
    store.renew(KEY, ["short"], 1 * SEC)
    assert connector.run(lambda c: c.pttl(KEY)) <= 2_000  # and no longer than that
