"""Broker = RabbitMQ (the machine's, 127.0.0.1:5672), tuning state and results on Redis.

The capabilities' end-to-end checks, on a real AMQP broker: a shared rate limit across prefork
workers with deferral, a cluster-wide concurrency cap, single flight of the result cache, and every
capability on one task (breaker and SLA included) run exactly once. Each test uses its own queue
names and deletes them afterwards; all skip with the reason when RabbitMQ does not answer.
"""

from __future__ import annotations

import json
import uuid

import pytest
from kombu import Connection

from tests.support.apps import run_producer, worker_env
from tests.support.workers import running_workers

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]


@pytest.fixture()
def amqp(redis_clean, rabbitmq_url):
    """Environment putting the test apps on RabbitMQ with a fresh queue; the queue is deleted after."""
    queue = f"tuning-test-{uuid.uuid4().hex[:10]}"
    env = {**worker_env(redis_clean), "TEST_BROKER_URL": rabbitmq_url, "TEST_QUEUE": queue}
    yield env
    with Connection(rabbitmq_url) as conn:
        channel = conn.channel()
        channel.queue_delete(queue)


def test_shared_rate_limit_with_deferral_on_rabbitmq(redis_clean, amqp):
    with running_workers("tests.apps.limited:app", amqp, concurrency=2, prefix="rl", queues=amqp["TEST_QUEUE"]):
        code = ("import time, json\nfrom tests.apps.limited import limited\n"
                "start = time.time()\nrs = [limited.delay(i) for i in range(40)]\n"
                "values = [r.get(timeout=90) for r in rs]\n"
                "print(json.dumps({'elapsed': time.time() - start, 'values': values}))\n")
        data = json.loads(run_producer(code, redis_clean, env=amqp).splitlines()[-1])
    assert data["elapsed"] >= 3.4, data["elapsed"]  # 40 at 10/s burst 2, shared by both workers
    assert [v["i"] for v in data["values"]] == list(range(40))
    assert all(v["retries"] == 0 for v in data["values"])
    assert any(v["deferrals"] > 0 for v in data["values"])
    runs = redis_clean.client(1).hgetall("runs")
    assert len(runs) == 40 and set(runs.values()) == {b"1"}


def test_cluster_wide_concurrency_cap_on_rabbitmq(redis_clean, amqp):
    with running_workers("tests.apps.limited:app", amqp, concurrency=3, prefix="cc", queues=amqp["TEST_QUEUE"]):
        run_producer("from tests.apps.limited import render\n"
                     "rs = [render.delay(i) for i in range(8)]\n"
                     "assert [r.get(timeout=90)['i'] for r in rs] == list(range(8))\n", redis_clean, env=amqp)
    seen = [int(x) for x in redis_clean.client(1).lrange("inflight_seen", 0, -1)]
    assert len(seen) == 8 and max(seen) <= 2, seen
    runs = redis_clean.client(1).hgetall("render_runs")
    assert len(runs) == 8 and set(runs.values()) == {b"1"}


def test_cache_single_flight_on_rabbitmq(redis_clean, amqp):
    with running_workers("tests.apps.cached:app", amqp, pool="threads", concurrency=8, prefix="ca",
                         queues=amqp["TEST_QUEUE"]):
        out = run_producer("import json\nfrom tests.apps.cached import embed\n"
                           "rs = [embed.delay('hello') for _ in range(20)]\n"
                           "print(json.dumps([r.get(timeout=60)['text'] for r in rs]))\n", redis_clean, env=amqp)
    assert json.loads(out) == ["hello"] * 20
    assert int(redis_clean.client(1).get("body_runs:hello")) == 1


def test_every_capability_on_one_task_runs_each_call_once_on_rabbitmq(redis_clean, amqp):
    env = {**amqp, "TEST_BACKEND_URL": redis_clean.db_url(0), "TEST_TUNING_URL": redis_clean.db_url(1)}
    with running_workers("tests.apps.reliable:app", env, count=1, concurrency=4, prefix="all",
                         queues=amqp["TEST_QUEUE"]):
        out = run_producer("import json\nfrom tests.apps.reliable import work\n"
                           "rs = [work.delay(i) for i in range(150)]\n"
                           "print(json.dumps([r.get(timeout=90) for r in rs]))\n", redis_clean, env=env)
    assert json.loads(out) == list(range(150))
    runs = {int(k): int(v) for k, v in redis_clean.client(0).hgetall("reliable:runs").items()}
    assert sorted(runs) == list(range(150)) and set(runs.values()) == {1}
