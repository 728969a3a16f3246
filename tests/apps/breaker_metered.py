"""A breaker-guarded task with the Prometheus endpoint on, for prefork workers whose children recycle."""

from __future__ import annotations

import os

from celery import Celery

import celery_tuning
from celery_tuning import circuit_breaker

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("tests_breaker_metered", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=os.environ.get("TEST_TUNING_URL", URL),
    tuning_metrics_port=int(os.environ["TEST_METRICS_PORT"]) if os.environ.get("TEST_METRICS_PORT") else None,
    tuning_circuit_breakers={"flaky": {"fail_max": 1, "reset_timeout": 1}},
    tuning_breaker_refresh_interval=0.05,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
celery_tuning.install(app)


@app.task(max_retries=0)
@circuit_breaker("flaky", on_open="fail")
def call(ok):
    if not ok:
        raise ValueError("the remote side failed")
    return "ok"
