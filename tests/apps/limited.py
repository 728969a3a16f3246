"""A rate-limited app for subprocess workers (URLs from the environment)."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import Throttled, concurrency_limit, rate_limit
from celery_tuning.integration.deferral import deferrals_of

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
TUNING = os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1")
app = Celery("tests_limited", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=TUNING,
    tuning_rate_limits={"shared": {"rate": "10/s", "burst": 2}, "api": {"rate": "20/s", "burst": 1}},
    tuning_circuit_breakers={"payments": {"fail_max": 3, "reset_timeout": 30}},
    tuning_concurrency_limits={"render": 2, "exclusive": 1},
    tuning_concurrency_lease_ttl=float(os.environ.get("TEST_LEASE_TTL", "3")),
    tuning_defer_via=os.environ.get("TEST_DEFER_VIA", "park"),
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
)
celery_tuning.install(app)
ledger = redis.Redis.from_url(TUNING)


@app.task(bind=True, max_retries=0)
@rate_limit("shared", max_wait=0.15)  # short, so most tasks are deferred rather than sleep
def limited(self, i):
    """Counts its runs per task id so tests can prove exactly-once."""
    ledger.hincrby("runs", self.request.id, 1)
    ledger.rpush("run_times", time.time())
    return {"i": i, "retries": self.request.retries, "deferrals": deferrals_of(self.request)}


@app.task(bind=True, max_retries=0)
@rate_limit("api")
def flaky_api(self, i):
    """The first run of each task gets an HTTP 429 asking for 1 s of quiet."""
    if ledger.hincrby("api_calls", self.request.id, 1) == 1:
        raise Throttled(retry_after=1.0)
    ledger.rpush("api_ok_times", time.time())
    return i


@app.task(bind=True, max_retries=0)
@concurrency_limit("render")
def render(self, i):
    """At most 2 of these run at once across every worker."""
    running = ledger.incr("inflight")
    ledger.rpush("inflight_seen", running)
    try:
        time.sleep(0.4)
    finally:
        ledger.decr("inflight")
    ledger.hincrby("render_runs", self.request.id, 1)
    return {"i": i, "retries": self.request.retries}


@app.task
@concurrency_limit("exclusive")
def hold(seconds, tag):
    """Holds the only 'exclusive' slot for a while (a test kills its worker meanwhile)."""
    ledger.set(f"started:{tag}", time.time())
    time.sleep(seconds)
    return tag
