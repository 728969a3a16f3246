"""Celery signals sent by celery-tuning; connect to them like any Celery signal."""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "cache_event",
    "circuit_state_changed",
    "limiter_event",
    "sla_breached",
    "sla_checked",
    "task_deferred",
    "task_timed",
]

#: Sent in the worker when a task attempt crosses an SLA threshold.
#: ``sender`` is the task; keyword arguments: ``task_id``, ``queue``,
#: ``level`` ('warning' or 'critical'), ``kind`` ('wait', 'run' or 'total'),
#: ``measured`` and ``threshold`` (seconds).
sla_breached = Signal(
    name="sla_breached",
    providing_args={"task_id", "queue", "level", "kind", "measured", "threshold"},
)

#: Sent in the worker after every task attempt with its timings in seconds.
#: ``sender`` is the task; keyword arguments: ``task_id``, ``queue``,
#: ``wait`` (queue wait from max(publish, ETA) to start), ``run`` and
#: ``total`` (first publish to finish; None when the message was not stamped),
#: ``state``, ``clamped`` (the wait came out negative and was clamped to 0) and
#: ``cpu`` (CPU seconds of the thread that ran the task).
task_timed = Signal(
    name="task_timed",
    providing_args={"task_id", "queue", "wait", "run", "total", "state", "clamped", "cpu"},
)

#: Sent on every rate-limit decision. ``sender`` is the limiter name; keyword
#: arguments: ``event`` ('acquired', 'waited', 'reserved', 'rejected',
#: 'throttled', 'fallback') and ``seconds``. Never carries keys or arguments.
limiter_event = Signal(name="limiter_event", providing_args={"event", "seconds"})

#: Sent in the worker when a task is re-published for later without using a
#: retry. ``sender`` is the task; keyword arguments: ``task_id``, ``reason``
#: ('rate_limit', 'throttled', ...), ``countdown`` (seconds), ``deferrals``.
task_deferred = Signal(name="task_deferred", providing_args={"task_id", "reason", "countdown", "deferrals"})

#: Sent when a shared circuit breaker changes state, in the process that changed it
#: (``reason`` says why) and in every process that notices it (``reason='observed'``).
#: ``sender`` is the breaker name; keyword arguments: ``old``, ``new``, ``reason``.
circuit_state_changed = Signal(name="circuit_state_changed", providing_args={"old", "new", "reason"})

#: Sent on result-cache events. ``sender`` is the task name; keyword argument ``event``:
#: 'hit_l1', 'hit_l2', 'miss', 'store', 'wait', 'skip_too_big', 'skip_unserializable',
#: 'skip_arguments', 'corrupt', 'redis_error', 'invalidate'.
cache_event = Signal(name="cache_event", providing_args={"event"})

#: Sent in the worker for every task attempt checked against an SLA threshold (breached or
#: not): the denominator of SLA compliance. ``sender`` is the task; keyword argument ``queue``.
sla_checked = Signal(name="sla_checked", providing_args={"queue"})
