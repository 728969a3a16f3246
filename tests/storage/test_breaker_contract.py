"""One contract for both breaker stores (in-process and Redis/Lua), with a fixed clock."""

import pytest

from celery_tuning.storage.breaker import BreakerParams, MemoryBreakerStore, RedisBreakerStore
from celery_tuning.storage.redis import RedisConnector

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000
SEC = 1_000_000
P = BreakerParams.make("tuning", "pay", reset_timeout=10, fail_max=3, success_threshold=2, trial_timeout=5)


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request, redis_clean):
    if request.param == "memory":
        return MemoryBreakerStore(clock=lambda: T0)
    if request.param == "cluster":  # hash-tagged keys: every script's keys share a slot
        return RedisBreakerStore(RedisConnector(request.getfixturevalue("cluster_clean").url))
    return RedisBreakerStore(RedisConnector(redis_clean.db_url(4)))


def test_opens_after_fail_max_consecutive_failures(store):
    assert store.apply(P, "status", now=T0).state == "closed"
    store.apply(P, "failure", now=T0)
    store.apply(P, "failure", now=T0)
    store.apply(P, "success", now=T0)  # consecutive: a success resets the count
    assert store.apply(P, "status", now=T0).failures == 0
    snaps = [store.apply(P, "failure", now=T0 + i) for i in range(3)]
    assert [s.state for s in snaps] == ["closed", "closed", "open"]
    assert snaps[-1].remaining_us == 10 * SEC
    assert snaps[-1].version == snaps[0].version + 1
    assert store.apply(P, "status", now=T0 + 4 * SEC).remaining_us == 10 * SEC - 4 * SEC + 2


def test_exactly_one_trial_and_its_outcomes(store):
    for _ in range(3):
        store.apply(P, "failure", now=T0)
    assert not store.apply(P, "trial", now=T0 + 9 * SEC).granted  # still open
    first = store.apply(P, "trial", now=T0 + 10 * SEC)
    second = store.apply(P, "trial", now=T0 + 10 * SEC + 1)
    assert (first.granted, first.state) == (True, "half-open")
    assert (second.granted, second.state) == (False, "half-open")
    # success_threshold=2: one good trial leaves it half-open and frees the lease for the next
    assert store.apply(P, "success", holds_trial=True, now=T0 + 11 * SEC).state == "half-open"
    assert store.apply(P, "trial", now=T0 + 11 * SEC).granted
    assert store.apply(P, "success", holds_trial=True, now=T0 + 12 * SEC).state == "closed"


def test_failed_trial_reopens(store):
    for _ in range(3):
        store.apply(P, "failure", now=T0)
    assert store.apply(P, "trial", now=T0 + 10 * SEC).granted
    snap = store.apply(P, "failure", holds_trial=True, now=T0 + 10 * SEC)
    assert snap.state == "open" and snap.remaining_us == 10 * SEC


def test_dead_trial_holder_loses_the_lease(store):
    for _ in range(3):
        store.apply(P, "failure", now=T0)
    assert store.apply(P, "trial", now=T0 + 10 * SEC).granted
    assert not store.apply(P, "trial", now=T0 + 14 * SEC).granted
    assert store.apply(P, "trial", now=T0 + 15 * SEC).granted  # 5 s lease ran out


def test_release_and_manual_operations(store):
    store.apply(P, "half-open", now=T0)
    assert store.apply(P, "trial", now=T0).granted
    store.apply(P, "release", holds_trial=True, now=T0)
    assert store.apply(P, "trial", now=T0).granted
    assert store.apply(P, "open", now=T0).state == "open"
    assert store.apply(P, "close", now=T0).state == "closed"
    store.apply(P, "failure", now=T0)
    assert store.apply(P, "reset", now=T0).failures == 0
    assert store.apply(P, "status", now=T0) == (("closed", 0, 0, 0, False))


def test_late_results_do_not_close_an_open_breaker(store):
    for _ in range(3):
        store.apply(P, "failure", now=T0)
    assert store.apply(P, "success", now=T0).state == "open"  # a call that started while closed
