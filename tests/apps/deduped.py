"""@dedupe tasks for subprocess workers (URLs from the environment).

Every body counts its runs in the tuning Redis (``runs:<name>:<x>``) and marks its start
(``started:<task id>``) so tests can tell what ran, how often, and when.
"""

from __future__ import annotations

import os
import signal
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import dedupe, rate_limit

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
TUNING = os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1")
app = Celery("tests_deduped", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=TUNING,
    tuning_concurrency_lease_ttl=float(os.environ.get("TEST_LEASE_TTL", "30")),
    tuning_dedupe_ttl=float(os.environ.get("TEST_DEDUPE_TTL", "600")),
    tuning_rate_limits={"trickle": {"rate": "1/s", "burst": 1}},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
celery_tuning.install(app)
ledger = redis.Redis.from_url(TUNING)


def _ran(name: str, x: object, task_id: str) -> None:
    ledger.incr(f"runs:{name}:{x}")
    ledger.set(f"started:{task_id}", time.time())


@app.task(bind=True)
@dedupe()
def render(self, x, seconds=0.0):
    _ran("render", x, self.request.id)
    time.sleep(seconds)
    return {"x": x, "id": self.request.id}


@app.task(bind=True)
@dedupe(until="started")
def refresh(self, x, seconds=0.0):
    _ran("refresh", x, self.request.id)
    time.sleep(seconds)
    return x


@app.task(bind=True, max_retries=3, default_retry_delay=1)
@dedupe()
def flaky(self, x):
    """Fails its first attempt with a retry; the second returns."""
    _ran("flaky", x, self.request.id)
    if self.request.retries == 0:
        raise self.retry(countdown=1.5)
    return {"x": x, "retries": self.request.retries}


@app.task(bind=True, time_limit=1.5)
@dedupe()
def stuck(self, x):
    """Killed by its hard time limit. It ignores SIGTERM, so the pool process dies by SIGKILL with no
    chance to free its key: only the worker's main process can."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _ran("stuck", x, self.request.id)
    time.sleep(30)


@app.task(bind=True)
@dedupe()
@rate_limit("trickle", max_wait=0, max_defer=30)
def trickled(self, x):
    """One a second: the second call in a second is deferred (parked), keeping its lock."""
    _ran("trickled", x, self.request.id)
    return x


@app.task
def add(x, y):
    """A plain task to put in front of a @dedupe one in a canvas."""
    return x + y


@app.task
def fail(x):
    raise ValueError(x)


@app.task(bind=True)
@dedupe(key=lambda x, **_: x)
def pages(self, x, page=0):
    """Replaces itself (``Task.replace``: the same id) with its next page, under the same key, due
    1.5 s later; the second page returns."""
    _ran("pages", x, self.request.id)
    if page == 0:
        return self.replace(pages.si(x, page=1).set(countdown=1.5))
    return {"x": x, "page": page, "id": self.request.id}


@app.task(bind=True)
@dedupe(key=lambda x, **_: 1 / 0)
def badkey(self, x):
    """Its key function always raises: ``delay()`` raises; sent by name, it still runs."""
    _ran("badkey", x, self.request.id)
    return x
