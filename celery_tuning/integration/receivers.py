"""Signal receivers: publish-time header stamping and worker-side timing/SLA checks."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any, Dict, Optional, Tuple

from celery import signals as celery_signals

from .. import events
from ..policy.attach import SlaPolicy
from ..policy.timing import breach, compute_timings
from .runtime import installed_runtime

__all__ = [
    "HEADER_PUBLISHED",
    "HEADER_SENT",
    "connect_publish_receivers",
    "connect_timing_receivers",
    "stamp_headers",
    "timing_connected",
    "timing_wanted",
]

logger = logging.getLogger("celery_tuning.sla")

#: First publish time (publisher wall clock, epoch seconds); kept by retries.
HEADER_PUBLISHED = "tuning_published_at"
#: This attempt's publish time.
HEADER_SENT = "tuning_sent_at"

_publish_connected = False
_timing_connected = False
_connect_lock = threading.Lock()

# task id -> (wall, monotonic and thread-CPU start); several threads may run tasks.
_started: Dict[str, Tuple[float, float, float]] = {}


def stamp_headers(headers: Dict[str, Any], now: Optional[float] = None) -> Dict[str, Any]:
    """Stamp publish times into message ``headers`` (in place) and return them.

    Producers that do not install celery-tuning (``send_task`` from another
    service) can call this on the ``headers=`` they pass to get queue-wait
    figures too.
    """
    now = time.time() if now is None else now
    headers.setdefault(HEADER_PUBLISHED, now)
    headers[HEADER_SENT] = now
    return headers


def _on_before_publish(sender: Any = None, headers: Optional[Dict[str, Any]] = None,
                       **_: Any) -> None:
    if headers is None:
        return
    # Message protocol 2: custom headers sit in the message headers and come
    # back in the worker as request attributes and request.headers.
    stamp_headers(headers)


#: The queue label of a message whose routing key leads to none of the app's queues. Labels are
#: queue names, never raw routing keys: on a topic exchange every key (``orders.eu.1234``) would
#: otherwise be a series of its own, and so would every SLA lookup keyed by it.
OTHER_QUEUE = "other"
_MAX_ROUTES = 4096
# (app id, queues known, queues consumed, exchange, routing key) -> label; the counts make a queue
# added at run time (``add_consumer``) count from then on. Cleared when full: labels are cheap.
_routes: Dict[Tuple[int, int, int, str, str], str] = {}


def queue_label(app: Any, delivery_info: Any, declared: Optional[str] = None) -> str:
    """The queue a message came from, as a bounded label: one of ``app``'s queues or ``other``.

    ``delivery_info`` is the request's (exchange and routing key, or the queue name some transports
    give); ``declared`` is the task's own ``queue``, used when the message names neither.
    """
    info = delivery_info or {}
    key = str(info.get("routing_key") or info.get("queue") or "")
    exchange = str(info.get("exchange") or "")
    default = str(declared or app.conf.task_default_queue or "celery")
    if not key and not exchange:
        return default
    try:
        queues = app.amqp.queues
        consumed = queues.consume_from  # the worker's -Q selection; every queue elsewhere
    except Exception:  # an app whose amqp cannot be set up still gets a label
        return OTHER_QUEUE
    memo = (id(app), len(queues), len(consumed), exchange, key)
    label = _routes.get(memo)
    if label is None:
        # The queues this process consumes first: a message reached it through one of them.
        label = _route(consumed, exchange, key) or _route(queues, exchange, key) or (
            default if not key else OTHER_QUEUE)
        if len(_routes) >= _MAX_ROUTES:
            _routes.clear()
        _routes[memo] = label
    return label


def _route(queues: Any, exchange: str, key: str) -> Optional[str]:
    """The first of ``queues`` bound to (``exchange``, ``key``), by its stable name."""
    if key and key in queues:
        return key
    words = key.split(".")
    for name, queue in list(queues.items()):
        ex = getattr(queue, "exchange", None)
        ex_name, kind = str(getattr(ex, "name", "") or ""), getattr(ex, "type", "direct")
        if exchange and ex_name and ex_name != exchange:
            continue  # bound to another exchange: a fanout there is no wildcard for this message
        if kind == "fanout":
            if exchange and ex_name == exchange:
                # kombu's Broadcast queues get a fresh uuid name per process: label the stable alias
                return str(getattr(queue, "alias", None) or name)
            continue
        bindings = [getattr(queue, "routing_key", None)]
        bindings += [getattr(b, "routing_key", None) for b in (getattr(queue, "bindings", None) or ())]
        for binding in bindings:
            if binding == key or (kind == "topic" and binding and _topic_match(binding.split("."), words)):
                return str(name)
    return None


def _topic_match(pattern: Any, words: Any) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_match(rest, words[1:])


def _queue_of(task: Any, request: Any = None) -> str:
    """The queue label of a running task (see :func:`queue_label`)."""
    info = getattr(request if request is not None else task.request, "delivery_info", None)
    return queue_label(task.app, info, getattr(task, "queue", None))


def _eta_seconds(eta: Any) -> Optional[float]:
    if not eta:
        return None
    if isinstance(eta, datetime):
        return eta.timestamp()
    try:
        return datetime.fromisoformat(str(eta)).timestamp()
    except ValueError:
        return None


def _header(request: Any, name: str) -> Optional[float]:
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None  # a foreign producer wrote something else: treat as unstamped


def _on_prerun(sender: Any = None, task_id: Optional[str] = None, task: Any = None,
               **_: Any) -> None:
    # Only the clocks here: everything else is read once, in postrun, from the same request.
    if task_id is not None:
        _started[task_id] = (time.time(), time.perf_counter(), time.thread_time())


def _runtime_of(task: Any) -> Any:
    """The installed runtime of the task's app (cached per task class), or None."""
    cls = type(task)
    try:
        return _task_runtimes[cls]
    except KeyError:
        runtime = installed_runtime(task.app)
        if runtime is not None:  # cache only a positive answer: install() may come later
            _task_runtimes[cls] = runtime
        return runtime


_task_runtimes: Dict[type, Any] = {}


def _on_postrun(sender: Any = None, task_id: Optional[str] = None, task: Any = None,
                state: Optional[str] = None, **_: Any) -> None:
    if task_id is None or task is None:
        return
    start = _started.pop(task_id, None)
    if start is None:
        return
    finished_wall, finished_perf, finished_cpu = time.time(), time.perf_counter(), time.thread_time()
    runtime = _runtime_of(task)
    if runtime is None:
        return
    request = task.request  # the same Context object the task ran with
    if request.called_directly or request.is_eager:
        return
    started_wall, started_perf, started_cpu = start
    queue = _queue_of(task, request)
    eta = request.eta
    timings = compute_timings(
        sent_at=_header(request, HEADER_SENT),
        published_at=_header(request, HEADER_PUBLISHED),
        eta=_eta_seconds(eta) if eta else None,
        started_wall=started_wall,
        finished_wall=finished_wall,
        run=finished_perf - started_perf,
    )
    cpu = max(0.0, finished_cpu - started_cpu)  # CPU of the thread that ran the task
    if events.TASK_TIMED.subscribers:  # metrics and the task_timed signal
        events.task_timed(task, task_id, queue, timings.wait, timings.run, timings.total, state, timings.clamped,
                          cpu)
    policy = _sla_policy(runtime, task, queue)
    if policy is not None:
        _check_sla(policy, task, task_id, queue, timings)


# (runtime id, task class, queue) -> the SLA that applies, or None; bounded by tasks x queues.
_sla_policies: Dict[Tuple[int, type, str], Optional[SlaPolicy]] = {}


def _sla_policy(runtime: Any, task: Any, queue: str) -> Optional[SlaPolicy]:
    key = (id(runtime), type(task), queue)
    try:
        return _sla_policies[key]
    except KeyError:
        pass
    policy = getattr(type(task), "_tuning_policies", {}).get("sla")
    if policy is None:
        spec = runtime.config.sla.get(queue) or runtime.config.sla.get("*")  # '*': every other queue
        if spec is not None:
            policy = SlaPolicy(warning=spec.get("warning"), critical=spec.get("critical"),
                               on=spec.get("on", "total"))
    _sla_policies[key] = policy
    return policy


def _check_sla(policy: SlaPolicy, task: Any, task_id: str, queue: str, timings: Any) -> None:
    measured = getattr(timings, policy.on)
    if measured is not None:
        events.sla_checked(task, queue)
    crossed = breach(measured, policy.warning, policy.critical)
    if crossed is None:
        return
    level, threshold = crossed
    events.sla_breached(task, task_id, queue, level, policy.on, measured, threshold)


def _log_sla_breach(*, sender: Any, task_id: str, queue: str, level: str, kind: str, measured: float,
                    threshold: float) -> None:
    log = logger.error if level == "critical" else logger.warning
    log("SLA %s breached: task=%s id=%s queue=%s %s=%.3fs threshold=%.3fs",
        level, sender.name, task_id, queue, kind, measured, threshold)


# The log line comes first, before metrics and the signal's receivers, as it always did.
events.SLA_BREACHED.subscribe(_log_sla_breach, first=True)


def connect_publish_receivers() -> None:
    """Stamp every message this process publishes (producers included). Once per process."""
    global _publish_connected
    with _connect_lock:
        if not _publish_connected:
            celery_signals.before_task_publish.connect(
                _on_before_publish, weak=False, dispatch_uid="celery_tuning.stamp")
            _publish_connected = True


def _break_ignore_cycle(sender: Any = None, retval: Any = None, state: Any = None, **_: Any) -> None:
    # An attempt that ends with Ignore (every deferral, parked or not) or Reject leaves a reference
    # cycle: Celery's tracer frame holds the exception in its locals, and the exception's
    # traceback holds that frame (celery.app.trace.trace_task; its traceback_clear cannot clear a
    # frame still running). Each cycle keeps ~80 KiB (billiard's ExceptionInfo copies the
    # tracer's code positions) until a full collection, which comes every ~1,300 such attempts:
    # a deferring worker's pool children grew from 44 to ~160 MB. task_postrun runs inside that
    # frame after everything has used the exception; dropping its traceback breaks the cycle.
    if state in _IGNORED_STATES and isinstance(retval, BaseException):
        retval.__traceback__ = None


_IGNORED_STATES = frozenset({"IGNORED", "REJECTED"})
_cycle_breaker_connected = False


def connect_ignore_cycle_breaker() -> None:
    """Free what an ignored or rejected attempt leaves at once, not at the next full collection.
    Once per process, from the first deferral (a worker that never defers keeps Celery's
    signal-free fast path)."""
    global _cycle_breaker_connected
    if _cycle_breaker_connected:
        return
    with _connect_lock:
        if not _cycle_breaker_connected:
            celery_signals.task_postrun.connect(
                _break_ignore_cycle, weak=False, dispatch_uid="celery_tuning.ignore_cycle")
            _cycle_breaker_connected = True


def connect_timing_receivers() -> None:
    """Time every task attempt in this process. Once per process.

    Only connected when something consumes the timings (see ``tuning_timing``):
    Celery's tracer skips signal dispatch entirely while a signal has no
    receivers, which keeps pass-through workers at plain-Celery cost.
    """
    global _timing_connected
    with _connect_lock:
        if not _timing_connected:
            celery_signals.task_prerun.connect(
                _on_prerun, weak=False, dispatch_uid="celery_tuning.prerun")
            celery_signals.task_postrun.connect(
                _on_postrun, weak=False, dispatch_uid="celery_tuning.postrun")
            _timing_connected = True


def timing_connected() -> bool:
    """Whether this process times task attempts (:func:`connect_timing_receivers` ran)."""
    return _timing_connected


def timing_wanted(config: Any) -> bool:
    """Whether the settings ask for worker-side timing."""
    if config.timing is not None:
        return bool(config.timing)
    return bool(config.sla) or config.metrics_port is not None
