"""The pipeline step that applies ``@cache_result``, and the ``task.cache`` handle."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Optional, Tuple

from celery import signals as celery_signals

from .. import signals
from ..cache import TwoLevelCache, UncacheableArgument
from ..policy.attach import CachePolicy
from ..storage.cache import RedisCacheStore, flush_writers
from .pipeline import Call, Degraded, Step, register_step
from .receivers import _recorders
from .runtime import runtime_for

__all__ = ["CacheHandle", "CacheStep"]

logger = logging.getLogger("celery_tuning.cache")


def _observer(event: str, name: str) -> None:
    record = _recorders["cache"]
    if record is not None:  # metrics: a direct call, no signal dispatch
        record(name, event)
    if signals.cache_event.receivers:
        signals.cache_event.send(sender=name, event=event)


class CacheHandle:
    """``task.cache``: invalidate entries of this task from anywhere."""

    def __init__(self, step: CacheStep) -> None:
        self._step = step

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Drop the entry for these arguments everywhere (Redis and every process's L1)."""
        cache = self._step.cache
        cache.invalidate_digest(cache.digest(args, kwargs))

    def clear(self) -> int:
        """Drop every entry of this task everywhere; returns the new generation."""
        return self._step.cache.clear()

    def get(self, *args: Any, **kwargs: Any) -> Tuple[bool, Any]:
        """``(found, value)`` for these arguments, without running anything."""
        cache = self._step.cache
        return cache.peek(cache.digest(args, kwargs))

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until the results this process computed are in Redis (they are written in the
        background, see ``tuning_cache_write_behind``); False when that took over ``timeout`` s."""
        return self._step.cache.flush(timeout)

    def entries(self) -> int:
        """Entries in Redis for the current generation (uses SCAN: not for hot paths)."""
        return self._step.cache.l2_entries()


class CacheStep(Step):
    """Built once per task class when it is bound."""

    kind = "cache"

    def __init__(self, policy: CachePolicy, task_cls: Any) -> None:
        self.policy = policy
        self.task_name = task_cls.name
        self.runtime = runtime_for(task_cls._app)
        run = task_cls.__dict__["run"]
        fun = run.__func__ if isinstance(run, staticmethod) else run
        signature = inspect.signature(fun)
        if not isinstance(run, staticmethod):  # bound task: drop ``self``
            params = list(signature.parameters.values())[1:]
            signature = signature.replace(parameters=params)
        self.signature = signature
        lock_timeout = policy.lock_timeout
        if lock_timeout is None:
            lock_timeout = float(task_cls.time_limit or task_cls._app.conf.task_time_limit or 60.0)
        self.lock_timeout = lock_timeout
        self._cache: Optional[TwoLevelCache] = None
        self.handle = CacheHandle(self)
        self._limit_step: Any = None
        self._breaker_step: Any = None
        self._combine: Optional[bool] = None

    def chain_built(self, steps: List[Step]) -> None:
        by_kind = {step.kind: step for step in steps}
        # The limiter's decision may ride the lookup only when nothing between here and the
        # rate limit can still refuse the call after its token is taken (the breaker is asked
        # first, in _preflight): a concurrency slot comes first and is not asked.
        self._limit_step = None if "concurrency" in by_kind else by_kind.get("rate_limit")
        self._breaker_step = by_kind.get("breaker")

    def _can_combine(self) -> bool:
        """A rate limit on the same Redis as the cache, not a Cluster: its decision can ride the lookup."""
        if self._combine is None:
            connector = getattr(self._limit_step.limiter.store, "connector", None)
            cache_store = self.cache.store
            self._combine = (connector is not None and cache_store is not None
                             and connector is cache_store.connector and cache_store.can_combine)
        return self._combine

    def _preflight(self, task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if self._breaker_step is not None and not self._breaker_step.breaker.looks_closed():
            return None  # an open or half-open breaker decides first: no token for a call it stops
        return self._limit_step.preflight(task, args, kwargs)

    @property
    def cache(self) -> TwoLevelCache:
        if self._cache is None:
            p = self.policy
            store = RedisCacheStore(self.runtime.connector)
            self._cache = TwoLevelCache(
                self.task_name, self.signature, store=store, prefix=self.runtime.config.key_prefix,
                version=p.version, ttl=p.ttl, l1_ttl=p.l1_ttl, l1_maxsize=self.runtime.config.cache_l1_maxsize,
                l1_max_bytes=self.runtime.config.cache_l1_max_bytes,
                max_size=p.max_size, serializer=p.serializer, key=p.key, vary_on=p.vary_on,
                lock_timeout=self.lock_timeout, lease_ttl=self.runtime.config.concurrency_lease_ttl,
                wait_timeout=p.wait_timeout,
                write_behind=self.runtime.config.cache_write_behind, observer=_observer,
            )
        return self._cache

    def wrap(self, task_cls: Any, call_next: Call) -> Call:
        def call(task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            cache = self.cache
            try:
                digest = cache.digest(args, kwargs)
            except UncacheableArgument as exc:
                cache._warn_once("arguments", "task %s runs uncached: %s", self.task_name, exc)
                _observer("skip_arguments", self.task_name)
                return call_next(task, args, kwargs)

            def compute() -> Any:
                result = call_next(task, args, kwargs)
                if type(result) is Degraded:
                    # Not the task's result: leave with it the way an exception leaves, which
                    # stores nothing and frees the single-flight lock for the next caller.
                    raise _NotCached(result)
                return result

            limit_step = self._limit_step
            try:
                if limit_step is None or not self._can_combine():
                    return cache.get_or_compute(digest, compute)
                try:
                    return cache.get_or_compute(digest, compute, preflight=lambda: self._preflight(task, args, kwargs))
                finally:
                    limit_step.discard_preset()  # taken but not reached (e.g. the breaker opened meanwhile)
            except _NotCached as skipped:
                return skipped.result

        return call


class _NotCached(BaseException):
    """Carries a :class:`Degraded` result out of the cache's compute call (never escapes the step)."""

    def __init__(self, result: Degraded) -> None:
        super().__init__()
        self.result = result


def _flush_stores(**_: Any) -> None:
    if not flush_writers():
        logger.warning("cache: some results were not stored in Redis before shutdown (Redis too slow)")


# A prefork child leaves through os._exit (no atexit): write its queued stores on the way out.
celery_signals.worker_process_shutdown.connect(_flush_stores, weak=False, dispatch_uid="celery_tuning.cache.flush")
celery_signals.worker_shutdown.connect(_flush_stores, weak=False, dispatch_uid="celery_tuning.cache.flush_main")

register_step("cache", CacheStep)
