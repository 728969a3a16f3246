"""8,000 tasks through two prefork workers with every capability on: all accounted for, no leak.

(20,000 until the suite outgrew its 15-minute budget: 137 s of it; large runs live in benchmarks/.)
"""

from __future__ import annotations

import time

import psutil
import pytest

from celery_tuning.testing import free_port
from tests.support.workers import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

TASKS = 8_000


def tree_rss(pid):
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_eight_thousand_tasks_all_accounted_for_without_memory_growth(redis_clean, fault_redis):
    from celery import Celery

    broker = redis_clean.db_url(0)
    workers = [WorkerProcess("tests.apps.reliable:app",
                             {"TEST_BROKER_URL": broker, "TEST_TUNING_URL": fault_redis.db_url(0),
                              "TEST_RATE": "100000/s", "TEST_METRICS_PORT": str(free_port())},
                             pool="prefork", concurrency=2, name=f"load{i}") for i in range(2)]
    producer = Celery("producer", broker=broker, backend=broker, set_as_current=False)
    ledger = redis_clean.client(0)
    try:
        for w in workers:
            w.start()
        start = time.monotonic()
        with producer.connection_for_write() as conn:
            for i in range(TASKS):
                producer.send_task("tests.apps.reliable.work", (i,), connection=conn)
        published = time.monotonic() - start
        deadline = time.monotonic() + 400
        rss_early = None
        while ledger.hlen("reliable:runs") < TASKS:
            assert time.monotonic() < deadline, (ledger.hlen("reliable:runs"), workers[0].output()[-2000:])
            if rss_early is None and ledger.hlen("reliable:runs") >= 2000:
                rss_early = [tree_rss(w.proc.pid) for w in workers]
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        time.sleep(1.0)  # the last results are stored after the body counted itself
        rss_late = [tree_rss(w.proc.pid) for w in workers]
    finally:
        for w in workers:
            w.close()
    runs = ledger.hgetall("reliable:runs")
    assert len(runs) == TASKS and {int(v) for v in runs.values()} == {1}, "lost or duplicated"
    stored = sum(1 for _ in ledger.scan_iter("celery-task-meta-*", count=1000))
    assert stored == TASKS
    assert rss_early is not None
    growth = [late / early - 1 for early, late in zip(rss_early, rss_late)]
    print(f"load: {TASKS} tasks, published in {published:.1f} s, all done in {elapsed:.1f} s "
          f"({TASKS / elapsed:.0f}/s); RSS MB at 2,000 tasks {[round(r / 2**20, 1) for r in rss_early]}, "
          f"at the end {[round(r / 2**20, 1) for r in rss_late]} (growth {[f'{g:+.1%}' for g in growth]})")
    assert all(g < 0.10 for g in growth), growth
