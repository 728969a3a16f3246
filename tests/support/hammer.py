"""Child-process body for limiter accuracy tests (kept apart from test modules for spawn)."""

from __future__ import annotations

import time
from typing import Any


def hammer(url: str, seconds: float, queue: Any, start_at: float) -> None:
    """try_acquire in a tight loop on limiter 'acc' (50/s burst 5); report admission times."""
    from celery import Celery

    from celery_tuning.integration.registry import limiter_for
    from celery_tuning.integration.runtime import runtime_for

    app = Celery("hammer", set_as_current=False)
    app.conf.update(tuning_redis_url=url, tuning_rate_limits={"acc": {"rate": "50/s", "burst": 5}})
    lim = limiter_for(runtime_for(app), "acc")
    while time.time() < start_at:
        time.sleep(0.001)
    admitted = []
    end = start_at + seconds
    while time.time() < end:
        if lim.try_acquire():
            admitted.append(time.time())
    queue.put(admitted)
