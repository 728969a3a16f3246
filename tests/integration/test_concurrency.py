"""Cluster-wide concurrency limits: leases in Redis, renewed while running, freed by a dead worker's TTL."""

import json
import os
import signal
import time

import pytest

from celery_tuning import ConcurrencyLimited, ConfigurationError, TunedTask, concurrency_limit
from tests.support.apps import make_app, run_producer, worker_env
from tests.support.workers import WorkerProcess, running_workers

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_at_most_n_run_at_once_across_prefork_workers(redis_clean):
    with running_workers("tests.apps.limited:app", worker_env(redis_clean), concurrency=4, prefix="cc"):
        out = run_producer(
            "import json, time\nfrom tests.apps.limited import render\n"
            "start = time.time()\nrs = [render.delay(i) for i in range(10)]\n"
            "values = [r.get(timeout=90) for r in rs]\n"
            "print(json.dumps({'elapsed': time.time() - start, 'values': values}))\n", redis_clean)
    data = json.loads(out.splitlines()[-1])
    assert [v["i"] for v in data["values"]] == list(range(10))
    assert all(v["retries"] == 0 for v in data["values"])
    seen = [int(x) for x in redis_clean.client(1).lrange("inflight_seen", 0, -1)]
    assert len(seen) == 10 and max(seen) <= 2, seen
    runs = redis_clean.client(1).hgetall("render_runs")
    assert len(runs) == 10 and set(runs.values()) == {b"1"}
    assert data["elapsed"] >= 10 * 0.4 / 2 * 0.95


@pytest.mark.slow
def test_a_killed_worker_gives_its_slot_back_within_the_lease_ttl(redis_clean):
    env = {**worker_env(redis_clean), "TEST_LEASE_TTL": "2"}
    doomed = WorkerProcess("tests.apps.limited:app", env, pool="prefork", concurrency=1, name="doomed")
    survivor = WorkerProcess("tests.apps.limited:app", env, pool="prefork", concurrency=1, name="survivor")
    client = redis_clean.client(1)
    try:
        doomed.start()
        run_producer("from tests.apps.limited import hold\nhold.delay(60, 'first')\n", redis_clean)
        deadline = time.time() + 20
        while not client.get("started:first"):
            assert time.time() < deadline, doomed.output()[-2000:]
            time.sleep(0.05)
        os.killpg(doomed.proc.pid, signal.SIGKILL)  # the lease is never released
        killed_at = time.time()
        survivor.start()
        out = run_producer("from tests.apps.limited import hold\nprint(hold.delay(0, 'second').get(timeout=60))\n",
                           redis_clean)
        assert out == "second"
        started = float(client.get("started:second"))
        assert started - killed_at < 2 + 8, "capacity did not come back after the lease TTL"
    finally:
        doomed.close()
        survivor.close()


def test_bind_and_eager_errors(redis_clean):
    app = make_app(redis_clean, "ccbind", tuning_concurrency_limits={"solo": 1})

    @app.task(base=TunedTask, shared=False, name="cc_missing")
    @concurrency_limit("render")
    def missing():
        pass

    with pytest.raises(ConfigurationError, match=r"task 'cc_missing': @concurrency_limit\('render'\): no such"):
        missing.run  # noqa: B018

    @app.task(base=TunedTask, shared=False)
    @concurrency_limit("solo")
    def nested():
        return inner.apply().get()

    @app.task(base=TunedTask, shared=False)
    @concurrency_limit("solo")
    def inner():
        return "ran"

    assert inner.apply().get() == "ran"  # the slot is released after each run
    with pytest.raises(ConcurrencyLimited, match="concurrency limit 'solo' reached"):
        nested.apply().get()


def test_redis_down_admits_and_recovers(fault_redis):
    """docs/faq.md: with the tuning Redis down, concurrency caps admit (bounded by the socket timeout)."""
    from celery_tuning.concurrency import ConcurrencyLimiter
    from celery_tuning.storage.redis import RedisConnector

    limiter = ConcurrencyLimiter("outage", 1, RedisConnector(fault_redis.db_url(0)), ttl=5)
    held = limiter.acquire()
    assert held.granted and held.id is not None
    assert not limiter.acquire().granted  # the cap holds while Redis answers
    fault_redis.stop()
    start = time.monotonic()
    down = limiter.acquire()
    assert down.granted and down.id is None  # ran unlimited, said so, did not raise
    assert time.monotonic() - start < 3
    limiter.release(down)
    limiter.release(held)  # never raises either
    fault_redis.restart()  # empty: the old lease is gone, the cap applies again
    again = limiter.acquire()
    assert again.granted and again.id is not None
    assert not limiter.acquire().granted
