"""Tasks for the canvas matrix: one family per capability, each recording its runs in Redis.

``build()`` makes the app for a worker (URLs from the environment, ``app`` below) and for the
test process that sends canvases to it (the same task names). For each mode in :data:`MODES`:

* ``canvas.<mode>.step(x)`` returns ``x + 1`` and counts its runs (``runs:<mode>`` hash, by ``x``);
* ``canvas.<mode>.total(values)`` is a chord body: it records the values it got (``bodies:<mode>``);
* ``canvas.<mode>.boom(x)`` always raises ``ValueError``;
* ``canvas.<mode>.errback(task_id)`` counts the failed task ids it was called for;
* ``canvas.<mode>.replacer(x)`` (no policy) replaces itself with ``step(x)``.

Modes: ``cached`` (``short_circuit``), ``rate`` (a tiny shared rate, deferring), ``conc`` (one
slot cluster-wide, deferring), ``breaker`` (a shared breaker the test opens, re-publishing while
open). A run that came back from a deferral counts in ``deferred:<mode>``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List

import redis
from celery import Celery

import celery_tuning
from celery_tuning import cache_result, circuit_breaker, concurrency_limit, rate_limit
from celery_tuning.integration.deferral import deferrals_of

MODES = ("cached", "rate", "conc", "breaker")
#: Seconds the breaker stays open before its half-open trial.
BREAKER_RESET = 0.5
#: Seconds a process trusts its cached view of the breaker: short, so the test's open() is
#: seen by every worker process before its canvas runs.
BREAKER_REFRESH = 0.05

_DECORATORS: Dict[str, Callable[[Any], Any]] = {
    "cached": cache_result(ttl=120, l1_ttl=30, short_circuit=True),
    "rate": rate_limit("canvas-rate", on_limit="defer", max_defer=30),
    "conc": concurrency_limit("canvas-slot"),
    "breaker": circuit_breaker("canvas-breaker"),
}


def build(broker: str, backend: str, tuning: str) -> Celery:
    """The canvas app on these Redis URLs, with every family of tasks registered."""
    app = Celery("tests_canvas", broker=broker, backend=backend, task_cls="celery_tuning:TunedTask",
                 set_as_current=False)
    app.conf.update(
        tuning_redis_url=tuning,
        tuning_rate_limits={"canvas-rate": {"rate": "20/s", "burst": 1}},
        tuning_concurrency_limits={"canvas-slot": 1},
        tuning_concurrency_lease_ttl=5.0,
        tuning_circuit_breakers={"canvas-breaker": {"fail_max": 1, "reset_timeout": BREAKER_RESET}},
        tuning_breaker_refresh_interval=BREAKER_REFRESH,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_backend_transport_options={"retry_policy": {"max_retries": 1, "interval_start": 0,
                                                           "interval_step": 0.1, "interval_max": 0.1}},
    )
    celery_tuning.install(app)
    ledger = redis.Redis.from_url(tuning)
    for mode in MODES:
        _register(app, mode, ledger)
    return app


def _register(app: Celery, mode: str, ledger: redis.Redis) -> None:
    guard = _DECORATORS[mode]

    def ran(task: Any, x: Any) -> None:
        ledger.hincrby(f"runs:{mode}", str(x), 1)
        if deferrals_of(task.request):
            ledger.incr(f"deferred:{mode}")
        if mode == "conc":
            time.sleep(0.05)  # long enough for siblings to find the slot taken

    @app.task(name=f"canvas.{mode}.step", bind=True, max_retries=0, shared=False)
    @guard
    def step(self: Any, x: int) -> int:
        ran(self, x)
        return x + 1

    @app.task(name=f"canvas.{mode}.total", bind=True, max_retries=0, shared=False)
    @guard
    def total(self: Any, values: List[int]) -> int:
        ran(self, f"total:{min(values)}")
        ledger.rpush(f"bodies:{mode}", json.dumps(sorted(values)))
        return sum(values)

    @app.task(name=f"canvas.{mode}.boom", bind=True, max_retries=0, shared=False)
    @guard
    def boom(self: Any, x: int) -> int:
        ran(self, x)
        raise ValueError(f"boom {x}")

    @app.task(name=f"canvas.{mode}.replacer", bind=True, max_retries=0, shared=False)
    def replacer(self: Any, x: int) -> Any:
        return self.replace(step.s(x))  # the new signature takes this task's id

    @app.task(name=f"canvas.{mode}.errback", bind=True, max_retries=0, shared=False)
    @guard
    def errback(self: Any, task_id: str) -> str:
        ran(self, f"errback:{task_id}")
        ledger.hincrby(f"errbacks:{mode}", task_id, 1)
        return task_id


app = build(os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
            os.environ.get("TEST_BACKEND_URL", "redis://127.0.0.1:6379/0"),
            os.environ.get("TEST_TUNING_URL", "redis://127.0.0.1:6379/1"))
