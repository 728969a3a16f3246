"""Breakers of one app: built from ``tuning_circuit_breakers`` (or inline options), shared per process."""

from __future__ import annotations

from typing import Any, Dict, Optional

from .. import signals
from ..circuit import SharedBreaker
from ..conf import known_names
from ..errors import ConfigurationError
from ..storage.breaker import RedisBreakerStore
from .interactions import NOT_A_FAILURE
from .runtime import TuningRuntime, runtime_for

__all__ = ["CONTROL_FLOW", "breaker", "breaker_for"]

#: Exceptions that steer Celery or come from our own limits rather than report a broken service:
#: never failures (read from the interaction table).
CONTROL_FLOW = NOT_A_FAILURE



def _on_transition(name: str, old: str, new: str, reason: str) -> None:
    signals.circuit_state_changed.send(sender=name, old=old, new=new, reason=reason)


def breaker_for(runtime: TuningRuntime, name: str, options: Optional[Dict[str, Any]] = None) -> SharedBreaker:
    """The process's breaker ``name`` for this app (created once).

    Raises:
        ConfigurationError: When ``name`` is not configured and no options are given.
    """

    def build() -> SharedBreaker:
        spec = runtime.config.circuit_breakers.get(name) or options
        if spec is None:
            known = known_names(runtime.config.circuit_breakers)
            raise ConfigurationError(f"circuit breaker {name!r} is not in tuning_circuit_breakers (known: {known})")
        return SharedBreaker(
            name,
            store=RedisBreakerStore(runtime.connector),
            fail_max=spec["fail_max"], reset_timeout=spec["reset_timeout"],
            success_threshold=spec["success_threshold"], trial_timeout=spec["trial_timeout"],
            exclude=spec["exclude"], neutral=CONTROL_FLOW,
            prefix=runtime.config.key_prefix,
            on_redis_error=runtime.config.breaker_on_redis_error,
            refresh_interval=runtime.config.breaker_refresh_interval,
            on_transition=_on_transition,
        )

    return runtime.component("breaker", name, build)


def breaker(name: str, app: Any = None) -> SharedBreaker:
    """The shared breaker ``name`` from ``tuning_circuit_breakers``, for use around single calls.

    Example::

        with celery_tuning.breaker("payments"):
            charge()

    Arguments:
        name: A key of ``tuning_circuit_breakers``.
        app: The Celery app (default: the current app).
    """
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    return breaker_for(runtime_for(app), name)
