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
from celery import Celery
from celery_tuning import events
from celery_tuning.integration import metrics as m
m.connect_metric_receivers()  # metrics on, timing receivers never connected (tuning_timing=False)
class Task:
    name, queue = "t.work", "q"
    app = Celery("deferring", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = "q"
    request = SimpleNamespace(delivery_info={"routing_key": "q"})
task = Task()
for i in range(25_000):
    events.task_deferred(task, f"id-{i}", "rate_limit", 1.0, 1)
without_timing = len(m._deferred)
from celery_tuning.integration.receivers import connect_timing_receivers
connect_timing_receivers()  # timing on, but these attempts are never timed (no postrun here)
for i in range(25_000):
    events.task_deferred(task, f"id-{i}", "rate_limit", 1.0, 1)
from prometheus_client import REGISTRY
counted = REGISTRY.get_sample_value("celery_tuning_task_outcomes_total",
                                    {"task": "t.work", "queue": "q", "state": "deferred"})
print(without_timing, len(m._deferred), counted)
"""


def test_deferred_attempts_are_not_kept_without_timing():
    """Only the timing receiver takes a task id back out of the deferred table: with timing off
    every deferral stayed in it for the life of the process."""
    out = subprocess.run([sys.executable, "-c", DEFERRED], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    without_timing, with_timing, counted = map(float, out.stdout.split())
    assert without_timing == 0
    assert 0 < with_timing <= 10_000
    assert counted == 50_000  # every deferral counted (the task's queue label read without raising)


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


COMPACT = r"""
import json, os, sys
path, alive, dead = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from celery_tuning.integration import metrics as m

def write(kind, pid, name, sample, labels, value, timestamp=0.0):
    d = MmapedDict(os.path.join(path, f"{kind}_{pid}.db"))
    key = mmap_key(name, sample, tuple(labels), tuple(labels.values()), "doc")
    d.write_value(key, d.read_value(key)[0] + value, timestamp)
    d.close()

def children(first, second, now):
    out = "celery_tuning_task_outcomes_total"
    write("counter", first, out, out, {"task": "t", "state": "success"}, 3)
    write("counter", second, out, out, {"task": "t", "state": "success"}, 4)
    write("counter", second, out, out, {"task": "t", "state": "failure"}, 1)
    run = "celery_tuning_task_run_seconds"
    for pid, n in ((first, 2), (second, 5)):
        write("histogram", pid, run, run + "_bucket", {"task": "t", "le": "0.1"}, n)
        write("histogram", pid, run, run + "_bucket", {"task": "t", "le": "+Inf"}, 1)
        write("histogram", pid, run, run + "_sum", {"task": "t"}, 0.05 * n + 9)
    state = "celery_tuning_breaker_state"
    write("gauge_mostrecent", first, state, state, {"name": "b"}, 2, now + 2)  # the latest
    write("gauge_mostrecent", second, state, state, {"name": "b"}, 0, now + 1)
    write("gauge_max", first, "peak", "peak", {}, 3)
    write("gauge_max", second, "peak", "peak", {}, 7)
    write("gauge_livesum", first, "busy", "busy", {}, 9)  # a dead process's live gauge: dropped
    write("gauge_all", second, "per_pid", "per_pid", {}, 1)  # one series per pid: left alone

def scrape(compacting):
    got = {}
    for family in m._ReapingCollector(path, compact=compacting).collect():
        for s in family.samples:
            got[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return got

write("counter", alive, "celery_tuning_task_outcomes_total", "celery_tuning_task_outcomes_total",
      {"task": "t", "state": "success"}, 10)  # a live process: never merged
children(dead[0], dead[1], 1000.0)
before = scrape(False)
after = scrape(True)
first_round = sorted(os.listdir(path))
children(dead[2], dead[3], 0.0)  # more children exited: merged into the same archives
again = scrape(True)
print(json.dumps({"same": before == after, "files": first_round, "again": sorted(os.listdir(path)),
                  "success": again[("celery_tuning_task_outcomes_total", (("state", "success"), ("task", "t")))],
                  "state": again[("celery_tuning_breaker_state", (("name", "b"),))],
                  "peak": again[("peak", ())],
                  "count": again[("celery_tuning_task_run_seconds_count", (("task", "t"),))],
                  "busy": [k for k in before if k[0] == "busy"]}))
"""


def dead_pids(n):
    pids = []
    for _ in range(n):
        proc = subprocess.Popen(["true"])
        proc.wait()
        pids.append(proc.pid)
    return pids


def test_exited_processes_files_are_merged_into_archives_with_the_same_totals(tmp_path):
    """Each pool child writes its own files; a worker with max_tasks_per_child=1 left two or three
    per task attempt, all read at every scrape. Merged, a scrape shows exactly what it showed."""
    import json
    import os

    dead = dead_pids(4)
    out = subprocess.run([sys.executable, "-c", COMPACT, str(tmp_path), str(os.getpid()), *map(str, dead)],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["same"] is True
    assert got["busy"] == []
    merged = {"counter_archive.db", "histogram_archive.db", "gauge_max_archive.db", "gauge_mostrecent_archive.db"}
    assert set(got["files"]) == merged | {f"counter_{os.getpid()}.db", f"gauge_all_{dead[1]}.db"}
    assert set(got["again"]) == set(got["files"]) | {f"gauge_all_{dead[3]}.db"}
    assert got["success"] == 10 + 7 + 7
    assert got["count"] == 2 * (2 + 1 + 5 + 1)
    assert got["peak"] == 7
    assert got["state"] == 2  # the most recent write of any process, merged or not


def test_directories_of_workers_that_are_gone_are_swept(tmp_path):
    import fcntl
    import os

    from celery_tuning.integration.metrics import sweep_stale_directories

    [gone] = dead_pids(1)

    def made(name, lock=False):
        path = tmp_path / name
        path.mkdir()
        (path / "counter_1.db").write_bytes(b"")
        if lock:
            (path / "owner.lock").write_bytes(b"")
        return path

    unlocked = made(f"celery-tuning-metrics-{gone}-a", lock=True)  # its worker died: nobody holds the lock
    held = made(f"celery-tuning-metrics-{gone}-b", lock=True)  # held (its pid says nothing: pid namespaces)
    fd = os.open(held / "owner.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    earlier = made(f"celery-tuning-metrics-{gone}")  # an earlier version's, no lock: judged by its pid
    running = made(f"celery-tuning-metrics-{os.getpid()}")
    staging = made(f".celery-tuning-metrics-{gone}-c")  # a start that died before renaming it
    other = made("celery-tuning-metrics-x")
    (tmp_path / f"celery-tuning-metrics-{gone}-f").write_text("a file")
    try:
        removed = sweep_stale_directories(str(tmp_path))
    finally:
        os.close(fd)
    assert sorted(removed) == sorted(str(p) for p in (unlocked, earlier, staging))
    assert held.exists() and running.exists() and other.exists()
    assert (tmp_path / f"celery-tuning-metrics-{gone}-f").exists()
