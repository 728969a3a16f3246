"""Re-publishing a task for later without spending one of its retries."""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Dict, NoReturn, Optional

from celery.exceptions import Ignore

from .. import events

__all__ = ["HEADER_DEFERRALS", "defer", "deferrals_of", "is_eager", "jitter", "warn_beyond_visibility"]

#: How many times this task id has been deferred (its own budget, apart from retries).
HEADER_DEFERRALS = "tuning_deferrals"


def warn_beyond_visibility(app: Any, what: str, max_defer: float) -> None:
    """Warn (once, at bind time) when ``max_defer`` can outlast the Redis broker's visibility timeout.

    A deferral is a countdown message; on the Redis transport one held past ``visibility_timeout``
    is delivered again, so the task would run twice.
    """
    broker = str(app.conf.broker_url or "")
    if not broker.startswith(("redis", "rediss", "sentinel")):
        return
    options = app.conf.broker_transport_options or {}
    visibility = float(options.get("visibility_timeout", 3600))
    if max_defer >= visibility:
        warnings.warn(
            f"{what} can defer a task beyond the Redis broker's visibility_timeout ({visibility:g}s), "
            "which redelivers it; lower max_defer or raise broker_transport_options['visibility_timeout']",
            stacklevel=3,
        )


def is_eager(request: Any) -> bool:
    """Whether the task runs without a broker (``apply()`` or a direct call): nothing to defer through."""
    return bool(getattr(request, "is_eager", False) or getattr(request, "called_directly", False))


def deferrals_of(request: Any) -> int:
    """Deferrals so far, from the message headers (0 for a fresh task)."""
    value = (getattr(request, "headers", None) or {}).get(HEADER_DEFERRALS)
    if value is None:
        value = getattr(request, HEADER_DEFERRALS, 0)
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def jitter(countdown: float) -> float:
    """A little spread so deferred tasks from one instant do not return in the same millisecond."""
    return countdown + random.uniform(0.0, min(0.05, countdown * 0.02))


def defer(
    task: Any,
    countdown: float,
    *,
    reason: str,
    max_deferrals: int,
    on_exhausted: Callable[[int], BaseException],
    headers: Optional[Dict[str, Any]] = None,
) -> NoReturn:
    """Publish the current task again (same id, same retries count) and stop this attempt.

    ``Task.retry`` would add one to ``request.retries`` and fire retry handlers;
    here a header counter (:data:`HEADER_DEFERRALS`) with its own cap counts
    deferrals instead, and the attempt ends with :class:`celery.exceptions.Ignore`
    so the message is acknowledged without touching the task's state: the
    result stays pending until the re-published message runs.

    Raises:
        celery.exceptions.Ignore: Always, after publishing.
        BaseException: ``on_exhausted(count)`` when the deferral budget is spent.
    """
    request = task.request
    count = deferrals_of(request) + 1
    if count > max_deferrals:
        raise on_exhausted(count - 1)
    new_headers = dict(getattr(request, "headers", None) or {})
    new_headers[HEADER_DEFERRALS] = count
    if headers:
        new_headers.update(headers)
    countdown = max(0.0, countdown)
    signature = task.signature_from_request(request, countdown=countdown, headers=new_headers)
    signature.apply_async()
    events.task_deferred(task, request.id, reason, countdown, count)  # metrics, the task_deferred signal
    raise Ignore(f"deferred by celery-tuning ({reason}) for {countdown:.3f}s")
