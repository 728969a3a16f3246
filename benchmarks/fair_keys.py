"""Fair queues (issue #18 item 5): the dispatcher's cost per released message at 10, 1,000 and 10,000 keys.

For each key count, ``keys`` tenants each queue messages (``per_key`` each) in one queue of the
Redis fair store; then the dispatcher's release script is run in batches of 100 (window large
enough not to bind) and each batch's messages are acknowledged and started, as a dispatcher and
its workers would. The median time per released message (release + ack + start, three round
trips) is reported per key count; flat means the ring's O(released) walk holds whatever the
number of keys. Run: ``python -m benchmarks.fair_keys [keys...]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Dict, List

from celery_tuning.storage.fair import RedisFairStore
from celery_tuning.storage.redis import RedisConnector
from celery_tuning.testing import RedisServer

QUEUE = "tenants"
BATCH = 100


def _fill(store: RedisFairStore, keys: int, total: int) -> None:
    for i in range(total):
        store.add(QUEUE, f"m{i}", f"k{i % keys}", '{"task": "t"}')


def measure(server: RedisServer, counts: List[int], released: int = 3000) -> Dict[int, Dict[str, float]]:
    out: Dict[int, Dict[str, float]] = {}
    for keys in counts:
        server.client().flushall()
        store = RedisFairStore(RedisConnector(server.db_url(0)))
        # At least two messages per key, and enough for the measured releases.
        _fill(store, keys, max(released + BATCH, 2 * keys))
        per_msg: List[float] = []
        release_only: List[float] = []
        done = 0
        while done < released:
            start = time.perf_counter()
            got = store.release(QUEUE, BATCH, 30_000_000, 30_000_000, window=10 * BATCH)
            mid = time.perf_counter()
            for r in got.released:
                store.ack(QUEUE, r.msg_id, r.pub)
                store.start(QUEUE, r.msg_id, r.pub, r.digest)
            end = time.perf_counter()
            n = len(got.released)
            assert n == BATCH, n
            per_msg.append((end - start) / n * 1e6)
            release_only.append((mid - start) / n * 1e6)
            done += n
        out[keys] = {"per_message_us": statistics.median(per_msg),
                     "release_script_per_message_us": statistics.median(release_only)}
    return out


def main(argv: List[str]) -> None:
    counts = [int(a) for a in argv] or [10, 1000, 10000]
    server = RedisServer().start()
    try:
        results = measure(server, counts)
    finally:
        server.close()
    base = results[counts[0]]["release_script_per_message_us"]
    print("keys | release script per message (µs) | release + ack + start per message (µs) | ratio to first")
    for keys, row in results.items():
        print(f"{keys} | {row['release_script_per_message_us']:.1f} | {row['per_message_us']:.1f} | "
              f"{row['release_script_per_message_us'] / base:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
