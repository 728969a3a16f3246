"""Limiters of one app (kept for imports): they live in :mod:`celery_tuning.integration.registry`."""

from __future__ import annotations

from .registry import limiter, limiter_for

__all__ = ["limiter", "limiter_for"]
