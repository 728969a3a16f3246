"""An app whose deferrals park (``tuning_defer_via`` from TEST_DEFER_VIA, default "park").

Every task records its runs in the tuning Redis (``runs`` per task id, start/end times per task)
so tests can prove exactly-once and measure pacing and hand-over gaps.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import celery_tuning
from celery_tuning import circuit_breaker, concurrency_limit, rate_limit
from celery_tuning.integration.deferral import deferrals_of

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
TUNING = os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1")
app = Celery("tests_parked", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=TUNING,
    tuning_defer_via=os.environ.get("TEST_DEFER_VIA", "park"),
    tuning_park_claim_ttl=float(os.environ.get("TEST_CLAIM_TTL", "30")),
    tuning_park_mover=os.environ.get("TEST_PARK_MOVER", "1"),
    tuning_rate_limits={"paced": {"rate": "20/s", "burst": 1}},
    tuning_circuit_breakers={"flaky": {"fail_max": 1, "reset_timeout": 1.0}},
    tuning_concurrency_limits={"solo": 1, "solo_plain": 1},
    tuning_concurrency_lease_ttl=5.0,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    accept_content=["json", "pickle"] if os.environ.get("TEST_ACCEPT_PICKLE") else ["json"],
)
if os.environ.get("TEST_TOPIC"):
    from kombu import Exchange, Queue

    # A queue bound to a topic exchange by a wildcard: a call routed there by a key such as
    # orders.eu.1 must come back to it after a deferral.
    app.conf.task_queues = [Queue("celery"), Queue("qt", Exchange("tx", type="topic"), routing_key="orders.#")]
if os.environ.get("TEST_ACKS_LATE"):
    # Redelivery after a worker death, quickly: the Redis broker restores unacked messages older
    # than the visibility timeout.
    app.conf.task_acks_late = True
    app.conf.broker_transport_options = {"visibility_timeout": float(os.environ.get("TEST_VISIBILITY", "2")),
                                         "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
celery_tuning.install(app)
ledger = redis.Redis.from_url(os.environ.get("TEST_LEDGER_URL", TUNING))

if os.environ.get("TEST_KILL_ON_DEFER"):
    import signal

    from celery_tuning.signals import task_deferred

    @task_deferred.connect(weak=False)
    def _die_after_parking(sender=None, **_):
        """SIGKILL the worker (main process and child) right after the first deferral parked,
        before Celery acknowledges the message."""
        if ledger.set("killed_after_parking", 1, nx=True):
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def _ran(task_id: str) -> None:
    ledger.hincrby("runs", task_id, 1)


@app.task(bind=True, max_retries=0)
@rate_limit("paced", max_wait=0.0, on_limit="defer")
def paced(self, i):
    """Runs at the limiter's pace; records when."""
    _ran(self.request.id)
    ledger.rpush("paced_times", time.time())
    return {"i": i, "deferrals": deferrals_of(self.request)}


if not TUNING.startswith("redis+cluster://"):  # stacked limits are refused on a Cluster
    @app.task(bind=True, max_retries=0)
    @rate_limit("paced", max_wait=0.0, on_limit="defer")
    @rate_limit("10/s", burst=1, key=lambda i, tenant="t": tenant, max_wait=0.0, on_limit="defer")
    def stacked(self, i, tenant="t"):
        """Two stacked limits: the shared 20/s and a per-tenant 10/s; parks at the first one's spot."""
        _ran(self.request.id)
        ledger.rpush(f"stacked_times:{tenant}", time.time())
        return i


@app.task(bind=True, max_retries=0, acks_late=True)  # acks_late: its woken waiters may stand by
@concurrency_limit("solo")
def solo(self, i, seconds=0.2):
    """One at a time across every worker; records start and end."""
    start = time.time()
    time.sleep(seconds)
    _ran(self.request.id)
    # When it first parked (µs; 0 when it never waited): waiters are woken in this order.
    seq = getattr(self.request, "tuning_park_seq", None) or (self.request.headers or {}).get("tuning_park_seq") or 0
    # Whether it held on as the limit's standby (1) or got its slot through a mover (0).
    standby = int(bool(getattr(self.request, "tuning_standby", False)))
    ledger.rpush("solo_spans", f"{i} {start} {time.time()} {seq} {standby}")
    return i


@app.task(bind=True, max_retries=0)  # not acks_late: its woken waiters cannot stand by
@concurrency_limit("solo_plain")
def plain_solo(self, i, seconds=0.2):
    """One at a time; returns how many times it was deferred (counted or free) before it ran."""
    time.sleep(seconds)
    _ran(self.request.id)

    def header(name):
        return int(getattr(self.request, name, None) or (self.request.headers or {}).get(name) or 0)

    return [i, header("tuning_deferrals") + header("tuning_free_deferrals")]


@app.task(bind=True, max_retries=0, track_started=True)
@circuit_breaker("flaky", on_open="retry")
def guarded(self, i):
    """Fails while the 'fail' flag is set (opening the breaker); runs once it is reset."""
    if ledger.get("fail"):
        raise RuntimeError("provider down")
    _ran(self.request.id)
    ledger.rpush("guarded_times", time.time())
    return i


@app.task(bind=True, max_retries=0)
@rate_limit("paced", max_wait=0.0, on_limit="defer")
def add(self, x, y):
    _ran(self.request.id)
    return x + y


@app.task(bind=True)
def total(self, values):
    _ran(self.request.id)
    return sum(values)


@app.task(bind=True, max_retries=0)
@rate_limit("paced", max_wait=0.0, on_limit="defer")
def blob(self, payload):
    """Takes what the test publishes (with the pickle serializer: tuples, int keys); says what it got."""
    _ran(self.request.id)
    return repr(payload)
