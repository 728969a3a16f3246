"""`celery -A proj tuning ...` through the real celery command and its entry point."""

import re
import subprocess
import sys

import pytest

from tests.support.workers import ROOT

pytestmark = pytest.mark.integration


def celery(*args, env):
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.basic:app", "tuning", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env)


def make_env(tuning_url, monkeypatch_env=None):
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "TEST_BROKER_URL": tuning_url,
            "TEST_TUNING_URL": tuning_url, "TEST_BACKEND_URL": tuning_url}


def test_check_ok(redis_clean):
    out = celery("check", env=make_env(redis_clean.db_url(1)))
    assert out.returncode == 0, out.stderr
    assert "settings: ok" in out.stdout
    assert "lua: scripts load" in out.stdout


def test_check_unreachable_redis_redacts_password(fault_redis):
    url = f"redis://:hunter2@127.0.0.1:{fault_redis.port}/1"
    fault_redis.stop()
    out = celery("check", env=make_env(url))
    assert out.returncode == 1
    assert "unreachable" in out.stderr
    assert "hunter2" not in out.stdout + out.stderr


def test_status_shows_sources_and_redacted_url(redis_clean):
    url = redis_clean.db_url(1).replace("redis://", "redis://:pw123@")
    env = make_env(redis_clean.db_url(1))
    env["TEST_TUNING_URL"] = url
    out = celery("status", env=env)
    assert out.returncode == 0, out.stderr
    assert "tuning_sla" in out.stdout and "(config)" in out.stdout
    assert re.search(r"^tuning_key_prefix +'tuning'  \(default\)$", out.stdout, re.M)
    assert "pw123" not in out.stdout


def test_listed_in_celery_help():
    out = subprocess.run([sys.executable, "-m", "celery", "--help"], capture_output=True, text=True, timeout=60)
    assert "tuning" in out.stdout
