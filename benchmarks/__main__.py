"""Run the benchmarks: ``python -m benchmarks [--tasks N] [--runs R] [--pools prefork,threads]``.

Plain Celery and celery-tuning are measured in one run on the same machine, interleaved, and
reported as ratios (absolute numbers on shared machines are noisy). Prints a table and writes
JSON to benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil
import redis

from celery_tuning.testing import RedisServer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
POOL_CONCURRENCY = {"prefork": 2, "threads": 4, "solo": 1}


def _publish(url: str, variant: str, n: int) -> float:
    """Publish ``n`` tasks from a fresh producer process; returns its publish rate (tasks/s)."""
    code = (
        "import time\n"
        "from benchmarks.apps import noop, app\n"
        "with app.producer_or_acquire() as p:\n"
        "    noop.apply_async(producer=p)\n"  # connects and declares outside the timed part
        "    s = time.perf_counter()\n"
        f"    for _ in range({n} - 1): noop.apply_async(producer=p)\n"
        f"    print(({n} - 1) / (time.perf_counter() - s))\n"
    )
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(ROOT),
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def run_worker_once(url: str, variant: str, pool: str, n: int) -> Dict[str, float]:
    """Fill the queue with ``n`` no-op tasks, start a worker, time it draining them."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    publish_rate = _publish(url, variant, n)
    assert client.llen("bench") == n, "publishing failed"
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    log = tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.apps:app", "worker", "-P", pool,
         "-c", str(POOL_CONCURRENCY[pool]), "-Q", "bench", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-l", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while client.llen("bench") == n:  # the first fetch marks the start
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.001)
        start = time.perf_counter()
        while client.llen("bench") or client.hlen("unacked"):
            if time.monotonic() > deadline:
                raise RuntimeError("worker did not drain the queue in time")
            time.sleep(0.002)
        elapsed = time.perf_counter() - start
        rss = _rss_mb(worker.pid)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        os.unlink(log.name)
    return {"tasks_per_s": n / elapsed, "rss_mb": rss, "publish_per_s": publish_rate}


def summarize(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pools", default="prefork,threads")
    args = parser.parse_args(argv)
    server = RedisServer().start()
    results: Dict[str, Any] = {
        "command": "python -m benchmarks " + " ".join(argv),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "tasks": args.tasks, "runs": args.runs, "pass_through": {},
    }
    try:
        url = server.db_url(0)
        for pool in args.pools.split(","):
            samples: Dict[str, Dict[str, List[float]]] = {
                v: {"tasks_per_s": [], "rss_mb": [], "publish_per_s": []} for v in ("plain", "tuned")}
            for _ in range(args.runs):
                for variant in ("plain", "tuned"):  # interleaved so drift hits both alike
                    one = run_worker_once(url, variant, pool, args.tasks)
                    for key, value in one.items():
                        samples[variant][key].append(value)
            entry = {v: {k: summarize(vals) for k, vals in s.items()} for v, s in samples.items()}
            entry["throughput_ratio"] = (entry["tuned"]["tasks_per_s"]["median"]
                                         / entry["plain"]["tasks_per_s"]["median"])
            entry["publish_ratio"] = (entry["tuned"]["publish_per_s"]["median"]
                                      / entry["plain"]["publish_per_s"]["median"])
            entry["rss_ratio"] = entry["tuned"]["rss_mb"]["median"] / entry["plain"]["rss_mb"]["median"]
            results["pass_through"][pool] = entry
    finally:
        server.close()
    print(render_table(results))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {RESULTS / 'latest.json'}")
    return 0


def render_table(results: Dict[str, Any]) -> str:
    lines = [
        f"Pass-through: TunedTask with nothing enabled vs plain celery.Task, {results['tasks']} no-op tasks, "
        f"median of {results['runs']} runs (min-max). Worker throughput is timed from the first fetch "
        "until the queue and the unacked table are empty (acks_late); publish ratio is the producer's "
        "apply_async rate with header stamping vs without.",
        "",
        "| pool | plain tasks/s | tuned tasks/s | ratio (target >= 0.97) | plain RSS MB | tuned RSS MB "
        "| RSS ratio (target <= 1.05) | publish ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pool, e in results["pass_through"].items():
        p, t = e["plain"], e["tuned"]
        lines.append(
            f"| {pool} | {p['tasks_per_s']['median']:.0f} ({p['tasks_per_s']['min']:.0f}-{p['tasks_per_s']['max']:.0f})"
            f" | {t['tasks_per_s']['median']:.0f} ({t['tasks_per_s']['min']:.0f}-{t['tasks_per_s']['max']:.0f})"
            f" | {e['throughput_ratio']:.3f} | {p['rss_mb']['median']:.1f} | {t['rss_mb']['median']:.1f}"
            f" | {e['rss_ratio']:.3f} | {e['publish_ratio']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
