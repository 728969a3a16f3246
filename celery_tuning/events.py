"""One events sink: components emit typed events here; metrics, signals and logs subscribe.

Emitters call the module functions (:func:`limiter_event`, :func:`cache_event`,
:func:`breaker_transition`, :func:`task_timed`, :func:`sla_checked`, :func:`sla_breached`,
:func:`task_deferred`, and the parking events :func:`task_parked`, :func:`task_unparked`,
:func:`park_fallback`, :func:`parked_count`); each hands its arguments to the subscribers of its
:class:`Topic` (:meth:`Topic.emit`), in order.
With no subscriber an emit is a loop over an empty tuple: the hot path pays one check. A
subscriber that raises is logged and skipped, as Celery does for a signal's receivers: an
event never fails the task that emitted it.

Subscribers registered by celery-tuning itself, all in ``integration/``:

* metrics (``integration/metrics.py``, when ``tuning_metrics_port`` is set);
* the public Celery signals of :mod:`celery_tuning.signals` (``integration/signals.py``: each
  event is sent as the signal of the same name, with the same arguments, when it has receivers);
* logs (the SLA breach line, ``integration/receivers.py``).

This module imports nothing of Celery or Redis. Example::

    from celery_tuning import events

    def count(name: str, event: str, seconds: float) -> None:
        ...

    events.LIMITER.subscribe(count)
    events.limiter_event("openai", "acquired", 0.0)   # count("openai", "acquired", 0.0)
    events.LIMITER.unsubscribe(count)
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Generic, Optional, Protocol, Tuple, TypeVar

__all__ = [
    "BREAKER",
    "BREAKER_REJECTED",
    "CACHE",
    "DEBOUNCED",
    "DEDUPLICATED",
    "FAIR_COUNT",
    "FAIR_QUEUED",
    "FAIR_RELEASED",
    "LIMITER",
    "PARKED_COUNT",
    "PARK_FALLBACK",
    "SLA_BREACHED",
    "SLA_CHECKED",
    "TASK_DEFERRED",
    "TASK_PARKED",
    "TASK_TIMED",
    "TASK_UNPARKED",
    "BreakerRejectedSubscriber",
    "BreakerSubscriber",
    "CacheSubscriber",
    "DebounceSubscriber",
    "DedupeSubscriber",
    "FairCountSubscriber",
    "FairSubscriber",
    "LimiterSubscriber",
    "ParkSubscriber",
    "ParkedSubscriber",
    "SlaBreachedSubscriber",
    "SlaCheckedSubscriber",
    "TaskDeferredSubscriber",
    "TaskTimedSubscriber",
    "Topic",
    "breaker_rejected",
    "breaker_transition",
    "cache_event",
    "debounced",
    "deduplicated",
    "limiter_event",
    "park_fallback",
    "parked_count",
    "sla_breached",
    "sla_checked",
    "task_deferred",
    "task_parked",
    "task_timed",
    "task_unparked",
]

F = TypeVar("F")

logger = logging.getLogger("celery_tuning.events")


def _failed(subscriber: Any) -> None:
    logger.exception("celery-tuning: events subscriber %r failed", subscriber)


class Topic(Generic[F]):
    """Subscribers of one kind of event, called in order (a subscriber added ``first`` goes
    before the others). Subscribing twice is a no-op."""

    __slots__ = ("_lock", "name", "subscribers")

    def __init__(self, name: str) -> None:
        self.name = name
        #: Replaced, never mutated: an emit iterates a snapshot without taking a lock.
        self.subscribers: Tuple[F, ...] = ()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Topic {self.name} ({len(self.subscribers)} subscribers)>"

    def subscribe(self, subscriber: F, *, first: bool = False) -> F:
        """Call ``subscriber`` on every event of this topic; returns it (usable as a decorator)."""
        with self._lock:
            if subscriber not in self.subscribers:
                self.subscribers = ((subscriber, *self.subscribers) if first
                                    else (*self.subscribers, subscriber))
        return subscriber

    def unsubscribe(self, subscriber: F) -> None:
        with self._lock:
            self.subscribers = tuple(s for s in self.subscribers if s != subscriber)

    def emit(self, *args: Any, **kwargs: Any) -> None:
        """Call every subscriber with these arguments, in order. One that raises is logged and
        skipped: a subscriber's bug never fails the task (or the mover) that emitted."""
        for subscriber in self.subscribers:
            try:
                subscriber(*args, **kwargs)  # type: ignore[operator]
            except Exception:
                _failed(subscriber)


# -- the events ----------------------------------------------------------------------------------

class LimiterSubscriber(Protocol):
    def __call__(self, name: str, event: str, seconds: float, /) -> None: ...


class CacheSubscriber(Protocol):
    def __call__(self, task_name: str, event: str, /) -> None: ...


class BreakerSubscriber(Protocol):
    def __call__(self, name: str, old: str, new: str, reason: str, /) -> None: ...


class BreakerRejectedSubscriber(Protocol):
    def __call__(self, name: str, task_name: str, action: str, retry_after: float, /) -> None: ...


class TaskTimedSubscriber(Protocol):
    def __call__(self, *, sender: Any, task_id: str, queue: str, wait: Optional[float], run: float,
                 total: Optional[float], state: Optional[str], clamped: bool, cpu: float) -> None: ...


class SlaCheckedSubscriber(Protocol):
    def __call__(self, task: Any, queue: str, /) -> None: ...


class SlaBreachedSubscriber(Protocol):
    def __call__(self, *, sender: Any, task_id: str, queue: str, level: str, kind: str, measured: float,
                 threshold: float) -> None: ...


class TaskDeferredSubscriber(Protocol):
    def __call__(self, *, sender: Any, task_id: str, reason: str, countdown: float, deferrals: int) -> None: ...


class ParkSubscriber(Protocol):
    def __call__(self, reason: str, name: str, /) -> None: ...


class ParkedSubscriber(Protocol):
    def __call__(self, reason: str, name: str, parked: int, /) -> None: ...


class DedupeSubscriber(Protocol):
    def __call__(self, task_name: str, /) -> None: ...


class DebounceSubscriber(Protocol):
    def __call__(self, task_name: str, /) -> None: ...


class FairSubscriber(Protocol):
    def __call__(self, queue: str, count: int, /) -> None: ...


class FairCountSubscriber(Protocol):
    def __call__(self, queue: str, waiting: int, keys: int, in_window: int, /) -> None: ...


#: Rate-limit decisions: ``(name, event, seconds)``; event is 'acquired', 'waited', 'reserved',
#: 'rejected', 'throttled', 'fallback' or 'slot_expired' (a deferred task came back later than
#: ``tuning_rate_limit_slot_grace`` for its reserved slot, and takes its turn among the late
#: ones; seconds: how late).
LIMITER: Topic[LimiterSubscriber] = Topic("limiter")
#: Result-cache events: ``(task_name, event)`` ('hit_l1', 'hit_l2', 'miss', 'store', ...).
CACHE: Topic[CacheSubscriber] = Topic("cache")
#: Circuit-breaker state changes: ``(name, old, new, reason)`` ('observed' when another process
#: changed it).
BREAKER: Topic[BreakerSubscriber] = Topic("breaker")
#: An open breaker refused a task's call in its ``@circuit_breaker`` step:
#: ``(name, task_name, action, retry_after)``, action ``fallback``, ``fail`` or ``defer``.
BREAKER_REJECTED: Topic[BreakerRejectedSubscriber] = Topic("breaker_rejected")
#: A task attempt timed in the worker (keywords as the ``task_timed`` signal; sender: the task).
TASK_TIMED: Topic[TaskTimedSubscriber] = Topic("task_timed")
#: A task attempt checked against an SLA: ``(task, queue)``.
SLA_CHECKED: Topic[SlaCheckedSubscriber] = Topic("sla_checked")
#: An SLA threshold crossed (keywords as the ``sla_breached`` signal; sender: the task).
SLA_BREACHED: Topic[SlaBreachedSubscriber] = Topic("sla_breached")
#: A task re-published for later without a retry (keywords as the ``task_deferred`` signal).
TASK_DEFERRED: Topic[TaskDeferredSubscriber] = Topic("task_deferred")
#: A task was parked in the tuning Redis: ``(reason, name)`` (reason 'rate_limit', 'concurrency'
#: or 'circuit_open'; name: the limiter, concurrency limit or breaker).
TASK_PARKED: Topic[ParkSubscriber] = Topic("task_parked")
#: A mover published a parked task back to its queue: ``(reason, name)``.
TASK_UNPARKED: Topic[ParkSubscriber] = Topic("task_unparked")
#: Parking was asked for but the task was re-published with a countdown instead: ``(reason, why)``
#: (why: 'storage' when the tuning Redis failed, 'serializer' when the task is not sent as JSON,
#: 'encoding' when the call is not JSON-encodable).
PARK_FALLBACK: Topic[ParkSubscriber] = Topic("park_fallback")
#: A mover counted what is parked at a spot: ``(reason, name, parked)`` (due, waiting and claimed;
#: sent about every few seconds by each mover, only while someone subscribes).
PARKED_COUNT: Topic[ParkedSubscriber] = Topic("parked_count")
#: A ``@dedupe`` call found an identical call queued or running and was not published: ``(task_name,)``
#: (sent in the process that made the call, whatever ``on_duplicate`` then does).
DEDUPLICATED: Topic[DedupeSubscriber] = Topic("deduplicated")
#: A ``@debounce`` call collapsed into the pending run of its key (not published): ``(task_name,)``
#: (sent in the process that made the call).
DEBOUNCED: Topic[DebounceSubscriber] = Topic("debounced")
#: ``@fair`` calls joined their key's list in queue ``queue``: ``(queue, count)`` (sent in the
#: process that made the call; never per key).
FAIR_QUEUED: Topic[FairSubscriber] = Topic("fair_queued")
#: A fair dispatcher published ``count`` messages of queue ``queue``: ``(queue, count)``.
FAIR_RELEASED: Topic[FairSubscriber] = Topic("fair_released")
#: A fair dispatcher's view of a queue after a release: ``(queue, waiting, keys, in_window)``
#: (messages and keys waiting, messages released and not started; only while someone subscribes).
FAIR_COUNT: Topic[FairCountSubscriber] = Topic("fair_count")


def limiter_event(name: str, event: str, seconds: float = 0.0) -> None:
    """A rate limiter ``name`` decided or saw ``event`` (``seconds`` waited or reserved)."""
    LIMITER.emit(name, event, seconds)


def cache_event(task_name: str, event: str) -> None:
    """The result cache of ``task_name`` saw ``event``."""
    CACHE.emit(task_name, event)


def breaker_rejected(name: str, task_name: str, action: str, retry_after: float) -> None:
    """Breaker ``name`` was open for a call of ``task_name``, which then took ``action``."""
    BREAKER_REJECTED.emit(name, task_name, action, retry_after)


def breaker_transition(name: str, old: str, new: str, reason: str) -> None:
    """Breaker ``name`` went from ``old`` to ``new`` (``reason`` says why)."""
    BREAKER.emit(name, old, new, reason)


def task_timed(task: Any, task_id: str, queue: str, wait: Optional[float], run: float, total: Optional[float],
               state: Optional[str], clamped: bool, cpu: float) -> None:
    """A task attempt ended with these timings (seconds)."""
    TASK_TIMED.emit(sender=task, task_id=task_id, queue=queue, wait=wait, run=run, total=total, state=state,
                    clamped=clamped, cpu=cpu)


def sla_checked(task: Any, queue: str) -> None:
    """A task attempt was checked against an SLA (breached or not)."""
    SLA_CHECKED.emit(task, queue)


def sla_breached(task: Any, task_id: str, queue: str, level: str, kind: str, measured: float,
                 threshold: float) -> None:
    """A task attempt crossed an SLA threshold."""
    SLA_BREACHED.emit(sender=task, task_id=task_id, queue=queue, level=level, kind=kind, measured=measured,
                      threshold=threshold)


def task_deferred(task: Any, task_id: str, reason: str, countdown: float, deferrals: int) -> None:
    """A task was re-published for later without using a retry."""
    TASK_DEFERRED.emit(sender=task, task_id=task_id, reason=reason, countdown=countdown, deferrals=deferrals)


def task_parked(reason: str, name: str) -> None:
    """A task was parked at spot ``(reason, name)``."""
    TASK_PARKED.emit(reason, name)


def task_unparked(reason: str, name: str) -> None:
    """A parked task of spot ``(reason, name)`` was published back to its queue."""
    TASK_UNPARKED.emit(reason, name)


def park_fallback(reason: str, why: str) -> None:
    """A task that should have been parked was deferred with a countdown (``why``: 'storage',
    'serializer', 'encoding')."""
    PARK_FALLBACK.emit(reason, why)


def parked_count(reason: str, name: str, parked: int) -> None:
    """``parked`` tasks wait at spot ``(reason, name)`` now."""
    PARKED_COUNT.emit(reason, name, parked)


def deduplicated(task_name: str) -> None:
    """A ``@dedupe`` call of ``task_name`` was not published: an identical one is queued or running."""
    DEDUPLICATED.emit(task_name)


def debounced(task_name: str) -> None:
    """A ``@debounce`` call of ``task_name`` collapsed into the pending run of its key."""
    DEBOUNCED.emit(task_name)


def fair_queued(queue: str, count: int = 1) -> None:
    """``count`` ``@fair`` calls joined their key's list in ``queue``."""
    FAIR_QUEUED.emit(queue, count)


def fair_released(queue: str, count: int) -> None:
    """A fair dispatcher published ``count`` messages of ``queue``."""
    FAIR_RELEASED.emit(queue, count)


def fair_count(queue: str, waiting: int, keys: int, in_window: int) -> None:
    """``waiting`` fair messages of ``keys`` keys wait in ``queue``, ``in_window`` are released and not started."""
    FAIR_COUNT.emit(queue, waiting, keys, in_window)
