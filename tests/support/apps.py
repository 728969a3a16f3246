"""Helpers shared by integration tests: a tuned app on the private Redis, a producer process."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Optional

from celery import Celery

import celery_tuning
from tests.support.workers import QUICK_BACKEND_RETRY, ROOT


def make_app(redis_server: Any, name: str, tuning_url: Optional[str] = None, **conf: Any) -> Celery:
    """A Celery app on the test's redis-server (broker and results db 0, tuning db 1), installed."""
    app = Celery(name, set_as_current=False, broker=redis_server.db_url(0), backend=redis_server.db_url(0),
                 task_cls="celery_tuning:TunedTask")
    app.conf.update(tuning_redis_url=tuning_url or redis_server.db_url(1), broker_connection_retry_on_startup=True,
                    result_backend_transport_options=QUICK_BACKEND_RETRY, **conf)
    celery_tuning.install(app)
    return app


def worker_env(redis_server: Any) -> dict:
    """Environment for the apps in tests/apps: broker db 0, tuning db 1."""
    return {"TEST_BROKER_URL": redis_server.db_url(0), "TEST_BACKEND_URL": redis_server.db_url(0),
            "TEST_TUNING_URL": redis_server.db_url(1)}


def run_producer(code: str, redis_server: Any, timeout: float = 120, env: Optional[dict] = None) -> str:
    """Run ``code`` in a fresh Python process (a producer that never starts a worker); its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **worker_env(redis_server), **(env or {})}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                         cwd=str(ROOT), env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
