"""``@fair`` when the tuning Redis fails: a real prefork worker (tests/apps/fair_app.py), a real
redis-server for the broker and another one, the tuning Redis, that the tests stop and restart.

- Down at ``apply_async``: the call is published at once (logged once per outage), runs once, and
  fair queueing resumes when the tuning Redis answers again.
- Restarted empty (no persistence) while calls wait for their turn: the waiting calls are lost, as
  parked ones are (docs/fair.md); nothing crashes, the worker keeps running and new calls run.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List

import pytest

from celery_tuning import fair
from tests.support.apps import make_app
from tests.support.workers import running_workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "tests.apps.fair_app:app"
#: The worker's task (tests/apps/fair_app.py); the producer here declares the same name and key.
WORK = "tests.apps.fair_app.work"


def _producer(redis_clean: Any, tuning_url: str) -> Any:
    app = make_app(redis_clean, "fair_outage", tuning_url=tuning_url, task_default_queue="fairq")

    @app.task(name=WORK, shared=False)
    @fair(key=lambda tenant, **kw: tenant)
    def work(tenant: str, seconds: float = 0.01) -> None:
        raise AssertionError("runs in the worker only")

    return work


def _env(redis_clean: Any, fault_redis: Any, **extra: str) -> Dict[str, str]:
    return {"TEST_BROKER_URL": redis_clean.db_url(0), "TEST_BACKEND_URL": redis_clean.db_url(0),
            "TEST_TUNING_URL": fault_redis.db_url(1), "TEST_LEDGER_URL": redis_clean.db_url(2), **extra}


def _done(redis_clean: Any) -> Dict[str, List[Dict[str, Any]]]:
    by_id: Dict[str, List[Dict[str, Any]]] = {}
    for raw in redis_clean.client(2).lrange("done:work", 0, -1):
        row = json.loads(raw)
        by_id.setdefault(row["id"], []).append(row)
    return by_id


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _outage_warnings(caplog: Any) -> int:
    return sum("tuning Redis failed queueing a call" in r.getMessage() for r in caplog.records)


def test_tuning_redis_down_at_publish_publishes_at_once_logged_once_then_fair_queueing_resumes(
        redis_clean, fault_redis, caplog):
    work = _producer(redis_clean, fault_redis.db_url(1))
    with running_workers(APP, _env(redis_clean, fault_redis), count=1, concurrency=2, prefix="fdown") as workers:
        fault_redis.stop()
        with caplog.at_level(logging.INFO, logger="celery_tuning.fair"):
            direct = [work.delay("A").id for _ in range(5)]
            assert _outage_warnings(caplog) == 1, "logged once per outage, not once per call"
            assert len(set(direct)) == 5
            _wait_for(lambda: set(direct) <= set(_done(redis_clean)), 30, "the calls published at once")
            done = _done(redis_clean)
            assert all(len(done[i]) == 1 and not done[i][0]["released"] for i in direct), done

            fault_redis.start()  # back, empty
            fair_ids = [work.delay("B").id for _ in range(6)]
            assert any("tuning Redis answers again" in r.getMessage() for r in caplog.records)
            # The dispatcher's rounds failed meanwhile (backoff up to 5 s): it releases them when it recovers.
            _wait_for(lambda: set(fair_ids) <= set(_done(redis_clean)), 30, "the calls queued fairly again")
            done = _done(redis_clean)
            assert all(len(done[i]) == 1 and done[i][0]["released"] for i in fair_ids), done
            assert int(fault_redis.client(1).hget("tuning:fq:{fairq}:stat", "r") or 0) == 6

            fault_redis.stop()  # a second outage is logged again, once
            more = [work.delay("C").id for _ in range(3)]
            assert _outage_warnings(caplog) == 2
            _wait_for(lambda: set(more) <= set(_done(redis_clean)), 30, "the second outage's calls")
            fault_redis.start()
        assert workers[0].proc is not None and workers[0].proc.poll() is None, workers[0].output()[-3000:]
    runs = {k.decode(): int(v) for k, v in redis_clean.client(2).hgetall("runs:work").items()}
    assert set(runs) == set(direct) | set(fair_ids) | set(more) and set(runs.values()) == {1}, runs


def test_tuning_redis_restarted_empty_while_calls_wait_loses_them_and_the_worker_goes_on(redis_clean, fault_redis):
    work = _producer(redis_clean, fault_redis.db_url(1))
    env = _env(redis_clean, fault_redis, TEST_FAIR_WINDOW="1")
    with running_workers(APP, env, count=1, concurrency=1, prefix="fflush") as workers:
        waiting = [work.delay("A", seconds=0.2).id for _ in range(30)]
        _wait_for(lambda: len(_done(redis_clean)) >= 2, 30, "the first runs")
        fault_redis.restart()  # no persistence: the lists, tickets and window are gone
        time.sleep(1.5)  # whatever was released or running before the restart finishes
        ran_of_a = set(_done(redis_clean))
        assert len(ran_of_a) < 30 - 15, "the calls waiting for their turn went with the tuning Redis"

        after = [work.delay("C").id for _ in range(4)]
        _wait_for(lambda: set(after) <= set(_done(redis_clean)), 30, "new calls after the restart")
        time.sleep(0.5)
        done = _done(redis_clean)
        assert all(done[i][0]["released"] for i in after), done
        assert set(done) == ran_of_a | set(after), "a lost call never comes back"
        assert all(len(rows) == 1 for rows in done.values()), "nothing ran twice"
        worker = workers[0]
        assert worker.proc is not None and worker.proc.poll() is None, worker.output()[-3000:]
        log = worker.output()
    assert "Traceback" not in log, log[-4000:]
    assert set(waiting) & ran_of_a
