"""celery-tuning: distributed rate limits, shared breakers, result cache and SLA metrics for Celery."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: The one version source: setup.cfg reads it statically (``version = attr: ...``, nothing is
#: imported at build time), so the package metadata and ``celery_tuning.__version__`` agree.
__version__ = "0.1.0"

# Public names resolve lazily (PEP 562) so that importing a pure layer such as
# celery_tuning.policy does not drag in celery and redis.
_EXPORTS = {
    "ConfigurationError": "celery_tuning.errors",
    "RateLimited": "celery_tuning.errors",
    "StorageError": "celery_tuning.errors",
    "Throttled": "celery_tuning.errors",
    "TuningError": "celery_tuning.errors",
    "cache_result": "celery_tuning.decorators",
    "circuit_breaker": "celery_tuning.decorators",
    "rate_limit": "celery_tuning.decorators",
    "sla": "celery_tuning.decorators",
    "concurrency_limit": "celery_tuning.decorators",
    "ConcurrencyLimited": "celery_tuning.errors",
    "DuplicateTask": "celery_tuning.errors",
    "dedupe": "celery_tuning.decorators",
    "debounce": "celery_tuning.decorators",
    "fair": "celery_tuning.decorators",
    "install": "celery_tuning.integration.install",
    "stamp_headers": "celery_tuning.integration.receivers",
    "TunedTask": "celery_tuning.integration.task",
    "limiter": "celery_tuning.integration.registry",
    "breaker": "celery_tuning.integration.registry",
    "CircuitOpen": "celery_tuning.circuit",
    "SharedBreaker": "celery_tuning.circuit",
    "GcraLimiter": "celery_tuning.ratelimit",
}

__all__ = [
    "CircuitOpen",
    "ConcurrencyLimited",
    "ConfigurationError",
    "DuplicateTask",
    "GcraLimiter",
    "RateLimited",
    "SharedBreaker",
    "StorageError",
    "Throttled",
    "TunedTask",
    "TuningError",
    "breaker",
    "cache_result",
    "circuit_breaker",
    "concurrency_limit",
    "debounce",
    "dedupe",
    "fair",
    "install",
    "limiter",
    "rate_limit",
    "sla",
    "stamp_headers",
]


#: Submodules reachable as attributes without importing them first (``celery_tuning.signals.x``).
_SUBMODULES = ("events", "signals")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"celery_tuning.{name}")  # also sets it in globals()
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'celery_tuning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from .circuit import CircuitOpen, SharedBreaker
    from .decorators import cache_result, circuit_breaker, concurrency_limit, debounce, dedupe, fair, rate_limit, sla
    from .errors import (
        ConcurrencyLimited,
        ConfigurationError,
        DuplicateTask,
        RateLimited,
        StorageError,
        Throttled,
        TuningError,
    )
    from .integration.install import install
    from .integration.receivers import stamp_headers
    from .integration.registry import breaker, limiter
    from .integration.task import TunedTask
    from .ratelimit import GcraLimiter
