"""An LLM-embedding pipeline: a provider API allowing 20 requests/s shared by every worker.

* ``tuning_rate_limits["embeddings-api"]``: one 20/s bucket for all workers and processes.
* ``Throttled``: if the provider still answers 429, its Retry-After pauses every worker.
* ``@cache_result`` keyed by the text's SHA-256: the same text is embedded once.
* ``tuning_queue_profiles``: workers consuming ``embeddings`` get the ``cpu`` profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request

from celery import Celery

import celery_tuning
from celery_tuning import Throttled, cache_result, rate_limit

REDIS = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/14")
API = os.environ.get("EMBEDDINGS_API_URL", "http://127.0.0.1:8000")

app = Celery("embeddings", broker=REDIS, backend=REDIS, task_cls="celery_tuning:TunedTask")
app.conf.update(
    task_default_queue="embeddings",
    broker_connection_retry_on_startup=True,
    tuning_key_prefix="example-embeddings",
    tuning_rate_limits={"embeddings-api": {"rate": "20/s", "burst": 2}},
    tuning_queue_profiles={"embeddings": "cpu"},
)
celery_tuning.install(app)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@app.task(bind=True, max_retries=3)
@cache_result(ttl=24 * 3600, key=text_key)
@rate_limit("embeddings-api")
def embed(self, text: str) -> list:
    request = urllib.request.Request(f"{API}/v1/embeddings", data=json.dumps({"input": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return list(json.loads(response.read())["embedding"])
    except urllib.error.HTTPError as exc:
        if exc.code == 429:  # the provider's own limit: pause everyone, retry this one later
            raise Throttled(retry_after=float(exc.headers.get("Retry-After") or 1)) from None
        raise
