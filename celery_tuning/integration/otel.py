"""OpenTelemetry: celery-tuning's events as span events and attributes on the current span.

With ``opentelemetry-api`` installed (``pip install "celery-tuning[otel]"``) and
``tuning_opentelemetry`` not False, :func:`connect_tracing` subscribes to the topics of
:mod:`celery_tuning.events` and records each event on ``opentelemetry.trace.get_current_span()``
when that span is recording. Under ``opentelemetry-instrumentation-celery`` that is the task's
``run/<task name>`` span: the instrumentation starts it in ``task_prerun`` and makes it current in
the worker thread until ``task_postrun``, and every step of a tuned task runs in between, in that
thread. A deferral re-publishes inside its own ``apply_async/<task name>`` span, which is current
only while the message is handed to the broker: the ``celery_tuning.deferred`` event that follows
lands on the run span again.

Cost: nothing is subscribed when opentelemetry-api is not installed or the setting is False; with
the API but no SDK (or no instrumentation) the current span is not recording and each event costs
one context look-up and one ``is_recording()`` check.

Attributes carry names (task, limiter, breaker, concurrency limit), reasons and numbers: never task
arguments, cache keys or per-key limiter keys (limiter events carry the limiter's name only).
See docs/opentelemetry.md for the list.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Union

from celery import signals as celery_signals
from celery._state import get_current_task

from .. import events
from ..circuit import CircuitOpen
from ..errors import ConfigurationError
from .deferral import deferrals_of
from .runtime import installed_runtime

__all__ = [
    "ATTR_BREAKER_ACTION",
    "ATTR_BREAKER_NAME",
    "ATTR_BREAKER_OLD_STATE",
    "ATTR_BREAKER_REASON",
    "ATTR_BREAKER_RETRY_AFTER",
    "ATTR_BREAKER_STATE",
    "ATTR_CACHE_LEVEL",
    "ATTR_CACHE_RESULT",
    "ATTR_DEFERRALS",
    "ATTR_DEFER_COUNTDOWN",
    "ATTR_DEFER_DUE",
    "ATTR_DEFER_REASON",
    "ATTR_LIMITER_NAME",
    "ATTR_LIMITER_SECONDS",
    "ATTR_PARK_FALLBACK",
    "ATTR_PARK_NAME",
    "ATTR_PARK_REASON",
    "ATTR_RATE_LIMIT_WAIT",
    "ATTR_TASK",
    "EVENT_BREAKER_REJECTED",
    "EVENT_BREAKER_STATE_CHANGED",
    "EVENT_CACHE",
    "EVENT_DEFERRED",
    "EVENT_PARKED",
    "EVENT_PARK_FALLBACK",
    "EVENT_RATE_LIMIT",
    "HEADER_TRACE",
    "available",
    "connect_tracing",
    "continued_trace",
    "disconnect_tracing",
    "trace_carrier",
    "tracing_connected",
]

logger = logging.getLogger("celery_tuning.otel")

#: Prefix of the rate-limit events: ``celery_tuning.rate_limit.acquired``, ``.waited``, ``.reserved``,
#: ``.rejected``, ``.throttled``, ``.fallback``, ``.slot_expired`` (the limiter's decision or event).
EVENT_RATE_LIMIT = "celery_tuning.rate_limit."
#: Prefix of the result-cache events: ``celery_tuning.cache.hit`` (with the level), ``.miss``,
#: ``.wait`` (a single-flight follower waits for the leader), ``.store``, ``.corrupt``, ...
EVENT_CACHE = "celery_tuning.cache."
#: A circuit breaker changed state (this call opened or closed it, or saw another process do it).
EVENT_BREAKER_STATE_CHANGED = "celery_tuning.breaker.state_changed"
#: An open (or half-open, trial elsewhere) breaker refused the call: it was deferred, answered by the
#: fallback, or failed.
EVENT_BREAKER_REJECTED = "celery_tuning.breaker.rejected"
#: The task was deferred without a retry: re-published with a countdown, or parked.
EVENT_DEFERRED = "celery_tuning.deferred"
#: The task was parked in the tuning Redis (followed by :data:`EVENT_DEFERRED`).
EVENT_PARKED = "celery_tuning.parked"
#: Parking was asked for but the task was deferred with a countdown instead.
EVENT_PARK_FALLBACK = "celery_tuning.park_fallback"

#: Limiter name (from ``tuning_rate_limits``, or the task's name for an inline rate).
ATTR_LIMITER_NAME = "celery_tuning.rate_limit.name"
#: Seconds: waited (``waited``), until the reserved slot (``reserved``, ``rejected``), paused
#: (``throttled``), late for the slot (``slot_expired``); 0 otherwise.
ATTR_LIMITER_SECONDS = "celery_tuning.rate_limit.seconds"
#: Span attribute: seconds this call slept for its rate-limit slot (the last wait, for stacked limits).
ATTR_RATE_LIMIT_WAIT = "celery_tuning.rate_limit.wait"
#: The tuned task's name (cache events: the publish side may record them outside the task's span).
ATTR_TASK = "celery_tuning.task"
#: ``l1`` (this process's memory) or ``l2`` (Redis), on ``celery_tuning.cache.hit``.
ATTR_CACHE_LEVEL = "celery_tuning.cache.level"
#: Span attribute: ``hit_l1``, ``hit_l2`` or ``miss``, the cache's last answer for this call.
ATTR_CACHE_RESULT = "celery_tuning.cache.result"
ATTR_BREAKER_NAME = "celery_tuning.breaker.name"
ATTR_BREAKER_OLD_STATE = "celery_tuning.breaker.old_state"
#: ``closed``, ``open`` or ``half-open`` (the new state, on a state change).
ATTR_BREAKER_STATE = "celery_tuning.breaker.state"
#: Why the state changed (``'3 consecutive failures, last TimeoutError'``, ``'observed'``, ``'manual'``...).
ATTR_BREAKER_REASON = "celery_tuning.breaker.reason"
#: What the refused call did: ``defer`` (re-published or parked), ``fallback`` (the decorator's
#: ``fallback=`` answered), ``fail`` (raised CircuitOpen) or ``retry`` (CircuitOpen made Celery retry
#: it: ``autoretry_for``).
ATTR_BREAKER_ACTION = "celery_tuning.breaker.action"
#: Seconds until the breaker lets a trial call through.
ATTR_BREAKER_RETRY_AFTER = "celery_tuning.breaker.retry_after"
#: ``rate_limit``, ``throttled``, ``concurrency_limit`` or ``circuit_open``.
ATTR_DEFER_REASON = "celery_tuning.defer.reason"
#: Seconds until the task is published again (0 for a parked concurrency-limited task: it waits
#: for a slot to be given back, not for a time).
ATTR_DEFER_COUNTDOWN = "celery_tuning.defer.countdown"
#: When the task is due again (epoch seconds, this process's clock); absent when the countdown is 0.
ATTR_DEFER_DUE = "celery_tuning.defer.due"
#: Deferrals of this task so far, counting this one (also set on the span of a run that was deferred
#: before, from the message's deferral header, when any event is recorded on it).
ATTR_DEFERRALS = "celery_tuning.deferrals"
#: ``rate_limit``, ``concurrency`` or ``circuit_open``.
ATTR_PARK_REASON = "celery_tuning.park.reason"
#: The limiter, concurrency limit or breaker the task is parked for.
ATTR_PARK_NAME = "celery_tuning.park.name"
#: Why parking fell back to a countdown: ``storage``, ``serializer`` or ``encoding``.
ATTR_PARK_FALLBACK = "celery_tuning.park.fallback"

#: Message header of a parked call: the parking run's trace context (W3C ``traceparent`` and
#: ``tracestate``), which the mover makes current while it publishes the call back, so the run that
#: follows is in the same trace.
HEADER_TRACE = "tuning_trace"

Attributes = Dict[str, Union[str, float, int, bool]]

_lock = threading.Lock()
_connected = False
#: ``opentelemetry.trace.get_current_span``, imported by :func:`connect_tracing`.
_get_current_span: Optional[Callable[[], Any]] = None


def available() -> bool:
    """Whether ``opentelemetry-api`` can be imported here."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


def connect_tracing(setting: Optional[bool] = None) -> bool:
    """Record celery-tuning's events on the current OpenTelemetry span, in this process (idempotent).

    Called by ``install()`` when Celery configures an app whose ``tuning_opentelemetry`` is not
    False. The subscription is process-wide; inside a task, an event is recorded only when the
    task's app allows it (``tuning_opentelemetry`` not False), so one app turning it off in a
    process shared with others records nothing for its tasks.

    Arguments:
        setting: The app's ``tuning_opentelemetry``: None connects when opentelemetry-api is
            installed, True requires it, False connects nothing.

    Returns:
        Whether events are recorded in this process from now on.

    Raises:
        ConfigurationError: ``setting`` is True and opentelemetry-api is not installed.
    """
    global _connected, _get_current_span
    if setting is False:
        return _connected
    if not available():
        if setting:
            raise ConfigurationError(
                "tuning_opentelemetry: True but opentelemetry-api is not installed; "
                "pip install 'celery-tuning[otel]', or leave the setting at None (on when installed)")
        return False
    with _lock:
        if _connected:
            return True
        from opentelemetry.trace import get_current_span

        _get_current_span = get_current_span
        events.LIMITER.subscribe(_on_limiter)
        events.CACHE.subscribe(_on_cache)
        events.BREAKER.subscribe(_on_breaker)
        events.BREAKER_REJECTED.subscribe(_on_breaker_rejected)
        events.TASK_DEFERRED.subscribe(_on_deferred)
        events.TASK_PARKED.subscribe(_on_parked)
        events.PARK_FALLBACK.subscribe(_on_park_fallback)
        # CircuitOpen raised out of the task (on_open='fail', or a breaker used inline): no topic says
        # so; Celery sends these in the worker thread before task_postrun ends the run span.
        celery_signals.task_failure.connect(_on_task_failure, weak=False, dispatch_uid=_FAILURE_UID)
        celery_signals.task_retry.connect(_on_task_retry, weak=False, dispatch_uid=_RETRY_UID)
        _connected = True
    logger.debug("celery-tuning: recording events on OpenTelemetry spans")
    return True


def disconnect_tracing() -> None:
    """Stop recording events on spans in this process (tests; undoes :func:`connect_tracing`)."""
    global _connected
    with _lock:
        events.LIMITER.unsubscribe(_on_limiter)
        events.CACHE.unsubscribe(_on_cache)
        events.BREAKER.unsubscribe(_on_breaker)
        events.BREAKER_REJECTED.unsubscribe(_on_breaker_rejected)
        events.TASK_DEFERRED.unsubscribe(_on_deferred)
        events.TASK_PARKED.unsubscribe(_on_parked)
        events.PARK_FALLBACK.unsubscribe(_on_park_fallback)
        celery_signals.task_failure.disconnect(_on_task_failure, dispatch_uid=_FAILURE_UID)
        celery_signals.task_retry.disconnect(_on_task_retry, dispatch_uid=_RETRY_UID)
        _connected = False


def tracing_connected() -> bool:
    """Whether :func:`connect_tracing` is in effect in this process."""
    return _connected


_FAILURE_UID = "celery_tuning.otel.failure"
_RETRY_UID = "celery_tuning.otel.retry"


def _wanted_by(task: Any) -> bool:
    """False when the task's app turned recording off (the subscription serves every app here)."""
    runtime = installed_runtime(getattr(task, "_app", None))
    if runtime is None:
        return True
    try:
        return runtime.config.opentelemetry is not False
    except ConfigurationError:
        return False


def _span(task: Any = None) -> Any:
    """The current span if it is recording and the current task's app wants events, else None."""
    get_span = _get_current_span
    if get_span is None:
        return None
    span = get_span()
    if not span.is_recording():
        return None  # no SDK, no instrumentation, or not sampled: the whole cost is this check
    if task is None:
        task = get_current_task()
    if task is not None:
        if not _wanted_by(task):
            return None
        deferrals = deferrals_of(task.request)
        if deferrals:
            span.set_attribute(ATTR_DEFERRALS, deferrals)
    return span


def _on_limiter(name: str, event: str, seconds: float) -> None:
    span = _span()
    if span is None:
        return
    span.add_event(EVENT_RATE_LIMIT + event, {ATTR_LIMITER_NAME: name, ATTR_LIMITER_SECONDS: float(seconds)})
    if event == "waited":
        span.set_attribute(ATTR_RATE_LIMIT_WAIT, float(seconds))


def _on_cache(task_name: str, event: str) -> None:
    span = _span()
    if span is None:
        return
    attributes: Attributes = {ATTR_TASK: task_name}
    if event.startswith("hit_"):
        attributes[ATTR_CACHE_LEVEL] = event[len("hit_"):]
        span.add_event(EVENT_CACHE + "hit", attributes)
        span.set_attribute(ATTR_CACHE_RESULT, event)
        return
    span.add_event(EVENT_CACHE + event, attributes)
    if event == "miss":
        span.set_attribute(ATTR_CACHE_RESULT, event)


def _on_breaker(name: str, old: str, new: str, reason: str) -> None:
    span = _span()
    if span is None:
        return
    span.add_event(EVENT_BREAKER_STATE_CHANGED, {
        ATTR_BREAKER_NAME: name, ATTR_BREAKER_OLD_STATE: old, ATTR_BREAKER_STATE: new, ATTR_BREAKER_REASON: reason,
    })


def _on_deferred(*, sender: Any, task_id: str, reason: str, countdown: float, deferrals: int) -> None:
    span = _span(sender)
    if span is None:
        return
    attributes: Attributes = {
        ATTR_DEFER_REASON: reason, ATTR_DEFER_COUNTDOWN: float(countdown), ATTR_DEFERRALS: int(deferrals),
    }
    if countdown > 0:
        attributes[ATTR_DEFER_DUE] = time.time() + countdown
    span.add_event(EVENT_DEFERRED, attributes)
    span.set_attribute(ATTR_DEFERRALS, int(deferrals))
    span.set_attribute(ATTR_DEFER_REASON, reason)


def _on_breaker_rejected(name: str, task_name: str, action: str, retry_after: float) -> None:
    # 'fail' is recorded from what Celery does with the CircuitOpen (task_failure, or task_retry under
    # autoretry_for), which also covers a breaker used inline in the body: not twice here.
    if action == "fail":
        return
    span = _span()
    if span is None:
        return
    span.add_event(EVENT_BREAKER_REJECTED, {
        ATTR_BREAKER_NAME: name, ATTR_BREAKER_ACTION: action, ATTR_BREAKER_RETRY_AFTER: float(retry_after),
    })


def _on_parked(reason: str, name: str) -> None:
    span = _span()
    if span is None:
        return
    span.add_event(EVENT_PARKED, {ATTR_PARK_REASON: reason, ATTR_PARK_NAME: name})


def _on_park_fallback(reason: str, why: str) -> None:
    span = _span()
    if span is None:
        return
    span.add_event(EVENT_PARK_FALLBACK, {ATTR_PARK_REASON: reason, ATTR_PARK_FALLBACK: why})


def _rejected(task: Any, exc: Any, action: str) -> None:
    if not isinstance(exc, CircuitOpen):
        return
    span = _span(task)
    if span is None:
        return
    span.add_event(EVENT_BREAKER_REJECTED, {
        ATTR_BREAKER_NAME: exc.name, ATTR_BREAKER_ACTION: action, ATTR_BREAKER_RETRY_AFTER: exc.retry_after,
    })


def _on_task_failure(sender: Any = None, exception: Any = None, **_: Any) -> None:
    _rejected(sender, exception, "fail")


def _on_task_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    _rejected(sender, reason, "retry")


def trace_carrier() -> Optional[Dict[str, str]]:
    """The current span's context as W3C headers, for a call parked now; None when nothing records."""
    span = _span()
    if span is None:
        return None
    from opentelemetry import propagate

    carrier: Dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


@contextmanager
def continued_trace(carrier: Any) -> Iterator[None]:
    """Make the context in ``carrier`` (a parked call's :data:`HEADER_TRACE`) current meanwhile.

    The mover publishes parked calls from a thread with no span of its own; under this context the
    instrumentation's ``apply_async`` span is a child of the run that parked the call.
    """
    if not _connected or not isinstance(carrier, dict) or not carrier:
        yield
        return
    from opentelemetry import context, propagate

    try:
        token = context.attach(propagate.extract({str(k): str(v) for k, v in carrier.items()}))
    except Exception:  # a foreign or corrupt header: publish without it
        yield
        return
    try:
        yield
    finally:
        context.detach(token)
