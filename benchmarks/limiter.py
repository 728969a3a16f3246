"""Limiter micro-benchmarks on one private redis-server: round trips, latency, other libraries."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import redis
from celery import Celery

from benchmarks._measure import round_trips_per_call
from celery_tuning.integration.registry import limiter_for
from celery_tuning.integration.runtime import runtime_for


def _latencies(fns: Dict[str, Callable[[], Any]], n: int) -> Dict[str, List[float]]:
    """Round-robin over the callables, so load spikes on this shared machine hit all alike."""
    for fn in fns.values():
        for _ in range(200):
            fn()
    out: Dict[str, List[float]] = {name: [] for name in fns}
    clock = time.perf_counter
    for _ in range(n):
        for name, fn in fns.items():
            start = clock()
            fn()
            out[name].append(clock() - start)
    return out


def _p(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(url: str, n: int = 5000, runs: int = 3) -> Dict[str, Any]:
    client = redis.Redis.from_url(url)
    app = Celery("bench_limiter", set_as_current=False)
    app.conf.update(tuning_redis_url=url, tuning_rate_limits={"bench": {"rate": "1000000/s", "burst": 1000}})
    lim = limiter_for(runtime_for(app), "bench")
    lim.try_acquire()  # registers the script

    round_trips = round_trips_per_call(lim.try_acquire, n)
    client.config_resetstat()
    for _ in range(n):
        lim.try_acquire()
    server_calls = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) / n

    bare_sha = client.script_load("return 1")
    conn_client = runtime_for(app).connector.client  # same pool, same socket settings

    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter

    limits_storage = RedisStorage(url)
    moving = MovingWindowRateLimiter(limits_storage)
    item = RateLimitItemPerSecond(1_000_000)

    from pyrate_limiter import Duration, Limiter, RedisBucket
    from pyrate_limiter import Rate as PyrateRate

    client.delete("bench-pyrate")
    pyrate = Limiter(RedisBucket.init([PyrateRate(1_000_000, Duration.SECOND)], client, "bench-pyrate"))

    from celery_tuning.storage.redis import load_lua

    gcra_sha = client.script_load(load_lua("gcra_acquire"))
    bucket = lim.bucket()
    packed = f"{lim.interval} {lim.burst} 1 -1"
    fns: Dict[str, Callable[[], Any]] = {
        "bare_evalsha": lambda: conn_client.evalsha(bare_sha, 0),
        "raw_gcra_evalsha": lambda: conn_client.evalsha(gcra_sha, 2, bucket.tat, bucket.conf, packed),
        "ours_acquire": lim.try_acquire,
        "limits_moving_window": lambda: moving.hit(item, "bench"),
        "pyrate_redis_bucket": lambda: pyrate.try_acquire("bench", blocking=False),
    }
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, values in _latencies(fns, n).items():
            samples[name].append(_p(values, 0.5))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "acquires": n,
        "round_trips_per_acquire": round_trips,
        "evalsha_per_acquire_server_side": server_calls,
        "p50_seconds": medians,
        "p50_runs": samples,
        "ours_vs_bare_evalsha": medians["ours_acquire"] / medians["bare_evalsha"],
        "ours_vs_raw_gcra_evalsha": medians["ours_acquire"] / medians["raw_gcra_evalsha"],
        "limits_moving_window_vs_bare_evalsha": medians["limits_moving_window"] / medians["bare_evalsha"],
        "pyrate_redis_bucket_vs_bare_evalsha": medians["pyrate_redis_bucket"] / medians["bare_evalsha"],
    }


def render(result: Dict[str, Any]) -> str:
    p50 = result["p50_seconds"]
    return "\n".join([
        f"Limiter: {result['acquires']} acquires per sample, p50 latency (median of runs)",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| round trips per acquire (commands the client sent) | {result['round_trips_per_acquire']:.3f} | 1 |",
        f"| EVALSHA per acquire (server INFO commandstats) | {result['evalsha_per_acquire_server_side']:.3f} | 1 |",
        f"| bare EVALSHA round trip p50 (script `return 1`) | {p50['bare_evalsha'] * 1e6:.1f} µs | |",
        f"| raw EVALSHA of gcra_acquire.lua p50 (redis-py alone) | {p50['raw_gcra_evalsha'] * 1e6:.1f} µs | |",
        f"| celery-tuning acquire p50 | {p50['ours_acquire'] * 1e6:.1f} µs | |",
        f"| acquire / bare EVALSHA | {result['ours_vs_bare_evalsha']:.3f} | <= 1.3 |",
        f"| acquire / raw EVALSHA of the same script (our Python overhead) | "
        f"{result['ours_vs_raw_gcra_evalsha']:.3f} | |",
        f"| `limits` MovingWindow hit p50 | {p50['limits_moving_window'] * 1e6:.1f} µs | |",
        f"| `limits` MovingWindow / bare EVALSHA | {result['limits_moving_window_vs_bare_evalsha']:.3f} | |",
        f"| pyrate-limiter `RedisBucket` try_acquire p50 | {p50['pyrate_redis_bucket'] * 1e6:.1f} µs | |",
        f"| pyrate-limiter `RedisBucket` / bare EVALSHA | {result['pyrate_redis_bucket_vs_bare_evalsha']:.3f} | |",
    ])
