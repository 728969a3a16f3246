"""Result-cache benchmarks: L1 and L2 hit cost against a bare GET, and cached vs uncached tasks."""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any, Callable, Dict, List

import redis

from celery_tuning.cache import TwoLevelCache
from celery_tuning.policy.codec import encode
from celery_tuning.storage.cache import RedisCacheStore
from celery_tuning.storage.redis import RedisConnector


def embed(text: str, model: str = "small") -> Dict[str, Any]:
    return {"text": text, "model": model, "vector": [0.1] * 64}


def _interleaved(fns: Dict[str, Callable[[], Any]], n: int) -> Dict[str, float]:
    out: Dict[str, List[float]] = {name: [] for name in fns}
    clock = time.perf_counter
    for fn in fns.values():
        for _ in range(200):
            fn()
    for _ in range(n):
        for name, fn in fns.items():
            start = clock()
            fn()
            out[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in out.items()}


def _batched(fns: Dict[str, Callable[[], Any]], n: int, batch: int = 500) -> Dict[str, float]:
    out: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(max(1, n // batch)):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(batch):
                fn()
            out[name].append((time.perf_counter() - start) / batch)
    return {name: statistics.median(values) for name, values in out.items()}


def run(url: str, n: int = 5000) -> Dict[str, Any]:
    connector = RedisConnector(url)
    store = RedisCacheStore(connector)
    signature = inspect.signature(embed)
    l1 = TwoLevelCache("bench.l1", signature, store=store, ttl=600, l1_ttl=600)
    l2 = TwoLevelCache("bench.l2", signature, store=store, ttl=600, l1_ttl=0)
    value = embed("hello")
    args = ("hello",)
    for cache in (l1, l2):
        cache.get_or_compute(cache.digest(args, {}), lambda: value)
    raw = encode(value, "json")
    client = redis.Redis.from_url(url)
    client.set("bench:bare", raw)

    def l1_hit() -> Any:
        return l1.get_or_compute(l1.digest(args, {}), lambda: value)

    def l2_hit() -> Any:
        return l2.get_or_compute(l2.digest(args, {}), lambda: value)

    # In-process work is timed in batches (per-call timers would dominate a few µs);
    # network round trips call by call, interleaved so load spikes hit both alike.
    medians = _batched({"direct_call": lambda: embed("hello"), "l1_hit": l1_hit}, n)
    import json

    medians.update(_interleaved({
        "l2_hit": l2_hit,
        "bare_get": lambda: connector.client.get("bench:bare"),
        "bare_get_and_json": lambda: json.loads(connector.client.get("bench:bare")[raw.index(b":", 5) + 1:]),
    }, n))
    return {
        "p50_seconds": medians,
        "l1_hit_overhead_seconds": medians["l1_hit"] - medians["direct_call"],
        "l2_vs_bare_get": medians["l2_hit"] / medians["bare_get"],
        "l2_vs_bare_get_and_json": medians["l2_hit"] / medians["bare_get_and_json"],
        "l2_over_l1": medians["l2_hit"] / medians["l1_hit"],
    }


def render(result: Dict[str, Any], end_to_end: Dict[str, Any]) -> str:
    p50 = result["p50_seconds"]
    lines = [
        "Result cache (median per call; keys computed from the arguments on every call)",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| L1 hit, key included | {p50['l1_hit'] * 1e6:.1f} µs | |",
        f"| L1 hit overhead over calling the function | {result['l1_hit_overhead_seconds'] * 1e6:.1f} µs | <= 10 µs |",
        f"| L2 hit | {p50['l2_hit'] * 1e6:.1f} µs | |",
        f"| bare GET of the same value | {p50['bare_get'] * 1e6:.1f} µs | |",
        f"| L2 hit / bare GET | {result['l2_vs_bare_get']:.2f} | <= 1.3 |",
        f"| L2 hit / (bare GET + json.loads of the same bytes) | {result['l2_vs_bare_get_and_json']:.2f} | |",
        f"| L2 hit / L1 hit | {result['l2_over_l1']:.1f} | >= 10 |",
    ]
    if end_to_end:
        lines.append(f"| 50 ms task, cached vs uncached tasks/s (threads pool, c=4) | "
                     f"{end_to_end['cached50']:.0f} vs {end_to_end['uncached50']:.0f} = "
                     f"{end_to_end['ratio']:.1f}x | >= 5x |")
    return "\n".join(lines)
