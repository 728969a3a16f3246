"""One contract for both breaker stores (in-process and Redis/Lua), with a fixed clock."""

import uuid

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
    first = store.apply(P, "trial", "A", now=T0 + 10 * SEC)
    second = store.apply(P, "trial", "B", now=T0 + 10 * SEC + 1)
    assert (first.granted, first.state) == (True, "half-open")
    assert (second.granted, second.state) == (False, "half-open")
    # success_threshold=2: one good trial leaves it half-open and frees the lease for the next
    assert store.apply(P, "success", "A", now=T0 + 11 * SEC).state == "half-open"
    assert store.apply(P, "trial", "C", now=T0 + 11 * SEC).granted
    assert store.apply(P, "success", "C", now=T0 + 12 * SEC).state == "closed"


def test_failed_trial_reopens(store):
    for _ in range(3):
        store.apply(P, "failure", now=T0)
    assert store.apply(P, "trial", "A", now=T0 + 10 * SEC).granted
    snap = store.apply(P, "failure", "A", now=T0 + 10 * SEC)
    assert snap.state == "open" and snap.remaining_us == 10 * SEC


def test_dead_trial_holder_loses_the_lease(store):
    for _ in range(3):
        store.apply(P, "failure", now=T0)
    assert store.apply(P, "trial", now=T0 + 10 * SEC).granted
    assert not store.apply(P, "trial", now=T0 + 14 * SEC).granted
    assert store.apply(P, "trial", now=T0 + 15 * SEC).granted  # 5 s lease ran out


def test_release_and_manual_operations(store):
    store.apply(P, "half-open", now=T0)
    assert store.apply(P, "trial", "A", now=T0).granted
    store.apply(P, "release", "A", now=T0)
    assert store.apply(P, "trial", "B", now=T0).granted
    assert store.apply(P, "open", now=T0).state == "open"
    assert store.apply(P, "close", now=T0).state == "closed"
    store.apply(P, "failure", now=T0)
    assert store.apply(P, "reset", now=T0).failures == 0
    assert store.apply(P, "status", now=T0) == (("closed", 0, 0, 0, False))


def test_late_results_do_not_close_an_open_breaker(store):
    for _ in range(3):
        store.apply(P, "failure", now=T0)
    assert store.apply(P, "success", now=T0).state == "open"  # a call that started while closed


def _open_and_take_trial(store, token="A"):
    for _ in range(3):
        store.apply(P, "failure", now=T0)
    snap = store.apply(P, "trial", token, now=T0 + 10 * SEC)
    assert snap.granted and snap.state == "half-open"


def test_a_stale_trial_holder_cannot_settle_or_free_the_current_trial(store):
    _open_and_take_trial(store, "A")
    assert store.apply(P, "trial", "B", now=T0 + 15 * SEC).granted  # A's 5 s lease ran out: B runs it
    # A comes back late: none of its verdicts count, and B keeps the lease
    assert store.apply(P, "success", "A", now=T0 + 16 * SEC).state == "half-open"
    assert store.apply(P, "failure", "A", now=T0 + 16 * SEC).state == "half-open"
    store.apply(P, "release", "A", now=T0 + 16 * SEC)
    assert not store.apply(P, "trial", "C", now=T0 + 16 * SEC).granted
    # B's verdict counts: one success of two, and the next trial is free
    assert store.apply(P, "success", "B", now=T0 + 17 * SEC).state == "half-open"
    assert store.apply(P, "trial", "C", now=T0 + 17 * SEC).granted
    assert store.apply(P, "success", "C", now=T0 + 18 * SEC).state == "closed"


def test_one_trial_settles_once_even_with_success_threshold_above_one(store):
    _open_and_take_trial(store, "A")
    assert store.apply(P, "success", "A", now=T0 + 11 * SEC).state == "half-open"
    # a second settlement by the same holder is not a second good trial
    assert store.apply(P, "success", "A", now=T0 + 11 * SEC).state == "half-open"
    assert store.apply(P, "failure", "A", now=T0 + 11 * SEC).state == "half-open"


def test_an_expired_holder_settles_when_no_one_took_over(store):
    _open_and_take_trial(store, "A")
    snap = store.apply(P, "failure", "A", now=T0 + 20 * SEC)  # lease over, but still A's trial
    assert snap.state == "open" and snap.remaining_us == 10 * SEC


def test_manual_changes_end_the_running_trial(store):
    _open_and_take_trial(store, "A")
    store.apply(P, "half-open", now=T0 + 11 * SEC)
    assert store.apply(P, "success", "A", now=T0 + 11 * SEC).state == "half-open"
    assert store.apply(P, "trial", "B", now=T0 + 11 * SEC).granted


@pytest.mark.parametrize("backend", ["memory", "redis", "cluster"])
def test_a_failure_recorded_anywhere_changes_every_process_failure_epoch(backend, redis_clean, request):
    """What lets a process with a stale view know its next success must reset the count."""
    import time

    if backend == "memory":
        here = there = MemoryBreakerStore(clock=lambda: T0)
    else:
        url = (request.getfixturevalue("cluster_clean").url if backend == "cluster" else redis_clean.db_url(4))
        here, there = RedisBreakerStore(RedisConnector(url)), RedisBreakerStore(RedisConnector(url))
    # A breaker of this test's own: on a Cluster, a failure another test announced for P on the same
    # channel may reach this subscriber late (the announcement crosses the cluster bus), and moved
    # the epoch before this test's first failure (seen once in CI).
    own = BreakerParams.make("tuning", f"pay-{uuid.uuid4().hex[:8]}", reset_timeout=10, fail_max=3,
                             success_threshold=2, trial_timeout=5)
    seen = here.failure_epoch(own)
    assert seen is not None  # subscribed (the first read waits for it)
    there.apply(own, "success", now=T0)
    there.apply(own, "status", now=T0)
    assert here.failure_epoch(own) == seen
    there.apply(own, "failure", now=T0)
    deadline = time.monotonic() + 5
    while here.failure_epoch(own) == seen and time.monotonic() < deadline:
        time.sleep(0.005)
    assert here.failure_epoch(own) != seen
