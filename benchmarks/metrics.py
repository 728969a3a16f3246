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
from celery_tuning.integration.metrics import _ReapingCollector, _outcome, _task_series
labels = ("proj.tasks.work", "celery")
def record():  # what the receivers do for one task attempt
    series = _task_series(*labels)
    series.in_flight.inc()
    series = _task_series(*labels)
    series.in_flight.dec()
    series.wait.observe(0.012)
    series.run.observe(0.034)
    series.total.observe(0.046)
    _outcome(*labels, "success").inc()
n = 20000
for _ in range(1000):
    record()
best = []
for _ in range(5):
    start = time.perf_counter()
    for _ in range(n):
        record()
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


def run() -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as path:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": path, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                             env=env, cwd=str(ROOT), timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(result: Dict[str, Any], end_to_end: Dict[str, Any]) -> str:
    lines = [
        "Metrics (prometheus-client multiprocess mode, as under prefork)",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| metric updates of one task attempt (3 histograms, 1 counter, gauge inc/dec) | "
        f"{result['record_seconds'] * 1e6:.1f} µs | <= 20 µs |",
        f"| one scrape with {result['files']} per-process files (1,000 dead children) | "
        f"{result['scrape_seconds_1000_children'] * 1000:.0f} ms | |",
    ]
    if end_to_end:
        lines.append(f"| end-to-end no-op tasks/s, metrics on / off (prefork, timing + all metrics) | "
                     f"{end_to_end['ratio']:.3f} ({end_to_end['on']:.0f} vs {end_to_end['off']:.0f}) | |")
    return "\n".join(lines)
