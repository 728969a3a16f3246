"""``@fair`` at its edges, end to end (real prefork workers, a real redis-server): a task routed by its
decorator's ``queue=``, a fair task replacing itself, a backlog that outlives the ticket TTL, a
consuming worker whose mover is off, a relative ``expires=``, an unknown queue.
"""

from __future__ import annotations

import time

import pytest

from celery_tuning import fair
from tests.support.apps import make_app, run_producer
from tests.support.fair import APP, fair_done, fair_env, fair_runs, wait_for
from tests.support.workers import running_workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_task_whose_decorator_names_a_queue_waits_and_runs_in_that_queue(redis_clean):
    env = fair_env(redis_clean)
    out = run_producer("from tests.apps.fair_app import elsewhere\n"
                       "print(' '.join(elsewhere.delay(t).id for t in 'ABAB'))\n", redis_clean, env=env)
    ids = set(out.split())
    tuning = redis_clean.client(1)
    assert tuning.smembers("tuning:fq:index") == {b"fairq2"}
    assert int(tuning.hget("tuning:fq:{fairq2}:stat", "n") or 0) == 4
    with running_workers(APP, env, count=1, concurrency=2, queues="fairq2", prefix="q2"):
        wait_for(lambda: set(fair_runs(redis_clean, "elsewhere")) == ids, 20, "the 4 calls on fairq2")
    assert all(row["released"] for row in fair_done(redis_clean, "elsewhere"))


def test_a_fair_task_replacing_itself_with_a_fair_call_completes(redis_clean):
    env = fair_env(redis_clean)
    with running_workers(APP, env, count=1, concurrency=2, prefix="replace"):
        out = run_producer("from tests.apps.fair_app import pager\n"
                           "r = pager.delay('A', 2)\n"
                           "print(r.id, r.get(timeout=15))\n", redis_clean, env=env)
    task_id, value = out.split(" ", 1)
    assert value == "A done"
    runs = [row["id"] for row in fair_done(redis_clean, "pager")]
    assert runs == [task_id] * 3, "the first run and its two replacements, under the caller's id"


def test_a_backlog_whose_keys_wait_longer_than_the_ticket_ttl_is_not_lost(redis_clean):
    # Ticket TTL 1 s (the expiry of an idle queue's keys: 2 s), one call at a time, 6 keys of 0.4 s
    # calls: each key waits about 2.4 s between its turns and the backlog drains for about 5 s with
    # no new call. The dispatcher's activity keeps every key of the queue, and the index, alive.
    env = fair_env(redis_clean, TEST_TICKET_TTL="1", TEST_FAIR_WINDOW="1")
    out = run_producer("from tests.apps.fair_app import work\n"
                       "print(' '.join(work.delay(t, seconds=0.4).id for _ in range(2) for t in 'ABCDEF'))\n",
                       redis_clean, env=env)
    ids = set(out.split())
    with running_workers(APP, env, count=1, concurrency=1, prefix="ttl"):
        wait_for(lambda: set(fair_runs(redis_clean, "work")) == ids, 25, "all 12 calls")
    tuning = redis_clean.client(1)
    assert int(tuning.hget("tuning:fq:{fairq}:stat", "n") or 0) == 0
    assert tuning.hlen("tuning:fq:{fairq}:msg") == 0


def test_a_consuming_worker_whose_mover_is_off_still_gives_the_window_its_capacity(redis_clean):
    env = fair_env(redis_clean)
    with running_workers(APP, env, count=1, concurrency=1, queues="side", prefix="dispatch"):
        with running_workers(APP, {**env, "TEST_NO_MOVER": "1"}, count=1, concurrency=2, prefix="nomover") as w:
            out = run_producer("from tests.apps.fair_app import work\n"
                               "print(' '.join(work.delay('A').id for _ in range(5)))\n", redis_clean, env=env)
            wait_for(lambda: set(fair_runs(redis_clean, "work")) == set(out.split()), 15, "the 5 calls")
            log = w[0].output()
    assert "registers its capacity" in log, log[-3000:]


def test_a_relative_expires_counts_from_the_call_and_an_expired_call_frees_its_window_place(redis_clean):
    env = fair_env(redis_clean, TEST_FAIR_WINDOW="1")
    out = run_producer("from tests.apps.fair_app import work\n"
                       "print(' '.join(work.apply_async(('A',), expires=1).id for _ in range(2)))\n"
                       "print(work.apply_async(('B',), expires=60).id)\n", redis_clean, env=env)
    expiring, live = out.splitlines()
    time.sleep(1.5)  # the first two expire while they wait for their turn
    started = time.monotonic()
    with running_workers(APP, env, count=1, concurrency=1, prefix="expires"):
        wait_for(lambda: live in fair_runs(redis_clean, "work"), 15, "the call that did not expire")
        took = time.monotonic() - started
    assert not set(expiring.split()) & set(fair_runs(redis_clean, "work")), "an expired call ran"
    # A window of 1: each expired call left the window when the worker dropped it, not after the
    # claim TTL (30 s).
    assert took < 10, took


def test_an_unknown_queue_is_refused_at_the_call_as_celery_refuses_it(redis_clean):
    from celery.exceptions import QueueNotFound

    app = make_app(redis_clean, "fair_noqueue", task_create_missing_queues=False)

    @app.task(name="fair_noqueue.sync", shared=False)
    @fair(key=lambda tenant: tenant)
    def sync(tenant: str) -> None:
        raise AssertionError("never runs here")

    with pytest.raises(QueueNotFound):
        sync.apply_async(("A",), queue="nosuchqueue")
    assert not redis_clean.client(1).keys("tuning:fq:*")
