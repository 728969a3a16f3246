"""Every example runs with one command against the tests' private redis-server (smoke tests)."""

import os
import re
import subprocess
import sys

import pytest

from tests.support.workers import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_example(name, redis_server):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_server.url}
    out = subprocess.run([sys.executable, "-m", f"examples.{name}"], capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_embeddings_pipeline_makes_zero_429s(redis_clean):
    text = run_example("embeddings", redis_clean)
    assert "provider: 100 requests served, 0 answered 429" in text
    assert "20 tasks made no request" in text


def test_payments_breaker_charges_every_order_once(redis_clean):
    text = run_example("payments", redis_clean)
    assert "all paid after" in text and "breaker now closed" in text
    assert "orders charged twice: 0" in text
    reached = int(re.search(r"while it was down: (\d+)", text).group(1))
    assert reached < 20  # the open breaker turned most calls away


def test_webhooks_hold_their_rate_and_use_the_io_profile(redis_clean):
    text = run_example("webhooks", redis_clean)
    rate = float(re.search(r"steady rate ([\d.]+)/s", text).group(1))
    assert 40 <= rate <= 55, text
    assert "celery-tuning profile 'io'" in text and "pool='threads'" in text
    assert "SLA breaches logged: 0" in text


def test_notes_are_summarised_once_per_content(redis_clean):
    text = run_example("notes", redis_clean)
    assert "6 summaries computed, 54 served from the cache" in text
    assert "computed it once more: 1" in text


def test_django_project_configures_tuning_through_celery_tuning_settings(redis_clean):
    text = run_example("django_shop", redis_clean)
    assert "30 labels in" in text
    assert "tuning_key_prefix                 'example-django'  (config)" in text
    elapsed = float(re.search(r"30 labels in ([\d.]+) s", text).group(1))
    assert elapsed >= 2.5  # 30 calls at a shared 10/s with a burst of 2
