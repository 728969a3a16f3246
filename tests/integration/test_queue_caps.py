"""tuning_queue_concurrency: per-queue in-flight caps inside one real ``celery worker``."""

from __future__ import annotations

import signal
import time
import uuid
from queue import Empty

import pytest
from celery import Celery
from kombu import Connection

from celery_tuning.integration.queue_caps import BrpopWaker
from tests.apps import capped, capped_routes
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
        # Warm shutdown: SIGTERM to the main process only, which lets the running task finish (the
        # process group's SIGTERM in close() would also kill the prefork child running it: lost).
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=15)
    finally:
        first.close()  # the rest stay in the broker
    assert len(intervals(redis_clean, "slow")) < 8
    second = worker(redis_clean, cap=1, name="second").start()
    try:
        wait_for(redis_clean, {"slow": 8})
        time.sleep(0.5)
    finally:
        second.close()
    ids = [t for _, _, t in intervals(redis_clean, "slow")]
    assert len(ids) == 8 and len(set(ids)) == 8


# -- every way a queue can be declared and routed (issue #21) ------------------------------------
#
# One worker per broker consumes one queue per case of capped_routes.CASES, each capped at 1, and
# runs three phases; each adds what it found wrong to a list the test shows whole.

ROUTE_TASKS, ROUTE_SECONDS = 3, 0.3
#: Phase 2: RESUME_TASKS of RESUME_SECONDS at cap 1, every other queue idle; back to back at best.
RESUME_TASKS, RESUME_SECONDS, RESUME_MARGIN = 4, 0.5, 0.6
#: Phase 3 (Redis): countdown tasks become due together, so all but one wait for the slot, longer
#: than the broker's visibility timeout (2 s, swept every second) in all.
VISIBILITY_TIMEOUT, ETA_TASKS, ETA_SECONDS = 2, 5, 0.8


def routes_producer(broker, suffix):
    producer = Celery("tests_capped_routes_producer", broker=broker, set_as_current=False)
    producer.conf.update(**capped_routes.settings(suffix))
    return producer


def spans(redis_server, case):
    rows = [line.decode().split() for line in redis_server.client(1).lrange(f"spans:{case}", 0, -1)]
    return [(float(a), float(b), task_id) for a, b, task_id in rows]


def starts(redis_server, case):
    return [t.decode() for t in redis_server.client(1).lrange(f"starts:{case}", 0, -1)]


def wait_for_spans(redis_server, counts, timeout=15.0):
    """Whether every case ran its count of tasks within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(spans(redis_server, c)) >= n for c, n in counts.items()):
            return True
        time.sleep(0.05)
    return False


def ran_once_under_cap(redis_server, case, count):
    """What is wrong with ``case``'s runs so far: not ``count`` distinct tasks each once, or two at once."""
    peak = int(redis_server.client(1).get(f"peak:{case}") or 0)
    started = starts(redis_server, case)
    if peak == 1 and len(started) == count and len(set(started)) == count:
        return []
    return [f"{case}: {len(started)} runs of {len(set(started))} distinct tasks (sent {count}), "
            f"{peak} at once (cap 1)"]


def phase_routes(redis_server, producer, suffix):
    with producer.connection_for_write() as conn:
        for _ in range(ROUTE_TASKS):  # interleaved: every queue has work at once
            for case in capped_routes.CASES:
                capped_routes.send(producer, conn, suffix, case, ROUTE_SECONDS)
    wait_for_spans(redis_server, {case: ROUTE_TASKS for case in capped_routes.CASES})
    time.sleep(0.2)
    return [p for case in capped_routes.CASES for p in ran_once_under_cap(redis_server, case, ROUTE_TASKS)]


def phase_resume(redis_server, producer, suffix, case="topic"):
    before = len(spans(redis_server, case))
    with producer.connection_for_write() as conn:
        for _ in range(RESUME_TASKS):
            capped_routes.send(producer, conn, suffix, case, RESUME_SECONDS)
    if not wait_for_spans(redis_server, {case: before + RESUME_TASKS}):
        return [f"resume: {len(spans(redis_server, case)) - before} of {RESUME_TASKS} ran"]
    run = sorted(spans(redis_server, case))[before:]
    took, ideal = run[-1][1] - run[0][0], RESUME_TASKS * RESUME_SECONDS
    if max_overlap(run) > 1 or took > ideal + RESUME_MARGIN:
        return [f"resume: {RESUME_TASKS} tasks of {RESUME_SECONDS} s at cap 1 took {took:.2f} s, "
                f"{max_overlap(run)} at once (back to back: {ideal:.1f} s)"]
    return []


def phase_visibility_timeout(redis_server, producer, suffix, case="topic"):
    before = len(spans(redis_server, case))
    with producer.connection_for_write() as conn:
        for _ in range(ETA_TASKS):
            capped_routes.send(producer, conn, suffix, case, ETA_SECONDS, countdown=0.2)
    wait_for_spans(redis_server, {case: before + ETA_TASKS})
    time.sleep(0.5)  # a copy the broker gave back starts as soon as the queue is consumed again
    return [f"past the visibility timeout: {p}" for p in ran_once_under_cap(redis_server, case, before + ETA_TASKS)]


def run_route_phases(redis_server, broker, suffix, redis_broker):
    names = capped_routes.queue_names(suffix)
    env = {**worker_env(redis_server), "TEST_BROKER_URL": broker, "TEST_QUEUE_SUFFIX": suffix}
    if redis_broker:
        env["TEST_VISIBILITY_TIMEOUT"] = str(VISIBILITY_TIMEOUT)
    w = WorkerProcess("tests.apps.capped_routes:app", env, pool="threads", concurrency=8,
                      queues=",".join(names.values()), name=f"routes{suffix}").start()
    producer = routes_producer(broker, suffix)
    audit = capped_routes.audit_queue(suffix)
    try:
        with producer.connection_for_write() as conn:
            audit(conn.default_channel).declare()
        problems = phase_routes(redis_server, producer, suffix)
        problems += phase_resume(redis_server, producer, suffix)
        sent = ROUTE_TASKS + RESUME_TASKS
        if redis_broker:
            # On the topic queue: the surplus of due countdown tasks is put back (to its queue only).
            problems += phase_visibility_timeout(redis_server, producer, suffix)
            sent += ETA_TASKS
        with producer.connection_for_write() as conn:
            copies = audit(conn.default_channel).purge() or 0
            audit(conn.default_channel).delete()
        if copies != sent:  # every topic message once, surplus put back or not
            problems.append(f"audit queue bound to the topic exchange got {copies} messages, {sent} were "
                            "published there")
    finally:
        w.close()
    return problems


def test_caps_on_redis_for_every_way_a_queue_is_declared(redis_clean):
    """Default exchange, named direct exchange, topic wildcard, fanout, task_routes, auto-created;
    then a paused queue resumes at once, and tasks held past the visibility timeout run once."""
    problems = run_route_phases(redis_clean, redis_clean.db_url(0), "", redis_broker=True)
    assert not problems, "\n".join(problems)


def test_caps_on_rabbitmq_for_every_way_a_queue_is_declared(redis_clean, rabbitmq_url):
    suffix = f"-{uuid.uuid4().hex[:8]}"
    try:
        problems = run_route_phases(redis_clean, rabbitmq_url, suffix, redis_broker=False)
        assert not problems, "\n".join(problems)
    finally:
        with Connection(rabbitmq_url) as conn:  # leave the shared broker as it was
            channel = conn.channel()
            for name in capped_routes.queue_names(suffix).values():
                channel.queue_delete(name)
            for exchange in capped_routes.exchanges(suffix).values():
                channel.exchange_delete(exchange.name)


# -- ending kombu's pending BRPOP on Redis ------------------------------------------------------


def pending_brpop(url, queue="tq-wake"):
    """A kombu Redis channel consuming ``queue`` with its BRPOP sent (1 s timeout), as in a worker."""
    conn = Connection(url)
    channel = conn.channel()
    channel.basic_consume(queue, no_ack=True, callback=lambda message: None, consumer_tag="wake")
    conn.transport.cycle._register_BRPOP(channel)
    assert channel._in_poll
    return conn, channel


def brpop_returns_in(channel):
    """Seconds until the pending BRPOP answers (empty: kombu raises Empty)."""
    start = time.monotonic()
    with pytest.raises(Empty):
        channel._brpop_read()
    return time.monotonic() - start


def test_brpop_waker_ends_the_pending_brpop_at_once(redis_clean):
    conn, channel = pending_brpop(redis_clean.db_url(0))
    try:
        waker = BrpopWaker(channel)
        assert waker.wake() is True
        assert brpop_returns_in(channel) < 0.3  # not the BRPOP's 1 s timeout
        channel._brpop_start()  # the next BRPOP: same connection, its id is reused
        assert waker.wake() is True and brpop_returns_in(channel) < 0.3
        assert waker.wake() is False  # nothing pending: nothing to do
    finally:
        conn.release()


def test_brpop_waker_without_client_permission_logs_once_and_steps_aside(redis_clean, caplog):
    admin = redis_clean.client()
    admin.execute_command("ACL", "SETUSER", "noclient", "on", ">pw", "~*", "&*", "+@all", "-client")
    url = f"redis://noclient:pw@127.0.0.1:{redis_clean.port}/0"
    conn, channel = pending_brpop(url)
    try:
        caplog.set_level("INFO", logger="celery_tuning.worker")
        waker = BrpopWaker(channel)
        assert waker.wake() is False and waker.wake() is False
        assert len([r for r in caplog.records if "cannot end the Redis broker's pending BRPOP" in r.getMessage()]) == 1
        assert brpop_returns_in(channel) > 0.5  # the BRPOP ran to its timeout
    finally:
        conn.release()
        admin.execute_command("ACL", "DELUSER", "noclient")
