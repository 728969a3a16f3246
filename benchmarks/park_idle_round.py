"""Per-key concurrency caps (issue #18): what an idle mover round costs after many tenants parked.

A review of the first per-key caps found every caller key that ever parked stayed in the park
index, so each mover round visited all of them (553 ms at 1,004 spots, 2.5 s at 6,004). Here
``keys`` tenants of one per-key limit each park a waiter, which is promoted, claimed, published
(acked) and run (redeemed), as a worker and its mover would; then ``rounds`` idle rounds of a
real :class:`~celery_tuning.integration.mover.Mover` on the Redis park store are timed, next to
the same rounds before anything parked. Run: ``python -m benchmarks.park_idle_round [keys...]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Dict, List

from celery import Celery

import celery_tuning
from celery_tuning.integration.mover import Mover
from celery_tuning.integration.runtime import runtime_for
from celery_tuning.storage import keys
from celery_tuning.storage.park import Spot
from celery_tuning.testing import RedisServer

LIMIT = "sync"


def _idle_round_ms(mover: Mover, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = mover.run_once()
        times.append((time.perf_counter() - start) * 1000)
        assert result.published == 0
    return statistics.median(times)


def measure(server: RedisServer, counts: List[int], rounds: int = 50) -> Dict[int, Dict[str, float]]:
    app = Celery("bench_idle", broker="memory://", set_as_current=False)
    app.conf.update(tuning_redis_url=server.db_url(1), tuning_defer_via="park",
                    tuning_concurrency_limits={LIMIT: {"limit": 1}})
    celery_tuning.install(app)
    store = runtime_for(app).registry.park_store()
    mover = Mover(app, store)
    out: Dict[int, Dict[str, float]] = {0: {"round_ms": _idle_round_ms(mover, rounds), "listed": 0.0}}
    drained = 0
    for count in sorted(counts):
        for i in range(drained, count):
            digest = keys.key_digest(f"tenant-{i}")
            where = Spot("concurrency", keys.keyed_spot_name(LIMIT, digest))
            store.park(where, f"t{i}:0:1", "{}", None)
            store.promote(where, keys.lease_key("tuning", LIMIT, digest), 1)
            [claimed] = store.claim(where, 10, 30_000_000)
            store.ack(where, claimed.park_id, claimed.pub)
            store.redeem(where, claimed.park_id, claimed.pub)
        drained = count
        out[count] = {"round_ms": _idle_round_ms(mover, rounds), "listed": float(len(store.spots()))}
    return out


def main(argv: List[str]) -> None:
    counts = [int(a) for a in argv] or [1000, 5000]
    server = RedisServer().start()
    try:
        for count, row in measure(server, counts).items():
            print(f"{count:>6} tenants drained: idle mover round {row['round_ms']:.3f} ms (median), "
                  f"spots listed {int(row['listed'])}")
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
