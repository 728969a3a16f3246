"""memory:// as the default tuning store on a memory:// broker, and start_worker failing loudly (#20)."""

from __future__ import annotations

import logging
import socket
import threading

import pytest
from celery import Celery

import celery_tuning
from celery_tuning.errors import ConfigurationError
from celery_tuning.integration.runtime import runtime_for


def _app(**conf):
    app = Celery("plugin-unit", broker="memory://", backend="cache+memory://", set_as_current=False,
                 task_cls="celery_tuning:TunedTask")
    app.conf.update(conf)
    celery_tuning.install(app)
    return app


def test_memory_broker_without_tuning_redis_url_uses_memory_with_one_warning(caplog):
    app = _app(tuning_rate_limits={"a": "1/m"})
    with caplog.at_level(logging.WARNING, logger="celery_tuning"):
        runtime = runtime_for(app)
        assert runtime.redis_url == "memory://"
        assert runtime.in_memory
        limiter = celery_tuning.limiter("a", app)
        assert limiter.try_acquire() and not limiter.try_acquire()  # state kept in this process
        _ = runtime.redis_url
    warnings = [r for r in caplog.records if "memory://" in r.getMessage()]
    assert len(warnings) == 1
    with pytest.raises(ConfigurationError, match="memory://"):
        _ = runtime.connector


def test_start_worker_raises_instead_of_hanging_when_tuning_cannot_start():
    from celery.contrib.testing.worker import start_worker

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    app = _app(tuning_metrics_port=busy.getsockname()[1], tuning_metrics_address="127.0.0.1")
    outcome = []

    def run():
        try:
            with start_worker(app, perform_ping_check=False, shutdown_timeout=5):
                outcome.append("started")
        except BaseException as exc:  # what start_worker raised is the result
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    busy.close()
    assert outcome, "start_worker hung on a worker that could not start"
    assert isinstance(outcome[0], ConfigurationError), outcome
    assert "tuning_metrics_port" in str(outcome[0])


def test_resetting_the_stores_forgets_every_limiter_a_step_built_stacked_ones_too():
    """tuning_memory starts each test from empty stores: a stacked @rate_limit keeps its limiters
    in its own attribute, which the reset missed (the next test saw the last test's buckets)."""
    from celery_tuning import RateLimited, rate_limit

    app = _app(tuning_redis_url="memory://")

    @app.task(name="plugin.stacked", shared=False)
    @rate_limit("1/m", on_limit="raise")
    @rate_limit("2/m", on_limit="raise")
    def stacked():
        return "ran"

    assert stacked.apply().get() == "ran"
    with pytest.raises(RateLimited):
        stacked.apply().get()
    runtime_for(app).reset_stores()
    assert stacked.apply().get() == "ran", "the bucket of the earlier test is gone"
