"""Breaker benchmarks: round trips per closed call, call overhead, open-state propagation."""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pybreaker
import redis
from celery import Celery

from benchmarks._measure import round_trips_per_call
from celery_tuning.integration.registry import breaker_for
from celery_tuning.integration.runtime import runtime_for

ROOT = Path(__file__).resolve().parents[1]


def _per_call(fns: Dict[str, Callable[[], Any]], n: int, batches: int = 20) -> Dict[str, float]:
    """Median over batches of the mean per-call time, batches interleaved across callables."""
    out: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(batches):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(n):
                fn()
            out[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(v) for name, v in out.items()}


def _noop() -> None:
    return None


def _propagation(url: str, runs: int) -> List[float]:
    app = Celery("bench_watch", set_as_current=False)
    app.conf.update(tuning_redis_url=url, tuning_circuit_breakers={"prop": {"fail_max": 5, "reset_timeout": 60}})
    watcher = breaker_for(runtime_for(app), "prop")
    code = (
        "import sys, time\n"
        "from celery import Celery\n"
        "from celery_tuning.integration.registry import breaker_for\n"
        "from celery_tuning.integration.runtime import runtime_for\n"
        "app = Celery('bench_opener', set_as_current=False)\n"
        f"app.conf.update(tuning_redis_url={url!r}, tuning_circuit_breakers={{'prop': {{}}}})\n"
        "b = breaker_for(runtime_for(app), 'prop')\n"
        "b.refresh()\n"
        "sys.stdin.readline()\n"
        "b.open(); print(time.time(), flush=True)\n"
    )
    delays = []
    for _ in range(runs):
        watcher.close()
        watcher.refresh()
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
        # The watcher keeps calling (as a busy worker does), so its cached state is fresh
        # and the open state must arrive through the refresh, not through a cold cache.
        until = time.monotonic() + 1.0 + random.random() * 0.5
        while time.monotonic() < until:
            watcher.call(_noop)
            time.sleep(0.002)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        opened = float(proc.stdout.readline())
        while True:
            try:
                watcher.call(_noop)
            except pybreaker.CircuitBreakerError:
                delays.append(time.time() - opened)
                break
            time.sleep(0.002)
        proc.wait(timeout=30)
    watcher.reset()
    return delays


def run(url: str, n: int = 2000, runs: int = 3) -> Dict[str, Any]:
    client = redis.Redis.from_url(url)
    app = Celery("bench_breaker", set_as_current=False)
    app.conf.update(tuning_redis_url=url, tuning_circuit_breakers={"bench": {"fail_max": 5}})
    ours = breaker_for(runtime_for(app), "bench")
    ours.refresh()
    theirs_redis = pybreaker.CircuitBreaker(
        fail_max=5, state_storage=pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client, namespace="bench"))
    theirs_memory = pybreaker.CircuitBreaker(fail_max=5)

    # Calls spread over time, as a worker makes them: one call per millisecond for 5 s.
    def paced() -> None:
        ours.call(_noop)
        time.sleep(0.001)

    round_trips = {
        "ours_closed_paced": round_trips_per_call(paced, 5000),
        "ours_closed_tight": round_trips_per_call(lambda: ours.call(_noop), n * 10),
        "pybreaker_redis_storage": round_trips_per_call(lambda: theirs_redis.call(_noop), n),
    }
    per_call = _per_call({
        "ours": lambda: ours.call(_noop),
        "pybreaker_memory": lambda: theirs_memory.call(_noop),
        "pybreaker_redis_storage": lambda: theirs_redis.call(_noop),
    }, n // 10)
    delays = _propagation(url, max(3, runs + 2))
    return {
        "round_trips_per_call": round_trips,
        "per_call_seconds": per_call,
        "ours_vs_pybreaker_memory": per_call["ours"] / per_call["pybreaker_memory"],
        "propagation_seconds": {"median": statistics.median(delays), "max": max(delays), "runs": delays},
    }


def render(result: Dict[str, Any]) -> str:
    rt, pc, prop = result["round_trips_per_call"], result["per_call_seconds"], result["propagation_seconds"]
    return "\n".join([
        "Breaker: closed-state calls of a no-op function",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| round trips per call, ours, 1 call/ms for 5 s | {rt['ours_closed_paced']:.4f} | <= 0.1 |",
        f"| round trips per call, ours, tight loop | {rt['ours_closed_tight']:.5f} | <= 0.1 |",
        f"| round trips per call, pybreaker `CircuitRedisStorage` | {rt['pybreaker_redis_storage']:.2f} | (>= 2) |",
        f"| per call, ours | {pc['ours'] * 1e6:.2f} µs | |",
        f"| per call, pybreaker in-memory | {pc['pybreaker_memory'] * 1e6:.2f} µs | |",
        f"| per call, pybreaker `CircuitRedisStorage` | {pc['pybreaker_redis_storage'] * 1e6:.1f} µs | |",
        f"| ours / pybreaker in-memory | {result['ours_vs_pybreaker_memory']:.2f} | <= 2 |",
        f"| open state reaches another process (median / max of {len(prop['runs'])}) | "
        f"{prop['median']:.2f} s / {prop['max']:.2f} s | <= 1 s |",
    ])
