"""``@fair`` without I/O: which queue a call waits in (as Celery would route it), what its payload
keeps of a relative ``expires=``, which calls pass straight through, how a worker registers its
capacity."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import QueueNotFound

from celery_tuning.integration.steps import fair as fair_step
from celery_tuning.integration.steps.fair import FairStep, _replacing, consumer_capacity, queue_of


def _app(**conf: Any) -> Celery:
    app = Celery("fair_routing", broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue="default", **conf)
    return app


def _task(app: Celery, name: str, **options: Any) -> Any:
    def run(x: Any = None) -> Any:
        return x

    return app.task(name=name, shared=False, **options)(run)


def test_the_queue_is_the_calls_then_the_tasks_own_then_the_routes_then_the_default():
    app = _app(task_routes={"routed": {"queue": "by-route"}})
    own = _task(app, "own", queue="by-task")
    routed = _task(app, "routed")
    plain = _task(app, "plain")
    assert queue_of(own, {}, (), {}) == "by-task"
    assert queue_of(own, {"queue": "by-call"}, (), {}) == "by-call"
    assert queue_of(routed, {}, (), {}) == "by-route"
    assert queue_of(plain, {}, (), {}) == "default"


def test_an_unknown_queue_raises_when_celery_would_not_create_it():
    app = _app(task_create_missing_queues=False)
    task = _task(app, "t")
    with pytest.raises(QueueNotFound):
        queue_of(task, {"queue": "nosuchqueue"}, (), {})
    assert queue_of(task, {}, (), {}) == "default"


def test_a_replacement_is_recognised_by_its_nesting_or_by_the_running_tasks_id():
    app = _app()
    task = _task(app, "t")
    assert _replacing(task, {"replaced_task_nesting": 1}, "x")
    assert not _replacing(task, {}, "x"), "no task runs in this process"


def test_a_relative_expires_is_stored_as_an_absolute_utc_time():
    app = _app(task_serializer="json")
    task = _task(app, "t", expires=120)
    pctx = SimpleNamespace(task=task, args=(1,), kwargs={}, options={"expires": 60})
    step = FairStep.__new__(FairStep)
    before = datetime.now(timezone.utc)
    payload = json.loads(step._payload(pctx, "id-1"))
    expires = datetime.fromisoformat(payload["options"]["expires"])
    assert expires.tzinfo is not None and 59 <= (expires - before).total_seconds() <= 61
    pctx.options = {}  # the task's own expires=120
    expires = datetime.fromisoformat(json.loads(step._payload(pctx, "id-2"))["options"]["expires"])
    assert 119 <= (expires - before).total_seconds() <= 121


@pytest.mark.parametrize("expires, error", [("garbage", ValueError), ([1], TypeError)])
def test_an_expires_celery_would_refuse_at_the_call_is_refused_at_the_call(expires, error):
    # Stored, it could never be published: Celery refuses it when the dispatcher publishes it.
    app = _app(task_serializer="json")
    task = _task(app, "t")
    pctx = SimpleNamespace(task=task, args=(1,), kwargs={}, options={"expires": expires})
    with pytest.raises(error):
        app.send_task("t", (1,), expires=expires)  # what a plain call raises
    with pytest.raises(error):
        FairStep.__new__(FairStep)._payload(pctx, "id-1")


def test_an_iso_or_datetime_expires_is_stored_as_iso():
    app = _app(task_serializer="json")
    task = _task(app, "t")
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    for given in (at, at.isoformat()):
        pctx = SimpleNamespace(task=task, args=(1,), kwargs={}, options={"expires": given})
        payload = json.loads(FairStep.__new__(FairStep)._payload(pctx, "id-1"))
        assert datetime.fromisoformat(payload["options"]["expires"]) == at


def test_a_worker_registers_under_its_node_name_and_pid_with_its_own_prefetch_multiplier(monkeypatch):
    app = _app(worker_prefetch_multiplier=4)
    worker = SimpleNamespace(app=app, hostname="w1@host", concurrency=3, prefetch_multiplier=2)
    monkeypatch.setitem(fair_step._workers, app, worker)
    node, capacity, queues = consumer_capacity(app)
    assert node == f"w1@host:{os.getpid()}"
    assert capacity == 6, "--prefetch-multiplier 2, not the app's 4"
    assert "default" in queues


def test_a_message_of_a_task_this_app_lacks_gets_many_more_claims_than_one_that_failed_to_publish():
    """Two apps sharing a queue and prefix: this app's dispatchers may claim the other's call
    several times in a row; set aside after 5 claims, 4 of 20 such calls never ran (review)."""
    from types import SimpleNamespace

    from celery_tuning.integration.steps import fair as step
    from celery_tuning.storage.fair import FairReleased

    seen = []

    class Store:
        def reject(self, queue, msg_id, pub, rest_us, attempts):
            seen.append(attempts)
            return 1

    moving = step.FairMoving(SimpleNamespace(claim_ttl_us=30_000_000, app=None, runtime=None))
    entry = FairReleased("m1", "{}", 3, "d")
    moving._reject(Store(), "q", entry, step.NO_SUCH_TASK)
    moving._reject(Store(), "q", entry, "ValueError: bad option")
    assert seen == [step.FOREIGN_ATTEMPTS, step.PUBLISH_ATTEMPTS]
    assert step.FOREIGN_ATTEMPTS >= 50 > step.PUBLISH_ATTEMPTS
