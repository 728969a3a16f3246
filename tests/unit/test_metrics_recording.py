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
m._on_timed(sender=task, task_id="c", queue="q", wait=50.0, run=0.05, total=50.1, state="FAILURE", clamped=False)
m.flush()
get = REGISTRY.get_sample_value
labels = {"task": "t.work", "queue": "q"}
print(get("celery_tuning_task_queue_wait_seconds_bucket", {**labels, "le": "1.0"}),
      get("celery_tuning_task_queue_wait_seconds_bucket", {**labels, "le": "0.25"}),
      get("celery_tuning_clock_skew_clamped_total", {"task": "t.work"}),
      get("celery_tuning_task_outcomes_total", {**labels, "state": "success"}),
      get("celery_tuning_task_queue_wait_seconds_bucket", {**labels, "le": "+Inf"}),
      get("celery_tuning_task_queue_wait_seconds_sum", labels))
"""

# Batched writes must leave exactly what one observe() per attempt leaves.
SAME_AS_OBSERVE = r"""
import random
from prometheus_client import REGISTRY, Histogram
from types import SimpleNamespace
from celery_tuning.integration import metrics as m
m.connect_metric_receivers()
reference = Histogram("reference_seconds", "x", ("task", "queue"), buckets=m.BUCKETS).labels("t", "q")
task = SimpleNamespace(name="t")
rng = random.Random(7)
for i in range(2000):
    value = rng.choice([0.0, 0.005, 0.01, 7200.0, 9000.0]) if i % 10 == 0 else rng.expovariate(0.5)
    m._on_timed(sender=task, task_id=str(i), queue="q", wait=value, run=value, total=value, state="SUCCESS")
    reference.observe(value)
    if i % 333 == 0:
        m.flush()
m.flush()
assert m.metrics().run.upper_bounds == m._state["bounds"] == (*m.BUCKETS[:-1], float("inf"))
for sample in [s for f in REGISTRY.collect() if f.name == "reference_seconds"
               for s in f.samples]:
    if sample.name.endswith("_created"):
        continue
    ours = sample.name.replace("reference_seconds", "celery_tuning_task_run_seconds")
    got = REGISTRY.get_sample_value(ours, sample.labels)
    assert got is not None and abs(got - sample.value) < 1e-6, (sample, got)
print("same")
"""


def test_batched_writes_equal_one_observe_per_attempt():
    out = subprocess.run([sys.executable, "-c", SAME_AS_OBSERVE], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "same", out.stderr


def test_configured_buckets_and_clamped_waits_are_recorded():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    # le="0.25" does not exist with buckets (0.1, 1, 10): the setting was applied
    assert out.stdout.split() == ["2.0", "None", "1.0", "2.0", "3.0", "50.5"], out.stderr


DEFERRED = r"""
from types import SimpleNamespace
from celery_tuning import events
from celery_tuning.integration import metrics as m
m.connect_metric_receivers()  # metrics on, timing receivers never connected (tuning_timing=False)
class Task:
    name, queue = "t.work", "q"
    request = SimpleNamespace(delivery_info={"routing_key": "q"})
task = Task()
for i in range(25_000):
    events.task_deferred(task, f"id-{i}", "rate_limit", 1.0, 1)
without_timing = len(m._deferred)
from celery_tuning.integration.receivers import connect_timing_receivers
connect_timing_receivers()  # timing on, but these attempts are never timed (no postrun here)
for i in range(25_000):
    events.task_deferred(task, f"id-{i}", "rate_limit", 1.0, 1)
print(without_timing, len(m._deferred))
"""


def test_deferred_attempts_are_not_kept_without_timing():
    """Only the timing receiver takes a task id back out of the deferred table: with timing off
    every deferral stayed in it for the life of the process."""
    out = subprocess.run([sys.executable, "-c", DEFERRED], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    without_timing, with_timing = map(int, out.stdout.split())
    assert without_timing == 0
    assert 0 < with_timing <= 10_000


PARKING = r"""
from prometheus_client import REGISTRY
from celery_tuning import events
from celery_tuning.integration import metrics as m
m.connect_metric_receivers()
events.task_parked("rate_limit", "openai")
events.task_parked("rate_limit", "openai")
events.task_unparked("rate_limit", "openai")
events.park_fallback("concurrency", "storage")
events.parked_count("rate_limit", "openai", 7)
events.parked_count("rate_limit", "openai", 3)
get = REGISTRY.get_sample_value
spot = {"reason": "rate_limit", "name": "openai"}
print(get("celery_tuning_parked_total", spot), get("celery_tuning_unparked_total", spot),
      get("celery_tuning_park_fallbacks_total", {"reason": "concurrency", "why": "storage"}),
      get("celery_tuning_parked_tasks", spot))
"""


def test_parking_events_feed_counters_and_the_parked_gauge():
    out = subprocess.run([sys.executable, "-c", PARKING], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["2.0", "1.0", "1.0", "3.0"]
