"""The demo's Celery app: an ordinary app with celery-tuning installed (URLs from the environment)."""

from __future__ import annotations

import json
import os
import random
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import Throttled, TunedTask, cache_result, circuit_breaker, rate_limit, signals, sla

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
    # One bucket shared by every worker process: 5 calls a second, 2 at once.
    tuning_rate_limits={"llm": {"rate": "5/s", "burst": 2}},
    # Shared by every worker: 3 failures in a row open it for 2 s, then one trial call decides.
    tuning_circuit_breakers={"payments": {"fail_max": 3, "reset_timeout": 2}},
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


@app.task(bind=True, max_retries=0)
@rate_limit("llm")
def call_llm(self, prompt: int) -> dict:
    """Stands in for a paid API allowing 5 calls/s across the whole deployment."""
    now = time.time()
    _events.rpush(EVENTS, json.dumps({"event": "llm", "at": now, "worker": self.request.hostname,
                                      "retries": self.request.retries}))
    return {"prompt": prompt, "at": now}


@app.task(bind=True, max_retries=0)
@rate_limit("llm")
def call_busy_api(self, n: int) -> float:
    """The first call is answered 429 'retry after 2 s': the limiter pauses for every worker."""
    if _events.incr("tuning-demo:busy-calls") == 1:
        raise Throttled(retry_after=2.0)
    return time.time()


@app.task(bind=True, max_retries=0)
@circuit_breaker("payments")             # on_open="retry": wait out the outage without spending retries
def charge(self, order: int) -> dict:
    """Stands in for a payment API that is down while the 'tuning-demo:payments-down' flag is set."""
    down = bool(_events.exists("tuning-demo:payments-down"))
    _events.rpush(EVENTS, json.dumps({"event": "charge", "order": order, "at": time.time(), "down": down}))
    if down:
        raise ConnectionError("payments API unreachable")
    return {"order": order, "at": time.time(), "retries": self.request.retries}


@app.task
@cache_result(ttl=600, l1_ttl=60)
def summarize(doc_id: int, style: str = "short") -> dict:
    """Expensive (0.8 s) and deterministic: identical calls should run it once."""
    _events.incr(f"tuning-demo:summarize-runs:{doc_id}")
    time.sleep(0.8)
    return {"doc": doc_id, "style": style, "summary": f"document {doc_id} in brief"}


_events = redis.Redis.from_url(REDIS_URL, socket_timeout=1)


def _record(event: str, sender: object, **kw: object) -> None:
    kw.pop("signal", None)
    _events.rpush(EVENTS, json.dumps({"event": event, "task": getattr(sender, "name", "?"), **kw}))


# Timings and breaches reach the producer through Redis so the demo can print them.
signals.task_timed.connect(lambda sender=None, **kw: _record("timed", sender, **kw), weak=False)
signals.sla_breached.connect(lambda sender=None, **kw: _record("breach", sender, **kw), weak=False)
