"""Stacked limits (issue #18): 10/s stacked on 30/min, hammered by 4 processes for 60 s.

Each process calls ``decide_all`` on both limiters (one script, all or none) in a tight loop on a
private redis-server. The tighter bucket (30/min, burst 1) admits 30 calls in 60 s (one at 0 s, then
one every 2 s up to 58 s; the slot at 60 s falls on the end); the
looser one (10/s, burst 10) would admit ~600 alone. Refused calls must not spend the looser
bucket: at the end it holds (nearly) all its 10 tokens, though the refused calls were thousands.
Run: ``python -m benchmarks.stacked_limits [seconds]`` (default 60).
"""

from __future__ import annotations

import math
import multiprocessing
import sys
import time
from typing import Any, List

from celery_tuning.testing import RedisServer

FAST = {"rate": "10/s", "burst": 10}
SLOW = {"rate": "30/m", "burst": 1}


def _app(url: str) -> Any:
    from celery import Celery

    app = Celery("bench_stacked", set_as_current=False)
    app.conf.update(tuning_redis_url=url, tuning_rate_limits={"fast": FAST, "slow": SLOW})
    return app


def _hammer(url: str, seconds: float, start_at: float, out: Any) -> None:
    from celery_tuning.integration.registry import limiter_for
    from celery_tuning.integration.runtime import runtime_for
    from celery_tuning.ratelimit import decide_all

    runtime = runtime_for(_app(url))
    fast, slow = limiter_for(runtime, "fast"), limiter_for(runtime, "slow")
    while time.time() < start_at:
        time.sleep(0.001)
    admitted: List[float] = []
    refused = 0
    end = start_at + seconds
    while time.time() < end:
        decision = decide_all([(fast, 1, None), (slow, 1, None)]).decision
        if decision.allowed and decision.wait == 0:
            admitted.append(time.time())
        else:
            refused += 1
    out.put((admitted, refused))


def measure(seconds: float = 60.0, processes: int = 4) -> dict:
    server = RedisServer().start()
    try:
        url = server.db_url(1)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        start_at = time.time() + 3.0  # spawn start-up happens before the clock starts
        procs = [ctx.Process(target=_hammer, args=(url, seconds, start_at, out)) for _ in range(processes)]
        for p in procs:
            p.start()
        results = [out.get(timeout=seconds + 60) for _ in procs]
        for p in procs:
            p.join(timeout=10)
        from celery_tuning.integration.registry import limiter_for
        from celery_tuning.integration.runtime import runtime_for

        runtime = runtime_for(_app(url))
        fast_left = limiter_for(runtime, "fast").snapshot().tokens
    finally:
        server.close()
    admitted = sorted(t for times, _ in results for t in times)
    return {"seconds": seconds, "processes": processes, "admitted": len(admitted),
            # the slots in [0, seconds): the burst at 0, then one every 2 s
            "expected": SLOW["burst"] - 1 + math.ceil(seconds / 2.0), "refused": sum(r for _, r in results),
            "fast_tokens_left": fast_left, "fast_burst": FAST["burst"]}


def main(argv: List[str]) -> None:
    seconds = float(argv[0]) if argv else 60.0
    row = measure(seconds)
    print(f"stacked 10/s (burst 10) + 30/min (burst 1), {row['processes']} processes, {row['seconds']:.0f} s: "
          f"admitted {row['admitted']} (the tighter bucket allows {row['expected']}, +1 if a slot falls on "
          f"the end), refused {row['refused']}; the looser bucket holds {row['fast_tokens_left']} of "
          f"{row['fast_burst']} tokens at the end")


if __name__ == "__main__":
    main(sys.argv[1:])
