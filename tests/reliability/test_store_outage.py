"""The tuning store dies mid-run and comes back empty: no task is lost, failed or run twice."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_tuning.testing import free_port
from tests.support.workers import QUICK_BACKEND_RETRY, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

TASKS = 300


def test_tuning_store_outage_loses_nothing(redis_clean, fault_redis):
    from celery import Celery

    broker = redis_clean.db_url(0)
    # Countdown deferrals: the store restarts empty here, and tasks parked in a tuning Redis without
    # persistence are lost with it (docs/parking.md); what this test holds is that the outage
    # itself loses nothing.
    env = {"TEST_BROKER_URL": broker, "TEST_TUNING_URL": fault_redis.db_url(0),
           "TEST_METRICS_PORT": str(free_port()), "TEST_DEFER_VIA": "countdown"}
    worker = WorkerProcess("tests.apps.reliable:app", env, pool="prefork", concurrency=4)
    producer = Celery("producer", broker=broker, backend=broker, set_as_current=False)
    producer.conf.result_backend_transport_options = QUICK_BACKEND_RETRY
    ledger = redis_clean.client(0)
    tuning = fault_redis.client(0)
    try:
        worker.start()
        def publish(numbers):
            return [producer.send_task("tests.apps.reliable.work", (i,)) for i in numbers]

        # half before the outage, a quarter during it, a quarter after the store is back
        results = publish(range(TASKS // 2))
        deadline = time.monotonic() + 60
        while ledger.hlen("reliable:runs") < TASKS // 4:
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.02)
        assert tuning.dbsize() > 0  # limiter, breaker and cache state live there
        fault_redis.stop()
        stopped_at = time.monotonic()
        done_at_stop = ledger.hlen("reliable:runs")
        results += publish(range(TASKS // 2, TASKS * 3 // 4))
        time.sleep(max(0.0, 3 - (time.monotonic() - stopped_at)))
        ran_during_outage = ledger.hlen("reliable:runs") - done_at_stop
        fault_redis.restart()  # empty: no scripts, no state
        results += publish(range(TASKS * 3 // 4, TASKS))
        values = [r.get(timeout=120) for r in results]
        recovered_in = time.monotonic() - stopped_at - 3
        time.sleep(1.2)  # pool processes write their metric figures every 0.5 s
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{env['TEST_METRICS_PORT']}/metrics",
                                         timeout=10).read().decode()
        output = worker.output()
    finally:
        worker.close()
    assert values == list(range(TASKS))  # every task succeeded, none failed because of the plugin
    runs = {int(k): int(v) for k, v in ledger.hgetall("reliable:runs").items()}
    assert sorted(runs) == list(range(TASKS)) and set(runs.values()) == {1}, "lost or duplicated"
    assert ran_during_outage > 0, "tasks must keep running on the local fallbacks during the outage"
    # state rebuilt in the restarted store: scripts reloaded (NOSCRIPT) and keys written again
    assert tuning.dbsize() > 0
    assert "Traceback" not in output, output[-3000:]
    # each capability fell back as configured (limiter and cache: 'local' / L1 only) and said so
    events = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name in ("celery_tuning_limiter_events_total", "celery_tuning_cache_events_total"):
                key = (sample.name, sample.labels["event"])
            elif sample.name == "celery_tuning_task_outcomes_total":
                key = (sample.name, sample.labels["state"])
            else:
                continue
            events[key] = events.get(key, 0) + sample.value
    assert events.get(("celery_tuning_limiter_events_total", "fallback"), 0) > 0, events
    assert events.get(("celery_tuning_cache_events_total", "redis_error"), 0) > 0, events
    assert events.get(("celery_tuning_task_outcomes_total", "success"), 0) == TASKS, events
    assert events.get(("celery_tuning_task_outcomes_total", "failure"), 0) == 0, events
    print(f"outage: {TASKS} tasks, {ran_during_outage} ran during the 3 s outage, "
          f"all done {recovered_in:.1f} s after the restart")
