"""Run a real Celery worker and a producer against Redis and show what celery-tuning measures.

Uses $REDIS_URL, else redis://127.0.0.1:6379; when nothing answers there it starts a
private redis-server on a free port and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

from examples._runner import find_or_start_redis, workers

ROOT = Path(__file__).resolve().parents[2]


def shared_rate_limit(call_llm: Any, events: Any, key: str) -> None:
    print("\n2. Shared rate limit: 20 call_llm tasks, limiter 'llm' = 5/s burst 2, two worker processes")
    print("   (Celery's own rate_limit='5/s' is per worker: two workers would send 10/s)")
    events.delete(key)
    start = time.time()
    results = [call_llm.delay(i) for i in range(20)]
    values = [r.get(timeout=60) for r in results]
    elapsed = time.time() - start
    runs = [json.loads(e) for e in events.lrange(key, 0, -1)]
    runs = [e for e in runs if e.get("event") == "llm"]
    assert sorted(v["prompt"] for v in values) == list(range(20))
    per_second: Dict[int, int] = {}
    for e in runs:
        per_second[int(e["at"] - start)] = per_second.get(int(e["at"] - start), 0) + 1
    workers = sorted({e["worker"] for e in runs})
    print(f"   20 calls in {elapsed:.2f} s (expected >= {(20 - 2) / 5:.1f} s) on {len(workers)} workers: "
          + ", ".join(workers))
    print("   calls per second:", "  ".join(f"[{s}s] {n}" for s, n in sorted(per_second.items())))
    print(f"   retries used: {sum(e['retries'] for e in runs)} (deferred tasks do not spend max_retries=0)")


def throttling(call_busy_api: Any) -> None:
    print("\n3. Feedback from the API: the first call gets '429, retry after 2 s' (celery_tuning.Throttled)")
    time.sleep(1.0)  # let the bucket from section 2 refill
    start = time.time()
    first = call_busy_api.delay(0)
    time.sleep(0.3)  # the 429 has arrived by now; 4 more calls are sent during the pause
    results = [first] + [call_busy_api.delay(i) for i in range(1, 5)]
    finished = sorted(r.get(timeout=60) - start for r in results)
    print("   every worker held its calls until the pause ended; they completed at "
          + ", ".join(f"{t:.2f}s" for t in finished))


def circuit(charge: Any, events: Any, key: str) -> None:
    from celery_tuning import breaker

    print("\n4. Circuit breaker 'payments' (fail_max 3, reset_timeout 2 s), shared by both workers")
    events.delete(key)
    events.set("tuning-demo:payments-down", 1)
    start = time.time()
    failures = 0
    for order in range(3):
        try:
            charge.delay(order).get(timeout=30)
        except Exception as exc:  # the worker's ConnectionError, rebuilt by the result backend
            if "unreachable" not in str(exc):
                raise
            failures += 1
    print(f"   the payments API is down: {failures} orders failed; breaker is now "
          f"{breaker('payments').refresh().state}", flush=True)
    time.sleep(0.6)  # every process re-reads breaker state within tuning_breaker_refresh_interval (0.5 s)
    waiting = [charge.delay(order) for order in range(3, 8)]
    time.sleep(0.5)
    ran_while_open = [json.loads(e) for e in events.lrange(key, 0, -1)]
    ran_while_open = [e for e in ran_while_open if e.get("event") == "charge" and e["order"] >= 3]
    print(f"   5 more orders sent while open: {len(ran_while_open)} reached the API; "
          f"{5 - len(ran_while_open)} were deferred (not failed, no retry spent)")
    events.delete("tuning-demo:payments-down")
    print(f"   [{time.time() - start:.1f}s] the API recovers")
    done = [r.get(timeout=60) for r in waiting]
    print(f"   after the reset timeout one trial call closed the breaker ({breaker('payments').refresh().state}); "
          f"all 5 orders charged by {max(d['at'] for d in done) - start:.1f}s, retries used: "
          f"{sum(d['retries'] for d in done)}")


def cached(summarize: Any, events: Any) -> None:
    print("\n5. Result cache: 12 identical summarize(42) calls at once on two workers (the body takes 0.8 s)")
    start = time.time()
    first = [summarize.delay(42) if i % 2 else summarize.delay(doc_id=42, style="short") for i in range(12)]
    values = [r.get(timeout=60) for r in first]
    took = time.time() - start
    runs = int(events.get("tuning-demo:summarize-runs:42") or 0)
    assert all(v == values[0] for v in values)
    print(f"   all 12 got the same result in {took:.2f} s; the body ran {runs} time(s) (single flight)")
    start = time.time()
    again = [summarize.delay(42) for _ in range(12)]
    [r.get(timeout=60) for r in again]
    print(f"   12 more calls served from the cache in {time.time() - start:.2f} s")
    summarize.cache.invalidate(42)
    start = time.time()
    summarize.delay(42).get(timeout=60)
    print(f"   after summarize.cache.invalidate(42) the next call ran the body again ({time.time() - start:.2f} s)")


def main() -> None:
    base, private = find_or_start_redis()
    if private is None:
        run(base)
        return
    try:
        run(base)
    except BaseException:  # reported here: its traceback would keep the demo's results alive
        traceback.print_exc()
        failed = True
    else:
        failed = False
    # Every result the demo held went with run()'s frame; collect those left in reference cycles
    # too while Redis still answers: on Celery < 5.7 a result collected after the private
    # redis-server stopped unsubscribes from its __del__, and the result backend's reconnect
    # retries kept the demo from exiting for minutes.
    gc.collect()
    private.close()
    print("stopped the private redis-server")
    if failed:
        sys.exit(1)


def run(base: str) -> None:
    """The demo's sections against Redis at ``base`` (no database), on two real workers."""
    url = f"{base}/15"
    os.environ["DEMO_REDIS_URL"] = url
    running = contextlib.ExitStack()
    try:
        running.enter_context(workers("examples.demo.app", {"DEMO_REDIS_URL": url}, count=2, queues="tuning-demo",
                                      extra=("-P", "threads", "-c", "4")))
        from examples.demo.app import (
            EVENTS,
            _events,
            call_busy_api,
            call_llm,
            charge,
            fetch_page,
            render_report,
            summarize,
        )

        _events.delete(EVENTS, "tuning-demo:busy-calls")
        # A fresh bucket, whatever an earlier run left behind.
        from celery_tuning import limiter

        limiter("llm").store.reset(limiter("llm").bucket())
        from celery_tuning import breaker

        breaker("payments").reset()
        summarize.cache.clear()
        _events.delete("tuning-demo:summarize-runs:42")
        print("\n1. SLA timing: 20 fetch_page tasks on the 'tuning-demo' queue (queue SLA: warning 0.5 s total)")
        print("   and 8 render_report tasks (@sla warning 0.15 s run time)")
        results = [fetch_page.delay(i) for i in range(20)] + [render_report.delay(i) for i in range(8)]
        values: List[int] = [r.get(timeout=30) for r in results]
        assert values == list(range(20)) + list(range(8)), values
        time.sleep(0.3)  # the last task_timed events are written after the result
        events = [json.loads(e) for e in _events.lrange(EVENTS, 0, -1)]
        timed = [e for e in events if e["event"] == "timed"]
        breaches = [e for e in events if e["event"] == "breach"]
        for name in ("examples.demo.app.fetch_page", "examples.demo.app.render_report"):
            rows = [e for e in timed if e["task"] == name]
            waits = sorted(e["wait"] for e in rows)
            runs = sorted(e["run"] for e in rows)
            totals = sorted(e["total"] for e in rows)
            short = name.rsplit(".", 1)[1]
            print(f"   {short:<14} n={len(rows):>2}  queue wait p50 {waits[len(waits) // 2] * 1000:6.1f} ms"
                  f"  run p50 {runs[len(runs) // 2] * 1000:6.1f} ms  end-to-end max {totals[-1] * 1000:6.1f} ms")
        print(f"   SLA breaches: {len(breaches)}")
        for b in breaches:
            print(f"     {b['level']:<8} {b['task'].rsplit('.', 1)[1]} {b['kind']}={b['measured']:.3f}s "
                  f"> {b['threshold']}s")
        shared_rate_limit(call_llm, _events, EVENTS)
        throttling(call_busy_api)
        circuit(charge, _events, EVENTS)
        cached(summarize, _events)
        print("\ndemo finished: every task ran exactly once")
    finally:
        running.close()  # warm-stops the workers


if __name__ == "__main__":
    main()
