"""Breakers of one app (kept for imports): they live in :mod:`celery_tuning.integration.registry`."""

from __future__ import annotations

from .interactions import NOT_A_FAILURE
from .registry import breaker, breaker_for

__all__ = ["CONTROL_FLOW", "breaker", "breaker_for"]

#: Exceptions that steer Celery or come from our own limits rather than report a broken service:
#: never failures (read from the interaction table).
CONTROL_FLOW = NOT_A_FAILURE
