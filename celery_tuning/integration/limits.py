"""Limiters of one app: built from ``tuning_rate_limits`` or inline policies, shared per process."""

from __future__ import annotations

from typing import Any, Optional

from .. import signals
from ..conf import known_names
from ..errors import ConfigurationError
from ..policy.rates import Rate
from ..ratelimit import GcraLimiter
from ..storage.gcra import AdaptiveSpec, RedisGcraStore
from .receivers import _recorders
from .runtime import TuningRuntime, runtime_for

__all__ = ["limiter", "limiter_for"]



def _observer(event: str, name: str, seconds: float) -> None:
    record = _recorders["limiter"]
    if record is not None:  # metrics: a direct call, no signal dispatch
        record(name, event, seconds)
    if signals.limiter_event.receivers:  # the hot path pays nothing when nobody listens
        signals.limiter_event.send(sender=name, event=event, seconds=seconds)


def limiter_for(runtime: TuningRuntime, name: str, *, rate: Optional[Rate] = None,
                burst: Optional[int] = None, adaptive: bool = False) -> GcraLimiter:
    """The process's limiter ``name`` for this app (created once).

    Named limiters come from ``tuning_rate_limits``; passing ``rate`` makes an
    inline limiter of that name.

    Raises:
        ConfigurationError: When ``name`` is not configured and no rate is given.
    """

    def build() -> GcraLimiter:
        nonlocal rate, burst, adaptive
        if rate is None:
            spec = runtime.config.rate_limits.get(name)
            if spec is None:
                known = known_names(runtime.config.rate_limits)
                raise ConfigurationError(
                    f"rate limiter {name!r} is not in tuning_rate_limits (known: {known})")
            rate, burst, adaptive = spec.rate, spec.burst, spec.adaptive
        return GcraLimiter(
            name, rate, burst or 1,
            store=RedisGcraStore(runtime.connector),
            prefix=runtime.config.key_prefix,
            on_redis_error=runtime.config.rate_limit_on_redis_error,
            adaptive=AdaptiveSpec() if adaptive else None,
            observer=_observer,
        )

    return runtime.component("limiter", name, build)


def limiter(name: str, app: Any = None) -> GcraLimiter:
    """The shared limiter ``name`` from ``tuning_rate_limits``, for use around single calls.

    Example::

        celery_tuning.limiter("openai").acquire(timeout=10)

    Arguments:
        name: A key of ``tuning_rate_limits``.
        app: The Celery app (default: the current app).
    """
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    return limiter_for(runtime_for(app), name)
