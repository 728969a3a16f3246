"""Summaries of uploaded notes/PDFs, computed once per distinct content.

``@cache_result(key=content_hash)``: the cache key is the SHA-256 of the document bytes, so the
same file uploaded twice (or by two users) is summarised once; L1 serves repeats inside a worker
process, L2 (Redis) serves every other worker; ``summarize.cache.invalidate(...)`` drops one entry
everywhere, ``summarize.cache.clear()`` all of them (a new summariser model, say).
"""

from __future__ import annotations

import hashlib
import os
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import cache_result

REDIS = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/11")

app = Celery("notes", broker=REDIS, backend=REDIS, task_cls="celery_tuning:TunedTask")
app.conf.update(task_default_queue="notes", broker_connection_retry_on_startup=True,
                tuning_key_prefix="example-notes")
celery_tuning.install(app)
ledger = redis.Redis.from_url(REDIS)


def content_hash(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()


@app.task
@cache_result(ttl=7 * 24 * 3600, l1_ttl=300, key=content_hash)
def summarize(document: str) -> dict:
    ledger.incr("notes:summaries-computed")
    time.sleep(0.2)  # the expensive part: parsing, an LLM call...
    words = document.split()
    return {"words": len(words), "first": " ".join(words[:5])}
