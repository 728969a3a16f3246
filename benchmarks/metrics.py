"""Metrics benchmarks: recording cost per task attempt, and scrape time with many child files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: multiprocess mode must be chosen before prometheus_client is imported.
_PROBE = r"""
import json, os, sys, time
from types import SimpleNamespace
from celery_tuning.integration import metrics as m
from celery_tuning.integration.metrics import _ReapingCollector
m.connect_metric_receivers()
task = SimpleNamespace(name="proj.tasks.work")
labels = ("proj.tasks.work", "celery")
def record():  # what the recorder does for one task attempt (the writes happen in flush())
    m._on_timed(sender=task, task_id="x", queue="celery", wait=0.012, run=0.034, total=0.046,
                state="SUCCESS", cpu=0.001)
n = 20000
for _ in range(1000):
    record()
best = []
for _ in range(5):
    start = time.perf_counter()
    for i in range(n):
        record()
        if i % 500 == 0:  # ~500 tasks per flush interval: a busy process
            m.flush()
    m.flush()
    best.append((time.perf_counter() - start) / n)
best.sort()
# Fill the directory with the files of 1,000 dead children, then time one scrape.
from prometheus_client.mmap_dict import MmapedDict, mmap_key
path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
for pid in range(100000, 101000):
    for prefix, name in (("counter", "celery_tuning_task_outcomes_total"),
                         ("histogram", "celery_tuning_task_run_seconds")):
        d = MmapedDict(os.path.join(path, f"{prefix}_{pid}.db"))
        d.write_value(mmap_key(name, name + ("_total" if prefix == "counter" else "_count"),
                               ("task", "queue"), labels, "x"), 1.0, 0.0)
        d.close()
from prometheus_client import CollectorRegistry, generate_latest
registry = CollectorRegistry()
registry.register(_ReapingCollector(path))
start = time.perf_counter()
text = generate_latest(registry)
scrape = time.perf_counter() - start
print(json.dumps({"record_seconds": best[len(best) // 2], "scrape_seconds_1000_children": scrape,
                  "files": len(os.listdir(path))}))
"""


# Celery's own tracer (what a pool process runs per task) with timing + metrics receivers
# connected and disconnected, alternating batches; the difference is the recording cost per
# task attempt without the broker round trips that make end-to-end rates swing.
_TRACE_PROBE = r"""
import json, os, statistics, sys, time
from celery import Celery, signals as cs
from celery.app.trace import build_tracer
import celery_tuning
from celery_tuning.integration import receivers
app = Celery("bench_trace", broker="memory://", set_as_current=True)
app.conf.update(tuning_redis_url="redis://127.0.0.1:1/0", tuning_metrics_port=1, task_ignore_result=True)
celery_tuning.install(app)  # connects the timing receivers and the metrics recorders
@app.task(name="bench.noop", base=celery_tuning.TunedTask)
def noop():
    return None
app.finalize()
tracer = build_tracer(noop.name, noop, app=app, eager=False)
def request():
    now = time.time()
    return {"delivery_info": {"routing_key": "bench", "exchange": ""}, "tuning_published_at": now,
            "tuning_sent_at": now, "hostname": "bench@host", "headers": None}
def batch(n=2000):
    reqs = [request() for _ in range(n)]
    start = time.perf_counter()
    for i, r in enumerate(reqs):
        tracer(str(i), (), {}, r)
    return (time.perf_counter() - start) / n
pre, post = receivers._on_prerun, receivers._on_postrun
def connect(on):
    if on:
        cs.task_prerun.connect(pre, weak=False, dispatch_uid="celery_tuning.prerun")
        cs.task_postrun.connect(post, weak=False, dispatch_uid="celery_tuning.postrun")
    else:
        cs.task_prerun.disconnect(pre, dispatch_uid="celery_tuning.prerun")
        cs.task_postrun.disconnect(post, dispatch_uid="celery_tuning.postrun")
on, off = [], []
for flag in (True, False) * 2:
    connect(flag); batch()
for _ in range(15):
    connect(True); on.append(batch())
    connect(False); off.append(batch())
print(json.dumps({"trace_on_seconds": statistics.median(on), "trace_off_seconds": statistics.median(off),
                  "trace_overhead_seconds": statistics.median([a - b for a, b in zip(on, off)])}))
"""


def _probe(code: str) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as path:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": path, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             cwd=str(ROOT), timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(trace_runs: int = 5) -> Dict[str, Any]:
    """The recording probe once, the tracer probe ``trace_runs`` times (fresh processes)."""
    import statistics

    traces = [_probe(_TRACE_PROBE) for _ in range(trace_runs)]
    overheads = [t["trace_overhead_seconds"] for t in traces]
    return {**_probe(_PROBE),
            "trace_on_seconds": statistics.median(t["trace_on_seconds"] for t in traces),
            "trace_off_seconds": statistics.median(t["trace_off_seconds"] for t in traces),
            "trace_overhead_seconds": statistics.median(overheads),
            "trace_overhead_min_max_seconds": [min(overheads), max(overheads)]}


def render(result: Dict[str, Any], end_to_end: Dict[str, Any]) -> str:
    low, high = result["trace_overhead_min_max_seconds"]
    lines = [
        "Metrics (prometheus-client multiprocess mode, as under prefork)",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| metric recording of one task attempt (3 histograms, 2 counters; batched writes included) | "
        f"{result['record_seconds'] * 1e6:.1f} µs | <= 20 µs |",
        f"| one task attempt through Celery's tracer, timing + all metrics on vs off "
        f"({result['trace_on_seconds'] * 1e6:.1f} vs {result['trace_off_seconds'] * 1e6:.1f} µs), "
        f"median of 5 processes (min-max) | {result['trace_overhead_seconds'] * 1e6:.1f} µs "
        f"({low * 1e6:.1f}-{high * 1e6:.1f}) | <= 20 µs |",
        f"| one scrape with {result['files']} per-process files (1,000 dead children) | "
        f"{result['scrape_seconds_1000_children'] * 1000:.0f} ms | |",
    ]
    if end_to_end:
        lines += [
            "",
            "End to end: no-op tasks/s with timing and every metric on vs off (TunedTask either way), "
            "back-to-back pairs, median (min-max) over the pairs",
            "",
            "| pool | off tasks/s | on tasks/s | on / off | wall time added per task (1/on - 1/off) "
            "| worker CPU per task off / on | CPU added per task | target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for pool, e in end_to_end.items():
            def rng(x: Dict[str, float], fmt: str = ".0f") -> str:
                return f"{x['median']:{fmt}} ({x['min']:{fmt}} to {x['max']:{fmt}})"

            lines.append(f"| {pool} (c={e['concurrency']}) | {rng(e['off'])} | {rng(e['on'])} | "
                         f"{rng(e['ratio'], '.3f')} | {rng(e['overhead_us_per_task'], '.1f')} µs | "
                         f"{e['cpu_us_per_task_off']['median']:.0f} / {e['cpu_us_per_task_on']['median']:.0f} µs | "
                         f"{rng(e['cpu_overhead_us_per_task'], '.1f')} µs | <= 20 µs |")
    return "\n".join(lines)
