"""Every capability on one task, broker and tuning state on separate redis-servers.

``work(i)`` passes through a shared rate limit, a shared breaker, the result cache (keyed by
``i``, so every call is a miss that runs the body) and SLA timing, and records each run of its
body in the *broker's* Redis (``reliable:runs`` hash), which stays up while the tuning store is
killed: a run counted twice or missing shows up there.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import cache_result, circuit_breaker, rate_limit, sla

BROKER = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
TUNING = os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1")
app = Celery("tests_reliable", broker=BROKER, backend=BROKER, task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=TUNING,
    tuning_sla={"*": {"warning": 5, "critical": 30}},
    tuning_metrics_port=int(os.environ["TEST_METRICS_PORT"]) if os.environ.get("TEST_METRICS_PORT") else None,
    broker_connection_retry_on_startup=True,
    task_acks_late=True,
)
celery_tuning.install(app)
ledger = redis.Redis.from_url(BROKER)


@app.task(bind=True, max_retries=3)
@rate_limit(os.environ.get("TEST_RATE", "500/s"), burst=50)
@circuit_breaker("reliable-api", fail_max=5, reset_timeout=1)
@cache_result(ttl=300, l1_ttl=30)
@sla(warning=5, critical=30)
def work(self, i):
    time.sleep(0.01)
    ledger.hincrby("reliable:runs", str(i), 1)
    return i
