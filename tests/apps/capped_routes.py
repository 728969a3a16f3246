"""One worker, one queue capped at 1 per way a queue can be declared and a message routed to it.

The one task body records in Redis how many tasks of its case run at once (``conc:<case>`` now,
``peak:<case>`` the highest seen), which started (``starts:<case>``: ids) and when each ran
(``spans:<case>``: ``start end id``, written at the end).
``TEST_QUEUE_SUFFIX`` makes queue and exchange names unique on a shared RabbitMQ; producers in
the test process build the same declarations with :func:`settings` and publish with :func:`send`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict

import redis
from celery import Celery
from kombu import Exchange, Queue

import celery_tuning

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
SUFFIX = os.environ.get("TEST_QUEUE_SUFFIX", "")
#: The cases, in the order the table lists them.
CASES = ("default", "direct", "topic", "fanout", "routed", "auto")
ROUTED_TASK = "tests.apps.capped_routes.routed"


def queue_names(suffix: str) -> Dict[str, str]:
    """case -> queue name."""
    return {case: f"tq-{case}{suffix}" for case in CASES}


def exchanges(suffix: str) -> Dict[str, Exchange]:
    return {"direct": Exchange(f"tq-direct-ex{suffix}", "direct"),
            "topic": Exchange(f"tq-topic-ex{suffix}", "topic"),
            "fanout": Exchange(f"tq-fanout-ex{suffix}", "fanout"),
            "routed": Exchange(f"tq-routed-ex{suffix}", "topic")}


def settings(suffix: str) -> Dict[str, Any]:
    """task_queues, task_routes and the caps (every case's queue at 1)."""
    names, ex = queue_names(suffix), exchanges(suffix)
    declared = [
        Queue(names["default"]),  # Celery gives it its default exchange
        Queue(names["direct"], ex["direct"], routing_key=f"key-direct{suffix}"),  # key != name
        Queue(names["topic"], ex["topic"], routing_key="orders.*"),  # wildcard binding
        Queue(names["fanout"], ex["fanout"]),
        Queue(names["routed"], ex["routed"], routing_key="jobs.#"),
    ]  # names["auto"] is not declared: the worker's -Q creates it
    return {
        "task_queues": declared,
        # names the queue and overrides the routing key (the topic exchange's use of a route)
        "task_routes": {ROUTED_TASK: {"queue": names["routed"], "routing_key": "jobs.eu.7"}},
        "tuning_queue_concurrency": {name: 1 for name in names.values()},
    }


def audit_queue(suffix: str) -> Queue:
    """A queue nobody consumes, bound to the topic exchange with '#': it must get each topic
    message once, as published (a requeue through the exchange would copy surplus messages here)."""
    return Queue(f"tq-audit{suffix}", exchanges(suffix)["topic"], routing_key="#")


def send(producer: Celery, conn: Any, suffix: str, case: str, seconds: float, **options: Any) -> None:
    """Publish one task to ``case``'s queue, the way that case routes it."""
    names, ex = queue_names(suffix), exchanges(suffix)
    args, track = (case, seconds), "tests.apps.capped_routes.track"
    if case == "direct":  # the named exchange and its key (not Celery's anonymous shortcut)
        producer.send_task(track, args, connection=conn, queue=names[case], exchange=ex["direct"].name,
                           routing_key=f"key-direct{suffix}", **options)
    elif case == "topic":  # a key matching the wildcard binding
        producer.send_task(track, args, connection=conn, queue=names[case], routing_key="orders.eu", **options)
    elif case == "routed":  # task_routes decides
        producer.send_task(ROUTED_TASK, args, connection=conn, **options)
    else:  # default exchange ('' + queue name), fanout exchange, auto-created queue
        producer.send_task(track, args, connection=conn, queue=names[case], **options)


app = Celery("tests_capped_routes", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(tuning_redis_url=os.environ.get("TEST_TUNING_URL", URL),
                broker_connection_retry_on_startup=True, **settings(SUFFIX))
if os.environ.get("TEST_VISIBILITY_TIMEOUT"):  # Redis: unacked messages come back after it (swept every 1 s)
    app.conf.broker_transport_options = {"visibility_timeout": float(os.environ["TEST_VISIBILITY_TIMEOUT"]),
                                         "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
celery_tuning.install(app)
_log = redis.Redis.from_url(os.environ.get("TEST_TUNING_URL", URL))

_ENTER = _log.register_script("""
local now = redis.call('INCR', KEYS[1])
if now > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], now) end
redis.call('RPUSH', KEYS[3], ARGV[1])
return now
""")


def _track(task: Any, case: str, seconds: float) -> str:
    start = time.time()
    _ENTER(keys=[f"conc:{case}", f"peak:{case}", f"starts:{case}"], args=[task.request.id])
    try:
        time.sleep(seconds)
    finally:
        _log.decr(f"conc:{case}")
        _log.rpush(f"spans:{case}", f"{start} {time.time()} {task.request.id}")
    return case


@app.task(bind=True)
def track(self: Any, case: str, seconds: float = 0.3) -> str:
    return _track(self, case, seconds)


@app.task(bind=True)
def routed(self: Any, case: str, seconds: float = 0.3) -> str:
    return _track(self, case, seconds)
