"""The pipeline step that applies ``@cache_result``, and the ``task.cache`` handle."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Dict, Optional, Tuple

from celery import signals as celery_signals

from ... import events
from ...cache import TwoLevelCache, UncacheableArgument
from ...policy.attach import CachePolicy
from ...storage.cache import RedisCacheStore, flush_writers
from ..pipeline import Ahead, Call, CallContext, Degraded, PublishCall, PublishContext, Step, register_step
from ..runtime import runtime_for

__all__ = ["CacheHandle", "CacheStep"]

logger = logging.getLogger("celery_tuning.cache")


def _observer(event: str, name: str) -> None:
    events.cache_event(name, event)  # metrics, the cache_event signal


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

    def generation(self) -> int:
        """The task's current cache generation (bumped by :meth:`clear`)."""
        return self._step.cache.generation()

    @property
    def policy(self) -> CachePolicy:
        """The task's ``@cache_result`` settings."""
        return self._step.policy


class CacheStep(Step):
    """Built once per task class when it is bound."""

    kind = "cache"
    #: A miss elects its leader in one script that may also take an inner rate limit's decision.
    carries_ahead = True

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
        self._offer: Optional[Callable[[CallContext, Any], Optional[Ahead]]] = None
        self._carries: Optional[bool] = None

    def take_ahead_from(self, offer: Callable[[CallContext, Any], Optional[Ahead]]) -> None:
        self._offer = offer

    def _can_carry(self) -> bool:
        """Whether this cache's miss script can take an inner decision: not on a Cluster (the keys may
        live on different nodes), and only when a step inside offers one."""
        if self._carries is None:
            store = self.cache.store
            self._carries = self._offer is not None and store is not None and bool(store.can_combine)
        return self._carries

    def _ahead(self, ctx: CallContext) -> Optional[Ahead]:
        """The inner decision this miss may take in its round trip: only one bound for our Redis."""
        assert self._offer is not None and self.cache.store is not None
        return self._offer(ctx, self.cache.store.connector)

    def bind(self, task_cls: Any) -> None:
        task_cls.cache = self.handle

    def publish(self, publish_next: PublishCall) -> Optional[PublishCall]:
        """With ``short_circuit=True``, a standalone ``apply_async`` whose result is cached answers
        from the cache without publishing (``app.send_task`` never comes here)."""
        if not self.policy.short_circuit:
            return None
        from celery import states
        from celery.result import EagerResult
        from celery.utils import uuid

        runtime, handle = self.runtime, self.handle

        def publish(pctx: PublishContext) -> Any:
            if runtime.enabled and pctx.task_id is None and _standalone(pctx.options):
                try:
                    found, value = handle.get(*(pctx.args or ()), **(pctx.kwargs or {}))
                except Exception:  # uncacheable arguments and the like: publish as usual
                    found, value = False, None
                if found:
                    return EagerResult(uuid(), value, states.SUCCESS, name=pctx.task.name)
            return publish_next(pctx)

        return publish

    @property
    def cache(self) -> TwoLevelCache:
        if self._cache is None:
            p = self.policy
            # memory://: this process's L1 is the whole cache, kept as long as Redis would keep it.
            memory = self.runtime.in_memory
            store = None if memory else RedisCacheStore(self.runtime.connector)
            self._cache = TwoLevelCache(
                self.task_name, self.signature, store=store, prefix=self.runtime.config.key_prefix,
                version=p.version, ttl=p.ttl, l1_ttl=p.ttl if memory else p.l1_ttl,
                l1_maxsize=self.runtime.config.cache_l1_maxsize,
                l1_max_bytes=self.runtime.config.cache_l1_max_bytes,
                max_size=p.max_size, serializer=p.serializer, key=p.key, vary_on=p.vary_on,
                lock_timeout=self.lock_timeout, lease_ttl=self.runtime.config.concurrency_lease_ttl,
                wait_timeout=p.wait_timeout,
                write_behind=self.runtime.config.cache_write_behind, observer=_observer,
            )
        return self._cache

    def wrap(self, call_next: Call) -> Call:
        def call(ctx: CallContext) -> Any:
            cache = self.cache
            try:
                digest = ctx.digest = cache.digest(ctx.args, ctx.kwargs)
            except UncacheableArgument as exc:
                cache._warn_once("arguments", "task %s runs uncached: %s", self.task_name, exc)
                _observer("skip_arguments", self.task_name)
                return call_next(ctx)
            if not self._can_carry():
                return cache.get_or_compute(digest, lambda: call_next(ctx), cacheable=_is_result)
            return cache.get_or_compute(digest, lambda: call_next(ctx), cacheable=_is_result,
                                        preflight=lambda: self._ahead(ctx))

        return call


def _is_result(value: Any) -> bool:
    """A breaker's fallback is not the task's result: it is handed back but never stored."""
    return type(value) is not Degraded


#: ``apply_async`` options that leave a call standalone: where and when it is delivered, how it
#: is encoded. Anything else ties the message to something that waits for its id in the result
#: backend or on the broker: a canvas (``link``, ``link_error``, ``chain``, ``chord``,
#: ``group_id``, ``parent_id``, ``root_id``, stamps), a retry or a deferral (``task_id`` and
#: ``retries`` of the running request), ``Task.replace`` (``replaced_task_nesting``), a frozen
#: signature (``task_id``). An allowlist, so an option a later Celery adds publishes as usual.
_STANDALONE_OPTIONS = frozenset({
    "countdown", "eta", "expires", "queue", "exchange", "exchange_type", "routing_key", "priority",
    "serializer", "compression", "time_limit", "soft_time_limit", "ignore_result", "add_to_parent",
    "producer", "connection", "router", "retry", "retry_policy", "shadow", "headers", "publisher",
    "delivery_mode", "mandatory", "declare",
})


def _standalone(options: Dict[str, Any]) -> bool:
    """Whether nothing but the caller waits for this call's result (None means "not given")."""
    return all(key in _STANDALONE_OPTIONS or value is None for key, value in options.items())


def _flush_stores(**_: Any) -> None:
    if not flush_writers():
        logger.warning("cache: some results were not stored in Redis before shutdown (Redis too slow)")


# A prefork child leaves through os._exit (no atexit): write its queued stores on the way out.
celery_signals.worker_process_shutdown.connect(_flush_stores, weak=False, dispatch_uid="celery_tuning.cache.flush")
celery_signals.worker_shutdown.connect(_flush_stores, weak=False, dispatch_uid="celery_tuning.cache.flush_main")

register_step("cache", CacheStep)
