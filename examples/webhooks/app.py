"""Webhook ingest: deliver customer webhooks at most 50/s, with SLA alerts and the io profile.

* ``tuning_rate_limits["webhooks-out"]``: 50 deliveries a second across every worker.
* ``tuning_sla["webhooks"]``: a warning after 10 s from publish to delivery, critical after 30 s;
  breaches log a line, count in metrics and send ``celery_tuning.signals.sla_breached``.
* ``tuning_queue_profiles["webhooks"] = "io"``: a worker started with ``-Q webhooks`` runs 32
  threads with prefetch 4: deliveries mostly wait on the network.
"""

from __future__ import annotations

import json
import os
import urllib.request

from celery import Celery

import celery_tuning
from celery_tuning import rate_limit

REDIS = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/12")
RECEIVER = os.environ.get("WEBHOOK_RECEIVER_URL", "http://127.0.0.1:8002")

app = Celery("webhooks", broker=REDIS, backend=REDIS, task_cls="celery_tuning:TunedTask")
app.conf.update(
    task_default_queue="webhooks",
    broker_connection_retry_on_startup=True,
    tuning_key_prefix="example-webhooks",
    tuning_rate_limits={"webhooks-out": {"rate": "50/s", "burst": 5}},
    tuning_sla={"webhooks": {"warning": 10, "critical": 30, "on": "total"}},
    tuning_queue_profiles={"webhooks": "io"},
)
celery_tuning.install(app)


@app.task(autoretry_for=(OSError,), max_retries=5, retry_backoff=True)
@rate_limit("webhooks-out")
def deliver(event: dict) -> int:
    request = urllib.request.Request(f"{RECEIVER}/hooks", data=json.dumps(event).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)
