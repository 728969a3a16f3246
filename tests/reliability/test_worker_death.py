"""SIGKILL a worker while its task holds a concurrency lease, a cache lock and a half-open trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.apps import run_producer
from tests.support.workers import ROOT, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]


def show_breaker(env):
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.reliable:app", "tuning", "breaker",
                          "show", "doomed-api"], capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env)
    return out.stdout + out.stderr


def test_everything_a_killed_worker_held_comes_back_by_ttl(redis_clean):
    env = {"TEST_BROKER_URL": redis_clean.db_url(0), "TEST_TUNING_URL": redis_clean.db_url(1)}
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    tuning = redis_clean.client(1)
    opened = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.reliable:app", "tuning", "breaker",
                             "open", "doomed-api"], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                            env=full_env)
    assert opened.returncode == 0, opened.stderr
    time.sleep(0.6)  # past reset_timeout: the next call is the one half-open trial
    doomed = WorkerProcess("tests.apps.reliable:app", env, pool="prefork", concurrency=1, name="doomed")
    survivor = WorkerProcess("tests.apps.reliable:app", env, pool="prefork", concurrency=1, name="survivor")
    try:
        doomed.start()
        run_producer("from tests.apps.reliable import holder\nholder.delay('x')\n", redis_clean, env=env)
        deadline = time.monotonic() + 30
        while redis_clean.client(0).get("holder:x") is None:
            assert time.monotonic() < deadline, doomed.output()[-3000:]
            time.sleep(0.05)
        held = [k.decode() for k in tuning.keys("*")]
        assert any(k.endswith(":lock") and ":cache:" in k for k in held), held  # single-flight lock
        assert any("one-slot" in k for k in held), held  # the concurrency lease
        during = show_breaker(full_env)
        assert "half-open" in during, during  # the hung task is the one half-open trial
        os.killpg(doomed.proc.pid, signal.SIGKILL)  # nothing is released on the way out
        killed_at = time.monotonic()
        survivor.start()
        out = run_producer("from tests.apps.reliable import holder\nprint(holder.delay('x').get(timeout=60))\n",
                           redis_clean, env=env)
        recovered = time.monotonic() - killed_at
        state = show_breaker(full_env)
    finally:
        doomed.close()
        survivor.close()
    assert out == "x"
    assert int(redis_clean.client(0).get("holder:x")) == 2  # the follower ran it after the lock expired
    assert recovered < 20, recovered  # lock 2 s, trial 2 s, lease 2 s: bounded, nobody waits forever
    assert "closed" in state, state  # the survivor's trial succeeded and closed it
    print(f"worker death: the killed worker's lock, trial and lease were taken over {recovered:.1f} s later")
