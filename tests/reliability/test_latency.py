"""Slow tuning Redis: 50 ms added to every reply, then replies slower than our socket timeout."""

from __future__ import annotations

import time

import pytest

from celery_tuning.storage.redis import RedisConnector
from celery_tuning.testing.proxy import LatencyProxy
from tests.support.workers import QUICK_BACKEND_RETRY, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]


@pytest.fixture()
def proxy(fault_redis):
    holder = {}

    def make(delay):
        holder["proxy"] = LatencyProxy(fault_redis.port, delay).start()
        return holder["proxy"]

    yield make
    if "proxy" in holder:
        holder["proxy"].close()


def test_the_proxy_adds_the_delay(proxy):
    p = proxy(0.05)
    connector = RedisConnector(p.url)
    connector.ping()
    start = time.perf_counter()
    for _ in range(5):
        connector.ping()
    per_trip = (time.perf_counter() - start) / 5
    assert 0.045 <= per_trip < 0.5


def run_tasks(redis_clean, tuning_url, count):
    from celery import Celery

    broker = redis_clean.db_url(0)
    env = {"TEST_BROKER_URL": broker, "TEST_TUNING_URL": tuning_url}
    worker = WorkerProcess("tests.apps.reliable:app", env, pool="threads", concurrency=8)
    producer = Celery("producer", broker=broker, backend=broker, set_as_current=False)
    producer.conf.result_backend_transport_options = QUICK_BACKEND_RETRY
    try:
        worker.start()
        start = time.monotonic()
        results = [producer.send_task("tests.apps.reliable.work", (i,)) for i in range(count)]
        values = [r.get(timeout=120) for r in results]
        elapsed = time.monotonic() - start
        output = worker.output()
    finally:
        worker.close()
    runs = {int(k): int(v) for k, v in redis_clean.client(0).hgetall("reliable:runs").items()}
    return values, elapsed, runs, output


def test_tasks_complete_through_50ms_of_added_latency(redis_clean, proxy):
    p = proxy(0.05)
    values, elapsed, runs, output = run_tasks(redis_clean, p.url, 40)
    assert values == list(range(40))
    assert set(runs.values()) == {1} and len(runs) == 40
    # each attempt pays a few 50 ms round trips (limiter, breaker, cache lookup and store); with
    # 8 threads 40 attempts take seconds, not minutes
    assert elapsed < 20, elapsed
    assert "Traceback" not in output, output[-3000:]
    print(f"latency 50 ms: 40 tasks in {elapsed:.1f} s")


def test_replies_slower_than_the_socket_timeout_fall_back_and_never_hang(redis_clean, proxy):
    """1.5 s per reply, three times the 0.5 s read timeout: every call times out, bounded."""
    p = proxy(1.5)
    values, elapsed, runs, output = run_tasks(redis_clean, p.url, 16)
    assert values == list(range(16))
    assert set(runs.values()) == {1} and len(runs) == 16
    # each attempt meets a few 0.5 s timeouts and then the local fallbacks; nothing waits 1.5 s
    # replies out, let alone hangs
    assert elapsed < 30, elapsed
    assert "Traceback" not in output, output[-3000:]
    print(f"latency 1.5 s: 16 tasks in {elapsed:.1f} s")
