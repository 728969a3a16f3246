"""Slow tuning Redis: 50 ms added to every reply, then replies slower than our socket timeout."""

from __future__ import annotations

import time

import pytest

from celery_tuning.storage.redis import RedisConnector
from celery_tuning.testing.proxy import LatencyProxy
from tests.support.reliable import run_reliable

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


@pytest.mark.parametrize(("delay", "count", "bound"), [
    (0.05, 40, 20),  # 50 ms per reply: each attempt pays a few such round trips
    (1.5, 16, 30),   # 3x the 0.5 s read timeout: every call is cut at the timeout and falls back
])
def test_tasks_complete_and_nothing_hangs(redis_clean, proxy, delay, count, bound):
    p = proxy(delay)
    values, runs, output, elapsed = run_reliable(redis_clean, p.url, count, pool="threads", concurrency=8)
    assert values == list(range(count))
    assert set(runs.values()) == {1} and len(runs) == count
    assert elapsed < bound, elapsed  # bounded by our socket timeouts, not by the slow replies
    assert "Traceback" not in output, output[-3000:]
    print(f"latency {delay * 1000:g} ms per reply: {count} tasks in {elapsed:.1f} s")
