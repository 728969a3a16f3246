"""An app with per-key concurrency caps (issue #18): tenants with caps of their own, side by side.

``sync`` is limited by the named limit 'sync' per tenant (1 by default, 2 for 'big' through
``per_key``); ``inline_sync`` by an inline limit with the same caps. Every run records its span
per tenant (and its start, as it starts) and its run count per task id in the tuning Redis.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import concurrency_limit

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
TUNING = os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1")
app = Celery("tests_tenants", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=TUNING,
    tuning_defer_via="park",
    tuning_concurrency_limits={"sync": {"limit": 1, "per_key": {"big": 2}}},
    tuning_concurrency_lease_ttl=5.0,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
celery_tuning.install(app)
ledger = redis.Redis.from_url(TUNING)


def tenant_of(tenant, i, **kw):
    return tenant


def _run(kind: str, task_id: str, tenant: str, i: int, seconds: float) -> int:
    start = time.time()
    ledger.rpush(f"starts:{kind}:{tenant}", f"{i} {start}")
    time.sleep(seconds)
    ledger.hincrby("runs", task_id, 1)
    ledger.rpush(f"spans:{kind}:{tenant}", f"{i} {start} {time.time()}")
    return i


@app.task(bind=True, max_retries=0, acks_late=True)
@concurrency_limit("sync", key=tenant_of)
def sync(self, tenant, i, seconds=0.3):
    return _run("named", self.request.id, tenant, i, seconds)


@app.task(bind=True, max_retries=0, acks_late=True)
@concurrency_limit(limit=1, key=tenant_of, per_key={"big": 2})
def inline_sync(self, tenant, i, seconds=0.3):
    return _run("inline", self.request.id, tenant, i, seconds)
