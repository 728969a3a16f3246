"""Per-task cost of each benchmark variant through Celery's tracer, without a broker.

End-to-end worker runs on a shared machine move by tens of percent between runs; this is the
steady part of the same comparison: one task attempt of ``benchmarks.apps.noop`` (plain,
pass-through, never-binding limiter, everything on) as the worker's tracer runs it, with its
signals and receivers, against a private redis-server. Wall and CPU time per attempt, each
variant in its own process, interleaved, medians over the runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import redis

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "tuned", "limited", "guarded", "everything")

_PROBE = r"""
import json, time, uuid
from celery.app.trace import build_tracer
from benchmarks.apps import app
app.finalize()
task = app.tasks["benchmarks.apps.noop"]
tracer = build_tracer(task.name, task, app=app, eager=False)
request = {"delivery_info": {"routing_key": "bench", "exchange": ""}, "hostname": "bench@host", "headers": None}
def batch(n):
    ids = [uuid.uuid4().hex for _ in range(n)]
    wall, cpu = time.perf_counter(), time.process_time()
    for task_id in ids:
        tracer(task_id, (), {}, request)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n
batch(300)  # connections, scripts, imports
samples = [batch(1000) for _ in range(3)]
print(json.dumps({"wall": min(w for w, _ in samples), "cpu": min(c for _, c in samples)}))
"""


def _probe(url: str, variant: str) -> Dict[str, float]:
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_REDIS_URL": url, "BENCH_METRICS_PORT": "0",
           "PYTHONPATH": str(ROOT)}
    server = redis.Redis.from_url(url)
    server.config_resetstat()  # a private server: its command statistics are this probe's alone
    out = subprocess.run([sys.executable, "-c", _PROBE], check=True, env=env, cwd=str(ROOT),
                         capture_output=True, text=True)
    result = {k: float(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    # Server time per script call (µs), as Redis itself measures it; 0 when no script ran.
    evalsha = server.info("commandstats").get("cmdstat_evalsha", {})
    result["server_us_per_script"] = float(evalsha.get("usec_per_call", 0.0))
    return result


def run(url: str, runs: int = 3) -> Dict[str, Any]:
    samples: Dict[str, List[Dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(runs):
        for variant in VARIANTS:
            samples[variant].append(_probe(url, variant))
    out: Dict[str, Any] = {}
    for variant, got in samples.items():
        out[variant] = {key: {"median": statistics.median(s[key] for s in got),
                              "min": min(s[key] for s in got), "max": max(s[key] for s in got)}
                        for key in ("wall", "cpu", "server_us_per_script")}
    return out


def render(result: Dict[str, Any]) -> str:
    plain = result["plain"]
    lines = [
        "Per task through Celery's tracer, no broker (the steady part of the pass-through comparison): "
        "µs per attempt, median of runs (min-max); added = variant minus plain",
        "",
        "| variant | wall µs | CPU µs | wall added µs | CPU added µs | Redis server µs per script call |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        r = result[variant]

        def us(x: Dict[str, float]) -> str:
            return f"{x['median'] * 1e6:.1f} ({x['min'] * 1e6:.1f}-{x['max'] * 1e6:.1f})"

        lines.append(f"| {variant} | {us(r['wall'])} | {us(r['cpu'])}"
                     f" | {(r['wall']['median'] - plain['wall']['median']) * 1e6:.1f}"
                     f" | {(r['cpu']['median'] - plain['cpu']['median']) * 1e6:.1f}"
                     f" | {r['server_us_per_script']['median']:.1f} |")
    return "\n".join(lines)
