"""One contract for both dedupe lock stores (in-process and Redis/Lua), with a fixed clock,
and a differential run holding the Lua scripts to the memory reference step by step."""

import random

import pytest

from celery_tuning.storage.dedupe import (
    CLAIMED,
    HELD,
    OTHER,
    Claim,
    MemoryDedupeStore,
    RedisDedupeStore,
    dedupe_index_key,
    dedupe_lock_key,
)
from celery_tuning.storage.redis import RedisConnector

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000
SEC = 1_000_000
TASK = "tasks.render"
TTL = 3600 * SEC
LEASE = 10 * SEC


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request, redis_clean):
    if request.param == "memory":
        return MemoryDedupeStore(clock=lambda: T0)
    if request.param == "cluster":
        return RedisDedupeStore(RedisConnector(request.getfixturevalue("cluster_clean").url))
    return RedisDedupeStore(RedisConnector(redis_clean.db_url(4)))


def test_the_first_call_claims_and_the_next_gets_its_holder(store):
    assert store.claim(TASK, "d1", "a", TTL, now=T0) == Claim(CLAIMED, "a", "q", T0 + TTL)
    assert store.claim(TASK, "d1", "b", TTL, now=T0 + SEC) == Claim(OTHER, "a", "q", T0 + TTL)
    assert store.claim(TASK, "d1", "a", TTL, now=T0 + SEC) == Claim(HELD, "a", "q", T0 + TTL)
    assert store.claim(TASK, "d2", "b", TTL, now=T0 + SEC) == Claim(CLAIMED, "b", "q", T0 + SEC + TTL)
    assert store.claim("tasks.other", "d1", "c", TTL, now=T0 + SEC).status == CLAIMED  # keys are per task


def test_a_queued_lock_lives_until_its_ttl(store):
    assert store.claim(TASK, "d", "a", 60 * SEC, now=T0).status == CLAIMED
    assert store.claim(TASK, "d", "b", 60 * SEC, now=T0 + 60 * SEC - 1).holder == "a"
    assert store.claim(TASK, "d", "b", 60 * SEC, now=T0 + 60 * SEC) == Claim(CLAIMED, "b", "q", T0 + 120 * SEC)


def test_a_running_lock_lives_one_lease_past_its_last_renewal(store):
    store.claim(TASK, "d", "a", TTL, now=T0)
    assert store.start(TASK, "d", "a", LEASE, TTL, True, now=T0 + SEC) == Claim(HELD, "a", "r", T0 + TTL)
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 5 * SEC) == Claim(OTHER, "a", "r", T0 + TTL)
    assert store.hold(TASK, "r", LEASE, [("a", "d", T0 + TTL)], now=T0 + 8 * SEC) == 0
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 18 * SEC - 1).holder == "a"
    # not renewed again (its worker was killed): free one lease TTL after the last renewal, not at ttl
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 18 * SEC).status == CLAIMED


def test_the_deadline_bounds_a_running_lock_whatever_renews_it(store):
    store.claim(TASK, "d", "a", 30 * SEC, now=T0)
    store.start(TASK, "d", "a", LEASE, 30 * SEC, True, now=T0)
    store.hold(TASK, "r", LEASE, [("a", "d", T0 + 30 * SEC)], now=T0 + 25 * SEC)  # would reach +35 s
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 30 * SEC - 1).holder == "a"
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 30 * SEC).status == CLAIMED
    # a renewal past the deadline neither re-creates it nor touches the new holder's lock
    assert store.hold(TASK, "r", LEASE, [("a", "d", T0 + 30 * SEC)], now=T0 + 31 * SEC) == 0
    assert store.claim(TASK, "d", "c", TTL, now=T0 + 31 * SEC).holder == "b"


def test_until_started_releases_when_the_body_starts(store):
    store.claim(TASK, "d", "a", TTL, now=T0)
    assert store.start(TASK, "d", "a", LEASE, TTL, False, now=T0 + SEC) == Claim(HELD, "a", "", 0)
    assert store.claim(TASK, "d", "b", TTL, now=T0 + SEC).status == CLAIMED


def test_a_start_without_a_claim_takes_a_free_key_and_runs_beside_a_holder(store):
    # send_task, or a canvas member published while another call held the key
    assert store.start(TASK, "d", "a", LEASE, TTL, True, now=T0) == Claim(CLAIMED, "a", "r", T0 + TTL)
    assert store.claim(TASK, "d", "b", TTL, now=T0 + SEC) == Claim(OTHER, "a", "r", T0 + TTL)
    assert store.start(TASK, "d", "c", LEASE, TTL, True, now=T0 + SEC) == Claim(OTHER, "a", "r", T0 + TTL)
    assert store.start(TASK, "d2", "c", LEASE, TTL, False, now=T0 + SEC) == Claim(CLAIMED, "c", "", 0)
    assert store.locks(TASK, now=T0 + SEC)[0].digest == "d"
    assert len(store.locks(TASK, now=T0 + SEC)) == 1


def test_release_is_compare_and_delete(store):
    store.claim(TASK, "d", "a", TTL, now=T0)
    assert not store.release(TASK, "d", "b", now=T0)
    assert store.claim(TASK, "d", "b", TTL, now=T0).holder == "a"
    assert store.release(TASK, "d", "a", now=T0)
    assert not store.release(TASK, "d", "a", now=T0)  # twice: harmless
    assert store.claim(TASK, "d", "b", TTL, now=T0).status == CLAIMED


def test_queued_again_keeps_the_lock_until_the_deadline(store):
    store.claim(TASK, "d", "a", 100 * SEC, now=T0)
    store.start(TASK, "d", "a", LEASE, 100 * SEC, True, now=T0)
    assert store.hold(TASK, "q", LEASE, [("a", "d", T0 + 100 * SEC)], now=T0 + SEC) == 0  # Retry: queued again
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 50 * SEC) == Claim(OTHER, "a", "q", T0 + 100 * SEC)
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 100 * SEC).status == CLAIMED


def test_a_renewal_landing_after_a_retry_leaves_the_lock_queued(store):
    """The renewer's snapshot is taken while the call runs; the call re-queues its lock (a retry)
    before the renewal's round trip lands. The renewal leaves it queued, and the renewer's "the call
    is gone" release (``state='r'``) frees only a running lock."""
    store.claim(TASK, "d", "a", TTL, now=T0)
    store.start(TASK, "d", "a", LEASE, TTL, True, now=T0 + SEC)
    assert store.hold(TASK, "q", LEASE, [("a", "d", T0 + TTL)], now=T0 + 2 * SEC) == 0  # the retry
    assert store.hold(TASK, "r", LEASE, [("a", "d", T0 + TTL)], now=T0 + 2 * SEC) == 0  # the late renewal
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 2 * SEC) == Claim(OTHER, "a", "q", T0 + TTL)
    assert not store.release(TASK, "d", "a", now=T0 + 2 * SEC, state="r")
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 60 * SEC) == Claim(OTHER, "a", "q", T0 + TTL)  # past any lease
    # the retried message runs: running again, and then a release limited to running locks frees it
    assert store.start(TASK, "d", "a", LEASE, TTL, True, now=T0 + 61 * SEC) == Claim(HELD, "a", "r", T0 + TTL)
    assert not store.release(TASK, "d", "a", now=T0 + 61 * SEC, state="q")
    assert store.release(TASK, "d", "a", now=T0 + 61 * SEC, state="r")
    assert store.claim(TASK, "d", "b", TTL, now=T0 + 61 * SEC).status == CLAIMED


def test_renewal_re_creates_a_lost_lock_and_leaves_another_holder_alone(store):
    store.claim(TASK, "d", "a", TTL, now=T0)
    store.start(TASK, "d", "a", LEASE, TTL, True, now=T0)
    store.claim(TASK, "e", "x", TTL, now=T0)
    store.clear(TASK, now=T0)  # as a FLUSHDB would
    assert store.hold(TASK, "r", LEASE, [("a", "d", T0 + TTL)], now=T0 + SEC) == 1
    assert store.claim(TASK, "d", "b", TTL, now=T0 + SEC) == Claim(OTHER, "a", "r", T0 + TTL)
    store.release(TASK, "d", "a", now=T0 + SEC)
    assert store.claim(TASK, "d", "b", TTL, now=T0 + SEC).status == CLAIMED
    assert store.hold(TASK, "r", LEASE, [("a", "d", T0 + TTL)], now=T0 + 2 * SEC) == 0  # b's now: untouched
    assert store.claim(TASK, "d", "c", TTL, now=T0 + 2 * SEC).holder == "b"


def test_locks_lists_the_live_ones_and_clear_drops_them(store):
    store.claim(TASK, "d1", "a", 100 * SEC, now=T0)
    store.claim(TASK, "d2", "b", 10 * SEC, now=T0)
    store.start(TASK, "d2", "b", 5 * SEC, 10 * SEC, True, now=T0 + SEC)
    store.claim(TASK, "d3", "c", 2 * SEC, now=T0)
    store.claim("tasks.other", "d1", "z", TTL, now=T0)
    shown = store.locks(TASK, now=T0 + 3 * SEC)  # d3 expired; soonest expiry first
    assert [(lock.digest, lock.holder, lock.state) for lock in shown] == [("d2", "b", "running"),
                                                                           ("d1", "a", "queued")]
    assert shown[0].age_us == 3 * SEC and shown[0].expires_in_us == 3 * SEC and shown[0].deadline_in_us == 7 * SEC
    assert shown[1].age_us == 3 * SEC and shown[1].expires_in_us == 97 * SEC
    assert [lock.digest for lock in store.locks(TASK, limit=1, now=T0 + 3 * SEC)] == ["d2"]
    assert store.clear(TASK, now=T0 + 3 * SEC) == 2
    assert store.locks(TASK, now=T0 + 3 * SEC) == []
    assert store.claim(TASK, "d1", "n", TTL, now=T0 + 3 * SEC).status == CLAIMED
    assert store.claim("tasks.other", "d1", "n", TTL, now=T0 + 3 * SEC).holder == "z"


def test_every_key_expires(redis_clean):
    connector = RedisConnector(redis_clean.db_url(4))
    store = RedisDedupeStore(connector)
    store.claim(TASK, "d", "a", 60 * SEC)  # the server's clock
    store.start(TASK, "d", "a", 2 * SEC, 60 * SEC, True)
    client = redis_clean.client(4)
    lock, index = dedupe_lock_key("tuning", TASK, "d"), dedupe_index_key("tuning", TASK)
    assert 2_000 < client.pttl(lock) <= 3_000  # running: one lease (+1 s for memory, not for the lock)
    assert 2_000 < client.pttl(index) <= 3_000
    store.hold(TASK, "q", 2 * SEC, [("a", "d", store.claim(TASK, "d", "a", 0).deadline)])
    assert 59_000 < client.pttl(lock) <= 61_000  # queued again: until its deadline
    assert store.release(TASK, "d", "a")
    assert not client.exists(lock) and not client.exists(index)
    assert lock.startswith("tuning:dd:{tasks.render}:") and index.startswith("tuning:dd:{tasks.render}:")


def test_foreign_values_are_a_free_key_or_a_storage_error_never_a_crash(redis_clean):
    from celery_tuning.errors import StorageError

    connector = RedisConnector(redis_clean.db_url(4))
    store = RedisDedupeStore(connector)
    client = redis_clean.client(4)
    client.hset(dedupe_lock_key("tuning", TASK, "d"), mapping={"id": "x", "ex": "garbage"})
    assert store.claim(TASK, "d", "a", TTL).status == CLAIMED
    client.set(dedupe_lock_key("tuning", TASK, "s"), "not a hash")
    with pytest.raises(StorageError):
        store.claim(TASK, "s", "a", TTL)


def test_differential_random_operations(redis_clean):
    """The same random operations on both stores, clock in hand: every answer equal."""
    memory = MemoryDedupeStore(clock=lambda: T0)
    redis_store = RedisDedupeStore(RedisConnector(redis_clean.db_url(4)))
    rng = random.Random(19)
    now = T0
    deadlines = {}
    for _ in range(600):
        now += rng.choice([0, 1, SEC // 2, SEC, 3 * SEC])
        digest, task_id = rng.choice("abc"), rng.choice("xyz")
        op = rng.choice(["claim", "claim", "start", "start0", "hold_r", "hold_q", "release", "release_r", "release_q",
                         "locks", "clear"])
        ttl = rng.choice([2, 5, 20]) * SEC
        if op == "claim":
            answers = [s.claim(TASK, digest, task_id, ttl, now=now) for s in (memory, redis_store)]
            if answers[0].status != OTHER:
                deadlines[(digest, task_id)] = answers[0].deadline
        elif op in ("start", "start0"):
            answers = [s.start(TASK, digest, task_id, 3 * SEC, ttl, op == "start", now=now)
                       for s in (memory, redis_store)]
            if answers[0].status != OTHER and answers[0].deadline:
                deadlines[(digest, task_id)] = answers[0].deadline
        elif op.startswith("hold"):
            held = [(i, d, dl) for (d, i), dl in deadlines.items() if rng.random() < 0.5]
            answers = [s.hold(TASK, op[-1], 3 * SEC, held, now=now) for s in (memory, redis_store)]
        elif op.startswith("release"):
            state = op[-1] if op != "release" else ""
            answers = [s.release(TASK, digest, task_id, now=now, state=state) for s in (memory, redis_store)]
        elif op == "locks":
            answers = [s.locks(TASK, now=now) for s in (memory, redis_store)]
        else:
            answers = [s.clear(TASK, now=now) for s in (memory, redis_store)]
        assert answers[0] == answers[1], (op, digest, task_id, now - T0, answers)
