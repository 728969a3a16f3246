"""A cached app for subprocess workers (URLs from the environment)."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import cache_result

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
TUNING = os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1")
app = Celery("tests_cached", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(tuning_redis_url=TUNING, broker_connection_retry_on_startup=True, worker_prefetch_multiplier=1,
                task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
                tuning_cache_write_behind=True)  # the worker tests here cover deferred stores
celery_tuning.install(app)
ledger = redis.Redis.from_url(TUNING)


@app.task
@cache_result(ttl=600, l1_ttl=30)
def embed(text, model="small"):
    """Expensive on purpose; counts how often the body really runs."""
    ledger.incr(f"body_runs:{text}")
    time.sleep(0.5)
    return {"text": text, "model": model, "vector": [len(text), 1.5, -2]}
