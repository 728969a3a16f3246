"""An app with queue profiles, for worker subprocess tests."""

from __future__ import annotations

import os

from celery import Celery

import celery_tuning

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("tests_profiled", broker=URL, backend=URL, task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=os.environ.get("TEST_TUNING_URL", URL),
    tuning_queue_profiles={"webhooks": "io", "embeddings": "cpu", "small": "tiny", "elastic": "elastic",
                           "q": "three"},
    tuning_profiles={"tiny": {"base": "io", "concurrency": 3, "prefetch_multiplier": 2},
                     "three": {"pool": "prefork", "concurrency": 3, "prefetch_multiplier": 2},
                     "elastic": {"pool": "prefork", "autoscale": "3,1", "prefetch_multiplier": 1}},
    broker_connection_retry_on_startup=True,
)
celery_tuning.install(app)


@app.task
def ping():
    return "pong"
