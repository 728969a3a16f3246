"""The demo's Celery app: an ordinary app with celery-tuning installed (URLs from the environment)."""

from __future__ import annotations

import json
import os
import random
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import TunedTask, signals, sla

REDIS_URL = os.environ.get("DEMO_REDIS_URL", "redis://127.0.0.1:6379/15")
QUEUE = "tuning-demo"
EVENTS = "tuning-demo:events"

app = Celery("demo", broker=REDIS_URL, backend=REDIS_URL, task_cls="celery_tuning:TunedTask")
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    tuning_key_prefix="tuning-demo",
    tuning_sla={QUEUE: {"warning": 0.5, "critical": 2.0, "on": "total"}},
)
celery_tuning.install(app)


@app.task
def fetch_page(n: int) -> int:
    """Stands in for an HTTP call: 20-80 ms of I/O."""
    time.sleep(random.uniform(0.02, 0.08))
    return n


@app.task(base=TunedTask)
@sla(warning=0.15, critical=1.0, on="run")
def render_report(n: int) -> int:
    """Slow on purpose: every fourth report misses its 150 ms run-time SLA."""
    time.sleep(0.3 if n % 4 == 0 else 0.05)
    return n


_events = redis.Redis.from_url(REDIS_URL, socket_timeout=1)


def _record(event: str, sender: object, **kw: object) -> None:
    kw.pop("signal", None)
    _events.rpush(EVENTS, json.dumps({"event": event, "task": getattr(sender, "name", "?"), **kw}))


# Timings and breaches reach the producer through Redis so the demo can print them.
signals.task_timed.connect(lambda sender=None, **kw: _record("timed", sender, **kw), weak=False)
signals.sla_breached.connect(lambda sender=None, **kw: _record("breach", sender, **kw), weak=False)
