"""tuning_queue_concurrency: per-queue in-flight caps inside one real ``celery worker``."""

from __future__ import annotations

import time
import uuid

import pytest
from kombu import Connection

from tests.apps import capped
from tests.support.apps import worker_env
from tests.support.workers import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def intervals(redis_server, queue):
    rows = [line.decode().split() for line in redis_server.client(1).lrange(f"caps:{queue}", 0, -1)]
    return [(float(a), float(b), task_id) for a, b, task_id in rows]


def max_overlap(spans):
    events = sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def wait_for(redis_server, counts, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(intervals(redis_server, q)) >= n for q, n in counts.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"not all tasks ran: { {q: len(intervals(redis_server, q)) for q in counts} }")


def publish(redis_server, slow=10, fast=50, seconds=0.4, broker=None, suffix=""):
    app = capped.app
    app.conf.result_backend = redis_server.db_url(0)
    with app.connection_for_write(broker or redis_server.db_url(0)) as conn:
        for _ in range(slow):
            capped.slow.apply_async((seconds,), connection=conn, queue=f"slow{suffix}")
        for _ in range(fast):
            capped.fast.apply_async(connection=conn, queue=f"fast{suffix}")


def worker(redis_server, cap, pool="prefork", concurrency=4, name="w1", broker=None, suffix=""):
    env = {**worker_env(redis_server), "TEST_SLOW_CAP": str(cap), "TEST_QUEUE_SUFFIX": suffix}
    if broker:
        env["TEST_BROKER_URL"] = broker
    return WorkerProcess("tests.apps.capped:app", env, pool=pool, concurrency=concurrency,
                         queues=f"slow{suffix},fast{suffix}", name=name)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_capped_queue_runs_one_at_a_time_while_the_other_flows(redis_clean, pool):
    w = worker(redis_clean, cap=1, pool=pool).start()
    try:
        publish(redis_clean)
        wait_for(redis_clean, {"slow": 10, "fast": 50})
        assert "per-queue caps slow=1" in w.output()
    finally:
        w.close()
    check_one_slow_at_a_time(redis_clean)


def check_one_slow_at_a_time(redis_clean):
    slow, fast = intervals(redis_clean, "slow"), intervals(redis_clean, "fast")
    assert len({t for _, _, t in slow}) == 10 and len({t for _, _, t in fast}) == 50  # none twice
    assert max_overlap(slow) == 1, sorted(slow)
    # fast tasks were not stuck behind the slow queue: all done before the third slow task ended
    third_slow_end = sorted(b for _, b, _ in slow)[2]
    assert max(b for _, b, _ in fast) < third_slow_end
    # and they used the other pool slots in parallel with the slow one
    assert max_overlap(fast) >= 2


def test_capped_queue_on_rabbitmq(redis_clean, rabbitmq_url):
    suffix = f"-{uuid.uuid4().hex[:8]}"
    w = worker(redis_clean, cap=1, broker=rabbitmq_url, suffix=suffix).start()
    try:
        publish(redis_clean, broker=rabbitmq_url, suffix=suffix)
        wait_for(redis_clean, {"slow": 10, "fast": 50})
    finally:
        w.close()
        with Connection(rabbitmq_url) as conn:  # leave the shared broker as it was
            channel = conn.channel()
            for name in (f"slow{suffix}", f"fast{suffix}"):
                channel.queue_delete(name)
    check_one_slow_at_a_time(redis_clean)


def test_without_the_cap_slow_tasks_overlap(redis_clean):
    """The control: the same worker and load without tuning_queue_concurrency."""
    w = worker(redis_clean, cap=0).start()
    try:
        publish(redis_clean, slow=8, fast=0)
        wait_for(redis_clean, {"slow": 8})
    finally:
        w.close()
    assert max_overlap(intervals(redis_clean, "slow")) >= 3


def test_cap_of_two_is_reached_and_held(redis_clean):
    w = worker(redis_clean, cap=2, pool="threads", concurrency=6).start()
    try:
        publish(redis_clean, slow=8, fast=20, seconds=0.3)
        wait_for(redis_clean, {"slow": 8, "fast": 20})
    finally:
        w.close()
    assert max_overlap(intervals(redis_clean, "slow")) == 2


def test_held_messages_survive_a_worker_stop(redis_clean):
    """Stopping a worker while the capped queue has messages waiting loses none and runs none twice."""
    first = worker(redis_clean, cap=1, name="first").start()
    try:
        publish(redis_clean, slow=8, fast=0, seconds=0.3)
        wait_for(redis_clean, {"slow": 2})
    finally:
        first.close()  # warm shutdown: the running one finishes, the rest stay in the broker
    assert len(intervals(redis_clean, "slow")) < 8
    second = worker(redis_clean, cap=1, name="second").start()
    try:
        wait_for(redis_clean, {"slow": 8})
        time.sleep(0.5)
    finally:
        second.close()
    ids = [t for _, _, t in intervals(redis_clean, "slow")]
    assert len(ids) == 8 and len(set(ids)) == 8
