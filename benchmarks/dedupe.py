"""@dedupe at publish, on one private redis-server (broker db and tuning db side by side): what a
deduplicated call costs beside a plain ``apply_async`` and a bare Redis round trip."""

from __future__ import annotations

import statistics
import uuid
from typing import Any, Callable, Dict, List

import redis
from celery import Celery

from benchmarks._measure import round_trips_per_call
from benchmarks.limiter import _latencies, _p


def run(broker_url: str, tuning_url: str, n: int = 2000, runs: int = 3) -> Dict[str, Any]:
    import celery_tuning
    from celery_tuning import TunedTask, dedupe

    app = Celery("bench_dedupe", broker=broker_url, set_as_current=False)
    app.conf.update(tuning_redis_url=tuning_url, broker_connection_retry_on_startup=True)
    celery_tuning.install(app)

    @app.task(shared=False, name="bench.plain", ignore_result=True)
    def plain(x: Any) -> Any:
        return x

    @app.task(base=TunedTask, shared=False, name="bench.deduped", ignore_result=True)
    @dedupe()
    def deduped(x: Any) -> Any:
        return x

    broker = redis.Redis.from_url(broker_url)
    client = redis.Redis.from_url(tuning_url)
    bare_sha = client.script_load("return 1")
    with app.producer_or_acquire() as producer:
        held = deduped.apply_async(("held",), producer=producer)  # the key every duplicate finds taken
        plain.apply_async(("warm",), producer=producer)  # connects and declares outside the timed part

        def duplicate() -> Any:
            result = deduped.apply_async(("held",), producer=producer)
            assert result.id == held.id
            return result

        round_trips = round_trips_per_call(duplicate, n)
        fns: Dict[str, Callable[[], Any]] = {
            "bare_evalsha": lambda: client.evalsha(bare_sha, 0),
            "plain_apply_async": lambda: plain.apply_async(("x",), producer=producer),
            "deduplicated_apply_async": duplicate,
            "first_apply_async": lambda: deduped.apply_async((uuid.uuid4().hex,), producer=producer),
        }
        samples: Dict[str, List[float]] = {name: [] for name in fns}
        for _ in range(runs):
            for name, values in _latencies(fns, n).items():
                samples[name].append(_p(values, 0.5))
            broker.delete("celery")  # the plain and first calls' messages
            client.flushdb()
            held = deduped.apply_async(("held",), producer=producer)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "calls": n,
        "round_trips_per_deduplicated_call": round_trips,
        "p50_seconds": medians,
        "p50_runs": samples,
        "deduplicated_vs_plain_apply_async": medians["deduplicated_apply_async"] / medians["plain_apply_async"],
        "deduplicated_vs_bare_evalsha": medians["deduplicated_apply_async"] / medians["bare_evalsha"],
        "first_vs_plain_apply_async": medians["first_apply_async"] / medians["plain_apply_async"],
    }


def render(result: Dict[str, Any]) -> str:
    p50 = result["p50_seconds"]
    return "\n".join([
        f"@dedupe at publish: {result['calls']} calls per sample, p50 latency (median of runs)",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| round trips per deduplicated call (commands the client sent) | "
        f"{result['round_trips_per_deduplicated_call']:.3f} | 1 |",
        f"| bare EVALSHA round trip p50 (script `return 1`) | {p50['bare_evalsha'] * 1e6:.1f} µs | |",
        f"| plain `apply_async` p50 (publish to the Redis broker) | {p50['plain_apply_async'] * 1e6:.1f} µs | |",
        f"| deduplicated `apply_async` p50 (nothing published) | {p50['deduplicated_apply_async'] * 1e6:.1f} µs | |",
        f"| first `apply_async` of a key p50 (claim + publish) | {p50['first_apply_async'] * 1e6:.1f} µs | |",
        f"| deduplicated / plain apply_async | {result['deduplicated_vs_plain_apply_async']:.3f} | |",
        f"| deduplicated / bare EVALSHA | {result['deduplicated_vs_bare_evalsha']:.3f} | |",
        f"| first / plain apply_async | {result['first_vs_plain_apply_async']:.3f} | |",
    ])
