"""Celery signals sent by celery-tuning; connect to them like any Celery signal.

``sla_breached``, ``task_timed``, ``limiter_event``, ``task_deferred``, ``circuit_state_changed``,
``cache_event`` and ``sla_checked`` (documented in :mod:`celery_tuning.integration.signals`).
They are Celery ``Signal`` objects, so they live in ``integration/``; this public module loads them
on first use and imports nothing of Celery by itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

if TYPE_CHECKING:  # for type checkers only: at run time __getattr__ loads them
    from .integration.signals import (
        cache_event,
        circuit_state_changed,
        limiter_event,
        sla_breached,
        sla_checked,
        task_deferred,
        task_timed,
    )

__all__ = [
    "cache_event",
    "circuit_state_changed",
    "limiter_event",
    "sla_breached",
    "sla_checked",
    "task_deferred",
    "task_timed",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .integration import signals as _signals

        value = getattr(_signals, name)
        globals()[name] = value  # later look-ups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted([*globals(), *__all__])
