"""The README's demo command runs end to end (against the tests' private redis-server)."""

import os
import subprocess
import sys

import pytest

from tests.support.workers import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_and_shows_each_capability(redis_clean):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_clean.url}
    out = subprocess.run([sys.executable, "-m", "examples.demo"], capture_output=True, text=True, timeout=240,
                         cwd=str(ROOT), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "SLA breaches: 2" in text
    assert "on 2 workers" in text and "retries used: 0" in text
    assert "3 orders failed; breaker is now open" in text
    assert "0 reached the API; 5 were deferred" in text
    assert "closed the breaker (closed); all 5 orders charged" in text
    assert "the body ran 1 time(s) (single flight)" in text
    assert "demo finished: every task ran exactly once" in text


def test_demo_starts_a_private_redis_when_none_answers(fault_redis):
    fault_redis.stop()  # nothing answers on this port now
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": f"redis://:pw@127.0.0.1:{fault_redis.port}"}
    out = subprocess.run([sys.executable, "-m", "examples.demo"], capture_output=True, text=True, timeout=240,
                         cwd=str(ROOT), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "started a private redis-server" in out.stdout
    assert "stopped the private redis-server" in out.stdout
    assert "pw@" not in out.stdout
