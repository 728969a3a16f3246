"""An app with the Prometheus endpoint on, for prefork subprocess workers."""

from __future__ import annotations

import os
import time

from celery import Celery

import celery_tuning
from celery_tuning import TunedTask, sla

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("tests_metered", broker=URL, backend=URL, task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=os.environ.get("TEST_TUNING_URL", URL),
    tuning_metrics_port=int(os.environ["TEST_METRICS_PORT"]) if os.environ.get("TEST_METRICS_PORT") else None,
    broker_connection_retry_on_startup=True,
)
celery_tuning.install(app)


@app.task
def work(i):
    time.sleep(0.02)
    return i


@app.task(base=TunedTask)
@sla(warning=0.05, critical=0.1, on="run")
def too_slow():
    time.sleep(0.2)
    return "late"


@app.task(time_limit=1)
def stuck():
    time.sleep(3)  # killed by the hard time limit: no task_postrun in the child


@app.task
def crunch():
    """Cpu-bound: spins for 30 ms."""
    end = time.perf_counter() + 0.03
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n > 0


@app.task
def nap():
    """Io-bound: sleeps for 30 ms."""
    time.sleep(0.03)
    return True
