"""An app with ``@debounce`` tasks; every run is recorded in the ledger Redis (``runs:<task>``, a
JSON line per run: task id, arguments, start and end times) so tests can count runs and time them."""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import debounce

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
TUNING = os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1")
app = Celery("tests_debounced", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=TUNING,
    tuning_park_mover=os.environ.get("TEST_PARK_MOVER", "1"),
    tuning_concurrency_lease_ttl=3.0,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
celery_tuning.install(app)
ledger = redis.Redis.from_url(os.environ.get("TEST_LEDGER_URL", TUNING))


def _record(task: str, request_id: str, start: float, **args: object) -> None:
    ledger.rpush(f"runs:{task}", json.dumps({"id": request_id, "start": start, "end": time.time(), **args}))


@app.task(bind=True)
@debounce(0.5)
def refresh(self, i):
    _record("refresh", self.request.id, time.time(), i=i)
    return i


@app.task(bind=True)
@debounce(4.0)
def patient(self, i):
    """Due 4 s after its call: long enough to flush the store first on a loaded machine."""
    _record("patient", self.request.id, time.time(), i=i)
    return i


@app.task(bind=True)
@debounce(0.5, max_wait=1.0)
def capped(self, i):
    _record("capped", self.request.id, time.time(), i=i)
    return i


@app.task(bind=True)
@debounce(0.3)
def slow(self, i, seconds=1.5):
    start = time.time()
    ledger.rpush("started:slow", i)
    time.sleep(seconds)
    _record("slow", self.request.id, start, i=i)
    return i


@app.task(bind=True)
@debounce(0.3)
def any_account(self, account, i):
    _record("any_account", self.request.id, time.time(), account=account, i=i)
    return i


@app.task(bind=True)
@debounce(0.3, key=lambda account, i: account)
def per_account(self, account, i):
    _record("per_account", self.request.id, time.time(), account=account, i=i)
    return i


@app.task(bind=True)
@debounce(0.3)
def retried(self, i):
    """Its first attempt of the run with ``i == 1`` takes 0.5 s and retries after 1 s."""
    _record("retried", self.request.id, time.time(), i=i, retries=self.request.retries)
    if i == 1 and self.request.retries == 0:
        time.sleep(0.5)
        raise self.retry(countdown=1.0)
    return i


@app.task(bind=True)
def plain_add(self, x, y=0):
    """Not debounced: a chain's neighbour, a chord's body, a link= callback."""
    _record("plain_add", self.request.id, time.time(), x=x, y=y)
    return x + y if not isinstance(x, list) else sum(x) + y
