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
from celery_tuning import cache_result, circuit_breaker, concurrency_limit, rate_limit, sla

BROKER = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
TUNING = os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1")
BACKEND = os.environ.get("TEST_BACKEND_URL", BROKER)
app = Celery("tests_reliable", broker=BROKER, backend=BACKEND, task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=TUNING,
    tuning_sla={"*": {"warning": 5, "critical": 30}},
    tuning_metrics_port=int(os.environ["TEST_METRICS_PORT"]) if os.environ.get("TEST_METRICS_PORT") else None,
    broker_connection_retry_on_startup=True,
    task_acks_late=True,
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    # for ``holder``: short TTLs, so a worker killed while holding them frees them quickly
    tuning_circuit_breakers={"doomed-api": {"fail_max": 1, "reset_timeout": 0.5, "trial_timeout": 2}},
    tuning_concurrency_limits={"one-slot": 1},
    tuning_concurrency_lease_ttl=2.0,
    # Parking by default; the store-outage test defers with countdowns, because a tuning Redis that
    # restarts empty loses what is parked in it (docs/parking.md: the persistence requirement).
    tuning_defer_via=os.environ.get("TEST_DEFER_VIA", "park"),
)
celery_tuning.install(app)
ledger = redis.Redis.from_url(BACKEND)  # the broker may be RabbitMQ


@app.task(bind=True, max_retries=3)
@rate_limit(os.environ.get("TEST_RATE", "500/s"), burst=50)
@circuit_breaker("reliable-api", fail_max=5, reset_timeout=1)
@cache_result(ttl=300, l1_ttl=30)
@sla(warning=5, critical=30)
def work(self, i):
    time.sleep(0.01)
    ledger.hincrby("reliable:runs", str(i), 1)
    return i


@app.task(bind=True, max_retries=0)
@cache_result(ttl=300, l1_ttl=0, lock_timeout=2)
@circuit_breaker("doomed-api")
@concurrency_limit("one-slot")
def holder(self, tag):
    """The first run hangs (a test SIGKILLs its worker) holding the cache's single-flight lock,
    the breaker's half-open trial and the only concurrency slot; later runs return at once."""
    if ledger.incr(f"holder:{tag}") == 1:
        time.sleep(120)
    return tag
