"""pytest plugin for projects whose tasks use celery-tuning (registered as ``pytest11``).

Inert unless a test asks for one of its fixtures:

``tuning_memory``
    Every app with celery-tuning installed (apps made at import time, and apps installed during
    the test, such as ``celery.contrib.pytest``'s ``celery_app``) keeps its limits, breakers,
    leases, parked calls and cache in this process's memory for the test, whatever its
    ``tuning_redis_url``; each test starts from empty stores. Yields a :class:`TuningHelpers`.
``tuning_redis``
    The URL of a private redis-server started once per session (or ``CELERY_TUNING_TEST_REDIS_URL``),
    flushed before each test; every app's components (cache L1, breakers' views, limiters) start
    afresh too, as under ``tuning_memory``.
``tuning_helpers``
    The helpers alone: open a breaker, fill a rate-limit bucket, seed the cache.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import pytest

__all__ = ["TuningHelpers", "tuning_helpers", "tuning_memory", "tuning_redis", "tuning_redis_server"]

#: A Redis to use instead of starting one (its database is flushed before each test).
REDIS_URL_ENV = "CELERY_TUNING_TEST_REDIS_URL"


def _steps(task: Any) -> Any:
    real = getattr(task, "_get_current_object", None)  # @app.task at import time gives a proxy
    if real is not None:
        task = real()
    return getattr(type(task), "_tuning_steps", None) or ()


def _step(task: Any, kind: str) -> Any:
    for step in _steps(task):
        if getattr(step, "kind", None) == kind:
            return step
    raise ValueError(f"task {getattr(task, 'name', task)!r} has no @{kind} policy")


def _app_of(task: Any, app: Any) -> Any:
    if app is not None:
        return app
    found = getattr(task, "_app", None) or getattr(task, "app", None)
    if found is not None and not isinstance(task, str):
        return found
    from celery import current_app

    return current_app._get_current_object()


class TuningHelpers:
    """Put a task's tuning state where a test wants it. ``target`` is a tuned task (its own
    policy's breaker, limiter or cache) or a name from the settings (with ``app``, else the
    current app)."""

    def breaker(self, target: Any, app: Any = None) -> Any:
        """The :class:`~celery_tuning.SharedBreaker` of ``target``."""
        if isinstance(target, str):
            from ..integration.registry import breaker_for
            from ..integration.runtime import runtime_for

            return breaker_for(runtime_for(_app_of(target, app)), target)
        return _step(target, "breaker").breaker

    def limiter(self, target: Any, app: Any = None) -> Any:
        """The :class:`~celery_tuning.GcraLimiter` of ``target``."""
        if isinstance(target, str):
            from ..integration.registry import limiter_for
            from ..integration.runtime import runtime_for

            return limiter_for(runtime_for(_app_of(target, app)), target)
        return _step(target, "rate_limit").limiter

    def open_breaker(self, target: Any, app: Any = None) -> Any:
        """Open ``target``'s breaker for every caller; returns the breaker."""
        breaker = self.breaker(target, app)
        breaker.open()
        return breaker

    def close_breaker(self, target: Any, app: Any = None) -> Any:
        """Close ``target``'s breaker; returns the breaker."""
        breaker = self.breaker(target, app)
        breaker.close()
        return breaker

    def fill_bucket(self, target: Any, app: Any = None, key: Any = None) -> Any:
        """Take every token of ``target``'s rate limit: the next call is limited. Returns the limiter."""
        limiter = self.limiter(target, app)
        for _ in range(1_000_000):
            if not limiter.try_acquire(key=key):
                return limiter
        raise RuntimeError(f"{limiter!r}: the bucket never ran empty")  # pragma: no cover

    def seed_cache(self, task: Any, value: Any, *args: Any, **kwargs: Any) -> None:
        """Make ``task(*args, **kwargs)`` answer ``value`` from its cache without running."""
        cache = _step(task, "cache").cache
        digest = cache.digest(args, kwargs)
        cache.get_or_compute(digest, lambda: value)
        cache.flush()


@pytest.fixture()
def tuning_helpers() -> TuningHelpers:
    """Helpers that open a breaker, fill a rate-limit bucket or seed a task's cache."""
    return TuningHelpers()


@pytest.fixture()
def tuning_memory() -> Iterator[TuningHelpers]:
    """Every celery-tuning app on in-process stores for this test, starting empty."""
    from ..integration.runtime import use_memory_everywhere

    use_memory_everywhere(True)
    try:
        yield TuningHelpers()
    finally:
        use_memory_everywhere(False)


@pytest.fixture(scope="session")
def tuning_redis_server() -> Iterator[Optional[Any]]:
    """The session's private redis-server (None when ``CELERY_TUNING_TEST_REDIS_URL`` is set)."""
    if os.environ.get(REDIS_URL_ENV):
        yield None
        return
    from .redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture()
def tuning_redis(tuning_redis_server: Optional[Any]) -> Iterator[str]:
    """URL of a Redis for this test (flushed first, every app's components afresh): set it as
    ``tuning_redis_url``."""
    import redis

    from ..integration.runtime import reset_stores_everywhere
    from ..storage.cache import flush_writers

    flush_writers()  # an earlier test's deferred cache stores land before the flush
    if tuning_redis_server is None:
        url = os.environ[REDIS_URL_ENV]
    else:
        if not tuning_redis_server.alive():
            tuning_redis_server.start()
        url = tuning_redis_server.url
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    # What an earlier test left in this process (a cache's L1, a breaker's cached view) would answer
    # for the flushed Redis.
    reset_stores_everywhere()
    yield url
