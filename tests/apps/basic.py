"""A small tuned app used by subprocess workers and CLI tests (URLs from the environment)."""

from __future__ import annotations

import os
import time

from celery import Celery

import celery_tuning
from celery_tuning import TunedTask, sla

app = Celery(
    "tests_basic",
    broker=os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("TEST_BACKEND_URL", "redis://127.0.0.1:6379/0"),
    task_cls="celery_tuning:TunedTask",
)
app.conf.update(
    tuning_redis_url=os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/0"),
    tuning_sla={"slowq": {"warning": 0.05, "critical": 5}},
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)
celery_tuning.install(app)


@app.task(bind=True)
def headers(self):
    """Return what the worker saw of the publish-time stamps."""
    req = self.request
    return {
        "published_at": getattr(req, "tuning_published_at", None),
        "sent_at": getattr(req, "tuning_sent_at", None),
        "retries": req.retries,
        "pid": os.getpid(),
    }


@app.task
def add(x, y):
    return x + y


@app.task(base=TunedTask)
@sla(warning=0.01, critical=10)
def slow(seconds):
    time.sleep(seconds)
    return seconds


@app.task(bind=True, max_retries=3)
def retry_once(self):
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return {
        "published_at": getattr(self.request, "tuning_published_at", None),
        "sent_at": getattr(self.request, "tuning_sent_at", None),
        "retries": self.request.retries,
    }
