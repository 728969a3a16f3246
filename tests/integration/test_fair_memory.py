"""``@fair`` on the memory store, end to end: ``tuning_redis_url="memory://"`` with a real in-process
worker (``celery.contrib.testing.worker.start_worker``), and the pytest plugin's ``tuning_memory``
under pytest-celery's session worker. Calls are released round-robin across keys and run once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Tuple

import pytest
from celery import Celery

import celery_tuning
from celery_tuning import fair
from tests.integration.test_pytest_plugin import SESSION_CONFTEST

pytestmark = [pytest.mark.integration]


def test_memory_store_releases_round_robin_to_an_in_process_worker_and_each_call_runs_once():
    from celery.contrib.testing.worker import start_worker

    app = Celery("fair_memory", broker="memory://", backend="cache+memory://", set_as_current=False,
                 task_cls="celery_tuning:TunedTask")
    app.conf.update(tuning_redis_url="memory://", tuning_fair_window=1,
                    broker_transport_options={"polling_interval": 0.05})
    celery_tuning.install(app)
    runs: List[Tuple[str, str]] = []

    @app.task(bind=True, name="fair_memory.sync", shared=False)
    @fair(key=lambda tenant, n: tenant)
    def sync(self: Any, tenant: str, n: int) -> int:
        runs.append((tenant, self.request.id))
        return n

    # Everything waits before the worker starts: A's backlog of 6 is ahead of B's 3.
    results = [sync.delay("A", i) for i in range(6)] + [sync.delay("B", i) for i in range(3)]
    assert not runs
    with start_worker(app, perform_ping_check=False, shutdown_timeout=10):
        values = [r.get(timeout=15, interval=0.05) for r in results]
    assert values == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert [tenant for tenant, _ in runs] == ["A", "B", "A", "B", "A", "B", "A", "A", "A"]
    assert sorted(i for _, i in runs) == sorted(r.id for r in results), "each call ran once, under its own id"


# SESSION_CONFTEST: pytest-celery's session app on memory://, installed, its worker importing "jobs".
JOBS = '''
from celery import shared_task
from celery_tuning import TunedTask, fair

RUNS = []


@shared_task(name="jobs.sync", base=TunedTask, bind=True)
@fair(key=lambda tenant, n: tenant)
def sync(self, tenant, n):
    RUNS.append((tenant, self.request.id))
    return n
'''

# The session worker (and its dispatcher) starts before each test's tuning_memory moves the app to
# new stores: the dispatcher must release from the stores the producers queue in now. The window is
# the worker's own capacity (solo pool, prefetch 4): A and B alternate while both wait.
TESTS = '''
import pytest
from jobs import RUNS, sync


@pytest.fixture(autouse=True)
def _runs():
    RUNS.clear()


def _round_robin():
    results = [sync.delay("A", i) for i in range(6)] + [sync.delay("B", i) for i in range(3)]
    assert [r.get(timeout=10, interval=0.05) for r in results] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert [tenant for tenant, _ in RUNS][:6] == ["A", "B"] * 3, RUNS
    assert sorted(i for _, i in RUNS) == sorted(r.id for r in results)


def test_fair_under_tuning_memory(tuning_memory, celery_session_worker):
    _round_robin()


def test_again_after_a_reset(tuning_memory, celery_session_worker):
    _round_robin()


def test_the_apps_own_memory_store(celery_session_worker):
    _round_robin()
'''


def test_fair_under_the_plugins_tuning_memory_with_the_session_worker(tmp_path: Path):
    (tmp_path / "conftest.py").write_text(SESSION_CONFTEST)
    (tmp_path / "jobs.py").write_text(JOBS)
    (tmp_path / "test_fair_jobs.py").write_text(TESTS)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("CELERY_TUNING_TEST_REDIS_URL", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                           "ignore::DeprecationWarning", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "3 passed" in proc.stdout, proc.stdout[-3000:]
