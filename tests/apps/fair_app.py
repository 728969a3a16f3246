"""An app with ``@fair`` tasks; every run is recorded in the ledger Redis so tests can count runs per
task id (``runs:<task>`` hash: id -> runs) and time them (``done:<task>`` list of JSON lines).

``TEST_FAIR_KILL_AFTER=n`` makes this process's dispatcher SIGKILL its own worker right after
publishing its n-th message, before acknowledging it: the crash the claim/ack protocol covers.
"""

from __future__ import annotations

import json
import os
import signal
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import concurrency_limit, fair
from celery_tuning.integration.steps.fair import HEADER_FAIR

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
TUNING = os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1")
app = Celery("tests_fair", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=TUNING,
    tuning_park_claim_ttl=float(os.environ.get("TEST_CLAIM_TTL", "30")),
    tuning_park_ticket_ttl=float(os.environ.get("TEST_TICKET_TTL", "86400")),
    tuning_park_mover=os.environ.get("TEST_NO_MOVER") != "1",
    tuning_concurrency_lease_ttl=3.0,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_default_queue="fairq",
)
if os.environ.get("TEST_NO_MISSING_QUEUES") == "1":
    app.conf.task_create_missing_queues = False
if os.environ.get("TEST_FAIR_WINDOW"):
    app.conf.tuning_fair_window = int(os.environ["TEST_FAIR_WINDOW"])
celery_tuning.install(app)
ledger = redis.Redis.from_url(os.environ.get("TEST_LEDGER_URL", TUNING))


def _released(request) -> bool:
    """Whether the run came through the dispatcher (its message carries the fair ticket)."""
    headers = getattr(request, "headers", None) or {}
    return HEADER_FAIR in headers or getattr(request, HEADER_FAIR, None) is not None


def _record(task: str, request, tenant: str, start: float) -> None:
    pipe = ledger.pipeline()
    pipe.hincrby(f"runs:{task}", request.id, 1)
    pipe.rpush(f"done:{task}", json.dumps({"id": request.id, "tenant": tenant, "start": start, "end": time.time(),
                                           "released": _released(request)}))
    pipe.execute()


@app.task(bind=True)
@fair(key=lambda tenant, **kw: tenant)
def work(self, tenant, seconds=0.01):
    start = time.time()
    time.sleep(seconds)
    _record("work", self.request, tenant, start)


@app.task(bind=True)
@fair(key=lambda tenant, **kw: tenant, weights={"gold": 3})
def weighted(self, tenant, seconds=0.01):
    start = time.time()
    time.sleep(seconds)
    _record("weighted", self.request, tenant, start)


@app.task(bind=True)
@fair(key=lambda tenant, **kw: tenant)
@concurrency_limit(limit=2, key=lambda tenant, **kw: tenant)
def capped(self, tenant, seconds=0.3):
    start = time.time()
    ledger.incr(f"running:{tenant}")
    ledger.rpush(f"peak:{tenant}", int(ledger.get(f"running:{tenant}") or 0))
    time.sleep(seconds)
    ledger.decr(f"running:{tenant}")
    _record("capped", self.request, tenant, start)


@app.task(bind=True, queue="fairq2")
@fair(key=lambda tenant, **kw: tenant)
def elsewhere(self, tenant, seconds=0.01):
    """Routed by its decorator's ``queue=``: a worker consuming fairq2 only runs it."""
    start = time.time()
    time.sleep(seconds)
    _record("elsewhere", self.request, tenant, start)


@app.task(bind=True)
@fair(key=lambda tenant, n: tenant)
def pager(self, tenant, n):
    """Replaces itself with its next page (a fair call made from inside a fair task) until n is 0."""
    _record("pager", self.request, tenant, time.time())
    if n > 0:
        raise self.replace(pager.si(tenant, n - 1))
    return f"{tenant} done"


_KILL_AFTER = int(os.environ.get("TEST_FAIR_KILL_AFTER", "0") or 0)
if _KILL_AFTER:
    from celery_tuning.integration.steps.fair import FairMoving

    _publish = FairMoving.publish
    _count = [0]

    def _publish_then_die(self, queue, entry, producer=None):
        result = _publish(self, queue, entry, producer=producer)
        _count[0] += 1
        if _count[0] >= _KILL_AFTER:
            ledger.set("killed_after", _count[0])
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    FairMoving.publish = _publish_then_die  # type: ignore[method-assign]


if os.environ.get("TEST_FAIR_ATTEMPTS"):
    # Set aside a message that cannot be published after this many claims (1 s apart), not 5.
    from celery_tuning.integration.steps import fair as _fair_step

    _fair_step.PUBLISH_ATTEMPTS = int(os.environ["TEST_FAIR_ATTEMPTS"])
    _fair_step.FOREIGN_ATTEMPTS = int(os.environ.get("TEST_FAIR_FOREIGN_ATTEMPTS", os.environ["TEST_FAIR_ATTEMPTS"]))
