"""Metric recording in a single process (threads/solo pools): buckets setting and skew counter."""

import subprocess
import sys

CODE = r"""
from types import SimpleNamespace
from prometheus_client import REGISTRY
from celery_tuning.integration import metrics as m
m.connect_metric_receivers((0.1, 1.0, 10.0))
task = SimpleNamespace(name="t.work")
m._on_timed(sender=task, task_id="a", queue="q", wait=0.5, run=0.05, total=0.6, state="SUCCESS", clamped=False)
m._on_timed(sender=task, task_id="b", queue="q", wait=0.0, run=0.05, total=0.1, state="SUCCESS", clamped=True)
get = REGISTRY.get_sample_value
labels = {"task": "t.work", "queue": "q"}
print(get("celery_tuning_task_queue_wait_seconds_bucket", {**labels, "le": "1.0"}),
      get("celery_tuning_task_queue_wait_seconds_bucket", {**labels, "le": "0.25"}),
      get("celery_tuning_clock_skew_clamped_total", {"task": "t.work"}),
      get("celery_tuning_task_outcomes_total", {**labels, "state": "success"}))
"""


def test_configured_buckets_and_clamped_waits_are_recorded():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    # le="0.25" does not exist with buckets (0.1, 1, 10): the setting was applied
    assert out.stdout.split() == ["2.0", "None", "1.0", "2.0"], out.stderr
