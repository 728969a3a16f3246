"""A payments task behind a shared circuit breaker.

When the payment provider fails, 3 failures in a row open ``payments`` for every worker: later
charges do not hammer the provider, they are deferred (without spending their retries) until one
trial call finds it healthy again and closes the breaker.
"""

from __future__ import annotations

import json
import os
import urllib.request

from celery import Celery

import celery_tuning
from celery_tuning import circuit_breaker

REDIS = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/13")
API = os.environ.get("PAYMENTS_API_URL", "http://127.0.0.1:8001")

app = Celery("payments", broker=REDIS, backend=REDIS, task_cls="celery_tuning:TunedTask")
app.conf.update(
    task_default_queue="payments",
    broker_connection_retry_on_startup=True,
    tuning_key_prefix="example-payments",
    tuning_circuit_breakers={"payments": {"fail_max": 3, "reset_timeout": 2}},
)
celery_tuning.install(app)


# autoretry_for retries a failed call (the breaker saw the OSError first and counted it); once
# the breaker is open, calls are deferred until it lets one through, without spending retries.
@app.task(autoretry_for=(OSError,), max_retries=5, default_retry_delay=0.3)
@circuit_breaker("payments")
def charge(order: int, cents: int) -> dict:
    request = urllib.request.Request(f"{API}/charges", data=json.dumps({"order": order, "cents": cents}).encode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return dict(json.loads(response.read()))
