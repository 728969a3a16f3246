"""Scaling: worker processes 1 -> 2 -> 4, Redis latency 0 -> 1 -> 5 ms, and 8 threads on one breaker.

The cost curve users meet in production: throughput and limiter accuracy as workers are added,
limiter acquisitions per second as the round trip to Redis grows (a proxy adds the delay), and
calls per second through one shared breaker from 1 and from 8 threads.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable, Dict, List

from celery import Celery

from celery_tuning.integration.registry import breaker_for, limiter_for
from celery_tuning.integration.runtime import runtime_for
from celery_tuning.testing import LatencyProxy


def _rate(fn: Callable[[], Any], threads: int, seconds: float) -> float:
    """Calls per second of ``fn`` from ``threads`` threads for ``seconds``."""
    counts: List[int] = [0] * threads
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            fn()
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    start = time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def latency_curve(redis_port: int, delays=(0.0, 0.001, 0.005), seconds: float = 3.0) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for delay in delays:
        proxy = LatencyProxy(redis_port, delay).start()
        try:
            app = Celery(f"bench_latency_{delay}", set_as_current=False)
            app.conf.update(tuning_redis_url=proxy.url, tuning_redis_socket_timeout=2.0,
                            tuning_rate_limits={"bench": {"rate": "1000000/s", "burst": 1000}})
            lim = limiter_for(runtime_for(app), "bench")
            lim.try_acquire()
            out[f"{delay * 1000:g}ms"] = {"threads_1": _rate(lim.try_acquire, 1, seconds),
                                         "threads_8": _rate(lim.try_acquire, 8, seconds)}
        finally:
            proxy.close()
    return out


def breaker_threads(url: str, seconds: float = 3.0) -> Dict[str, float]:
    app = Celery("bench_breaker_threads", set_as_current=False)
    app.conf.update(tuning_redis_url=url, tuning_circuit_breakers={"threads": {"fail_max": 5}})
    shared = breaker_for(runtime_for(app), "threads")
    shared.refresh()

    def call() -> None:
        shared.call(time.sleep, 0.001)  # a 1 ms call: threads overlap inside the breaker

    return {"threads_1": _rate(call, 1, seconds), "threads_8": _rate(call, 8, seconds)}


def workers_curve(url: str, run_worker_once: Callable[..., Dict[str, float]], tasks: int,
                  counts=(1, 2, 4), runs: int = 3) -> Dict[str, Any]:
    """Medians of ``runs`` interleaved runs per worker count (min and max kept)."""
    out: Dict[str, Any] = {}
    for n in counts:
        plain, limited, accuracy = [], [], []
        for _ in range(runs):
            plain.append(run_worker_once(url, "plain", "prefork", tasks, workers=n)["tasks_per_s"])
            limited.append(run_worker_once(url, "limited", "prefork", tasks, workers=n)["tasks_per_s"])
            accuracy.append(run_worker_once(url, "ours", "prefork", 60, workers=n)["tasks_per_s"] / 10.0)
        out[str(n)] = {"plain_tasks_per_s": statistics.median(plain), "plain_range": [min(plain), max(plain)],
                       "limited_tasks_per_s": statistics.median(limited),
                       "limited_range": [min(limited), max(limited)],
                       "limited_ratio": statistics.median(limited) / statistics.median(plain),
                       "admitted_over_configured_10_per_s": statistics.median(accuracy),
                       "accuracy_range": [min(accuracy), max(accuracy)]}
    return out


def render(result: Dict[str, Any]) -> str:
    lines = [
        "Scaling: worker processes (prefork, concurrency 1 each; no-op tasks; a never-binding limiter; "
        "60 tasks at a shared 10/s for accuracy); median of 3 runs (min-max)",
        "",
        "| worker processes | plain tasks/s | limiter tasks/s | ratio | admitted / configured (ideal 1.0) |",
        "|---|---|---|---|---|",
    ]
    for n, e in result["workers"].items():
        (pl, ph), (ll, lh), (al, ah) = e["plain_range"], e["limited_range"], e["accuracy_range"]
        lines.append(f"| {n} | {e['plain_tasks_per_s']:.0f} ({pl:.0f}-{ph:.0f}) | {e['limited_tasks_per_s']:.0f} "
                     f"({ll:.0f}-{lh:.0f}) | {e['limited_ratio']:.3f} | {e['admitted_over_configured_10_per_s']:.2f} "
                     f"({al:.2f}-{ah:.2f}) |")
    lines += ["", "Limiter acquisitions per second as the Redis round trip grows (a proxy delays every reply)",
              "", "| added latency | 1 thread | 8 threads |", "|---|---|---|"]
    for delay, e in result["latency"].items():
        lines.append(f"| {delay} | {e['threads_1']:.0f} | {e['threads_8']:.0f} |")
    b = result["breaker_threads"]
    lines += ["", "One shared breaker (closed), calls of 1 ms: calls/s from 1 thread "
              f"{b['threads_1']:.0f}, from 8 threads {b['threads_8']:.0f} ({b['threads_8'] / b['threads_1']:.1f}x)"]
    return "\n".join(lines)
