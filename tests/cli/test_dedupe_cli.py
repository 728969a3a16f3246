"""`celery -A proj tuning dedupe show|clear TASK` through the real celery command."""

import json
import os
import subprocess
import sys

import pytest

from tests.support.apps import run_producer, worker_env
from tests.support.workers import ROOT

pytestmark = pytest.mark.integration

TASK = "tests.apps.deduped.render"


def celery(redis_server, *args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **worker_env(redis_server)}
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.deduped:app", "tuning", "dedupe", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env, input=stdin)


def test_show_and_clear(redis_clean):
    holder = run_producer("from tests.apps.deduped import render\nr = render.delay(1)\n"
                          "assert render.delay(1).id == r.id\nprint(r.id, render.dedupe.key(1))\n", redis_clean)
    task_id, digest = holder.split()
    out = celery(redis_clean, "show", TASK)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{digest[:16]} {task_id} queued, age ")
    assert "deadline in 59" in out.stdout  # TEST_DEDUPE_TTL: 600 s
    refused = celery(redis_clean, "clear", TASK, stdin="n\n")
    assert refused.returncode == 1 and "Aborted" in refused.stderr
    shown = json.loads(celery(redis_clean, "show", TASK, "--json").stdout)  # still held
    assert [(lock["digest"], lock["holder"], lock["state"]) for lock in shown] == [(digest, task_id, "queued")]
    run_producer("from tests.apps.deduped import render\nrender.delay(2)\n", redis_clean)
    two = celery(redis_clean, "show", TASK, "--limit", "1").stdout.splitlines()
    assert len(two) == 2 and two[1].startswith("... more locks are held: the first 1"), two
    out = celery(redis_clean, "clear", TASK, "--yes")
    assert out.returncode == 0 and out.stdout.strip() == f"{TASK}: dropped 2 lock(s)"
    assert celery(redis_clean, "show", TASK).stdout.strip() == f"{TASK}: no locks held"


def test_errors_name_the_task(redis_clean):
    out = celery(redis_clean, "show", "no.such.task")
    assert out.returncode == 1 and "no task named 'no.such.task'" in out.stderr
    out = celery(redis_clean, "show", "celery.backend_cleanup")
    assert out.returncode == 1 and "has no @dedupe" in out.stderr
