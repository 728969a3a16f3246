"""The Celery signals celery-tuning sends (public as :mod:`celery_tuning.signals`), fed by the events sink.

Each signal is a subscriber of the :mod:`celery_tuning.events` topic of the same name, connected
when this module is imported: nobody can connect a receiver to a signal before that. A signal
nobody listens to costs one check per event.
"""

from __future__ import annotations

from typing import Any, Optional

from celery.utils.dispatch import Signal

from .. import events
from ..signals import __all__ as __all__  # one list: the public module loads these by name

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
#: An attempt whose prefork pool process died under it (hard time limit, SIGKILL, a terminating
#: revoke) is sent by the worker's main process: ``run`` up to when it learned of the loss, ``state``
#: 'FAILURE' (or 'REVOKED'), ``cpu`` 0.
task_timed = Signal(
    name="task_timed",
    providing_args={"task_id", "queue", "wait", "run", "total", "state", "clamped", "cpu"},
)

#: Sent on every rate-limit decision. ``sender`` is the limiter name; keyword
#: arguments: ``event`` ('acquired', 'waited', 'reserved', 'rejected',
#: 'throttled', 'fallback', 'slot_expired') and ``seconds``. Never carries keys or arguments.
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


# -- the events sink's subscribers ------------------------------------------------------------------

def _send_limiter_event(name: str, event: str, seconds: float) -> None:
    if limiter_event.receivers:
        limiter_event.send(sender=name, event=event, seconds=seconds)


def _send_cache_event(task_name: str, event: str) -> None:
    if cache_event.receivers:
        cache_event.send(sender=task_name, event=event)


def _send_circuit_state_changed(name: str, old: str, new: str, reason: str) -> None:
    circuit_state_changed.send(sender=name, old=old, new=new, reason=reason)


def _send_task_timed(*, sender: Any, task_id: str, queue: str, wait: Optional[float], run: float,
                     total: Optional[float], state: Optional[str], clamped: bool, cpu: float) -> None:
    if task_timed.receivers:
        task_timed.send(sender=sender, task_id=task_id, queue=queue, wait=wait, run=run, total=total,
                        state=state, clamped=clamped, cpu=cpu)


def _send_sla_checked(task: Any, queue: str) -> None:
    if sla_checked.receivers:
        sla_checked.send(sender=task, queue=queue)


def _send_sla_breached(*, sender: Any, task_id: str, queue: str, level: str, kind: str, measured: float,
                       threshold: float) -> None:
    sla_breached.send(sender=sender, task_id=task_id, queue=queue, level=level, kind=kind, measured=measured,
                      threshold=threshold)


def _send_task_deferred(*, sender: Any, task_id: str, reason: str, countdown: float, deferrals: int) -> None:
    task_deferred.send(sender=sender, task_id=task_id, reason=reason, countdown=countdown, deferrals=deferrals)


events.LIMITER.subscribe(_send_limiter_event)
events.CACHE.subscribe(_send_cache_event)
events.BREAKER.subscribe(_send_circuit_state_changed)
events.TASK_TIMED.subscribe(_send_task_timed)
events.SLA_CHECKED.subscribe(_send_sla_checked)
events.SLA_BREACHED.subscribe(_send_sla_breached)
events.TASK_DEFERRED.subscribe(_send_task_deferred)
