"""Celery signals sent by celery-tuning; connect to them like any Celery signal."""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["sla_breached", "task_timed"]

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
#: ``total`` (first publish to finish; None when the message was not stamped).
task_timed = Signal(
    name="task_timed",
    providing_args={"task_id", "queue", "wait", "run", "total", "state"},
)
