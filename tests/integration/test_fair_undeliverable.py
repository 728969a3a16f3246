"""``@fair`` messages that can never be published, end to end (a real prefork worker, a real
redis-server): a task the worker's app does not have (a deploy removed it) and stored options
Celery refuses at publication. They must not hold the queue's window (the other calls run), are
set aside as undeliverable after their attempts (logged with task name and id, never arguments),
and ``purge`` drops them.
"""

from __future__ import annotations

import pytest

from celery_tuning.storage.fair import RedisFairStore
from celery_tuning.storage.redis import RedisConnector
from tests.support.apps import run_producer
from tests.support.fair import APP, fair_env, fair_runs, wait_for
from tests.support.workers import running_workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRODUCER = """
from kombu.utils.json import dumps
from celery_tuning import fair
from celery_tuning.integration.deferral import PAYLOAD_VERSION
from celery_tuning.integration.runtime import runtime_for
from celery_tuning.integration.steps.fair import fair_store
from celery_tuning.storage.keys import key_digest
from tests.apps.fair_app import app, work

# The previous deploy's task: the worker's app no longer has it.
@app.task(name="tests.apps.fair_app.gone", shared=False)
@fair(key=lambda tenant: tenant)
def gone(tenant):
    raise AssertionError("never runs")

for _ in range(2):
    gone.delay("SECRET-ARG")
# Stored by an older version that let expires="garbage" through: Celery refuses it at publication.
data = dict(work.signature(("SECRET-ARG",), {}, {"task_id": "poison-1", "expires": "garbage"}))
data["v"] = PAYLOAD_VERSION
fair_store(runtime_for(app)).add("fairq", "poison-1", key_digest("P"), dumps(data))
print(" ".join(work.delay("A").id for _ in range(5)))
"""


def test_calls_that_cannot_be_published_never_stall_the_queue_are_set_aside_and_purged(redis_clean):
    env = fair_env(redis_clean, TEST_FAIR_WINDOW="2", TEST_FAIR_ATTEMPTS="2")
    ids = set(run_producer(PRODUCER, redis_clean, env=env).split())
    store = RedisFairStore(RedisConnector(redis_clean.db_url(1)))
    with running_workers(APP, env, count=1, concurrency=2, prefix="undeliverable") as workers:
        # The three bad calls came first and a window of 2 would be theirs for good.
        wait_for(lambda: set(fair_runs(redis_clean, "work")) == ids, 15, "the 5 good calls")
        wait_for(lambda: store.snapshot("fairq").undeliverable == 3, 15, "the 3 bad calls set aside")
        log = workers[0].output()
    snap = store.snapshot("fairq")
    assert (snap.waiting, snap.claimed, snap.in_window) == (0, 0, 0)
    assert log.count("could not be published in 2 attempts") == 3, log[-3000:]
    assert "'tests.apps.fair_app.gone'" in log and "poison-1" in log
    assert "SECRET-ARG" not in log, "a task's arguments are never logged"
    assert store.purge("fairq") == 3
    assert store.snapshot("fairq").undeliverable == 0
