"""Run ``tests.apps.reliable.work`` (every capability on one task) through a real worker."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from tests.support.workers import QUICK_BACKEND_RETRY, WorkerProcess


def run_reliable(redis_clean: Any, tuning_url: str, count: int, *, during: Optional[Callable[[], None]] = None,
                 pool: str = "prefork", concurrency: int = 4) -> Tuple[List[Any], Dict[int, int], str, float]:
    """``count`` calls, broker and results on ``redis_clean``; ``during()`` runs once a third are
    done, before the second half is published. Returns (values, runs per call, worker log, seconds)."""
    from celery import Celery

    broker = redis_clean.db_url(0)
    worker = WorkerProcess("tests.apps.reliable:app", {"TEST_BROKER_URL": broker, "TEST_TUNING_URL": tuning_url},
                           pool=pool, concurrency=concurrency)
    producer = Celery("producer", broker=broker, backend=broker, set_as_current=False)
    producer.conf.result_backend_transport_options = QUICK_BACKEND_RETRY
    ledger = redis_clean.client(0)
    try:
        worker.start()
        start = time.monotonic()
        results = [producer.send_task("tests.apps.reliable.work", (i,)) for i in range(count // 2)]
        if during is not None:
            deadline = time.monotonic() + 60
            while ledger.hlen("reliable:runs") < count // 3:
                assert time.monotonic() < deadline, worker.output()[-3000:]
                time.sleep(0.02)
            during()
        results += [producer.send_task("tests.apps.reliable.work", (i,)) for i in range(count // 2, count)]
        values = [r.get(timeout=120) for r in results]
        elapsed = time.monotonic() - start
        output = worker.output()
    finally:
        worker.close()
    runs = {int(k): int(v) for k, v in ledger.hgetall("reliable:runs").items()}
    return values, runs, output, elapsed
