"""python -m examples.notes: 60 uploads of 6 distinct documents over 2 workers."""

from __future__ import annotations

import os
import time

import redis

from examples._runner import fresh_database, redis_base, workers


def main() -> None:
    with redis_base() as base:
        fresh_database(f"{base}/11")
        env = {"EXAMPLE_REDIS_URL": f"{base}/11"}
        os.environ.update(env)
        from examples.notes.app import app, summarize

        app.conf.broker_url = app.conf.result_backend = env["EXAMPLE_REDIS_URL"]
        ledger = redis.Redis.from_url(env["EXAMPLE_REDIS_URL"])
        docs = [f"Quarterly report {n}: revenue grew, costs fell, margins widened." for n in range(6)]
        with workers("examples.notes.app", env, count=2, queues="notes", extra=("-P", "threads", "-c", "8")):
            start = time.monotonic()
            results = [summarize.delay(docs[i % 6]) for i in range(60)]
            summaries = [r.get(timeout=60) for r in results]
            elapsed = time.monotonic() - start
            computed = int(ledger.get("notes:summaries-computed"))
            summarize.cache.invalidate(docs[0])  # e.g. the file was edited
            time.sleep(1.5)  # workers drop their L1 copies when the pub/sub message arrives (within 1 s)
            summarize.delay(docs[0]).get(timeout=30)
            after = int(ledger.get("notes:summaries-computed"))
    assert all(s["words"] == 9 for s in summaries)
    print(f"60 uploads of 6 distinct documents: {computed} summaries computed, "
          f"{60 - computed} served from the cache, in {elapsed:.1f} s")
    print(f"after invalidating one document, asking again computed it once more: {after - computed}")


if __name__ == "__main__":
    main()
