"""Two queues in one worker, ``slow`` capped by tuning_queue_concurrency (TEST_SLOW_CAP, 0 = none).

Every task records when it ran in Redis (``caps:<queue>`` lists of ``start end`` pairs, wall
clock) so tests can check how many ran at once.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import celery_tuning

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
CAP = int(os.environ.get("TEST_SLOW_CAP", "1"))
SUFFIX = os.environ.get("TEST_QUEUE_SUFFIX", "")  # unique names on a shared RabbitMQ
SLOW, FAST = f"slow{SUFFIX}", f"fast{SUFFIX}"
app = Celery("tests_capped", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=os.environ.get("TEST_TUNING_URL", URL),
    tuning_queue_concurrency={SLOW: CAP} if CAP else {},
    task_routes={"tests.apps.capped.slow": {"queue": SLOW}, "tests.apps.capped.fast": {"queue": FAST}},
    broker_connection_retry_on_startup=True,
)
celery_tuning.install(app)
_log = redis.Redis.from_url(os.environ.get("TEST_TUNING_URL", URL))


def _record(queue: str, start: float, task_id: str) -> None:
    _log.rpush(f"caps:{queue}", f"{start} {time.time()} {task_id}")


@app.task(bind=True)
def slow(self, seconds=0.4):
    start = time.time()
    time.sleep(seconds)
    _record("slow", start, self.request.id)
    return "slow"


@app.task(bind=True)
def fast(self):
    start = time.time()
    time.sleep(0.01)
    _record("fast", start, self.request.id)
    return "fast"
