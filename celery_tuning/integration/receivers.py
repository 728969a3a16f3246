"""Signal receivers: publish-time header stamping and worker-side timing/SLA checks."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from datetime import datetime
from types import FrameType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from celery import signals as celery_signals

from .. import events
from ..policy.attach import SlaPolicy
from ..policy.timing import breach, compute_timings
from .deferral import Deferred
from .runtime import installed_runtime

__all__ = [
    "CONSUMED_QUEUE",
    "HEADER_PUBLISHED",
    "HEADER_SENT",
    "connect_loss_receiver",
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
#: The ``delivery_info`` entry naming the queue the worker consumed a message from, when the broker
#: says so (AMQP: the message's consumer tag, set in the worker's main process on ``task_received``
#: and carried to the pool process with the request). It wins over matching the routing key.
CONSUMED_QUEUE = "tuning_queue"
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
    consumed = info.get(CONSUMED_QUEUE)
    if consumed:
        return str(consumed)  # one of the queues this worker consumes: bounded
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
    if key and key in queues and not exchange:  # the default exchange: the key names the queue
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


def _on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Name the queue a message was consumed from in its request (worker main process, AMQP).

    A RabbitMQ delivery carries the consumer tag of the queue it came from: exact where matching
    the routing key cannot be (two consumed queues bound to the same key on one exchange, a binding
    made outside the app's settings). Virtual transports (Redis, SQS...) carry no tag: the receiver
    disconnects itself at their first message, and :func:`queue_label` matches the routing key.
    """
    info = getattr(getattr(request, "message", None), "delivery_info", None) or {}
    tag = info.get("consumer_tag")
    if not tag:
        transport = getattr(getattr(sender, "connection", None), "transport", None)
        if getattr(transport, "driver_type", None) != "amqp":
            celery_signals.task_received.disconnect(dispatch_uid="celery_tuning.received")
        return
    consumer = getattr(sender, "task_consumer", None)
    gate = getattr(sender, "tuning_queue_gate", None)
    # The caps' gate keeps every tag the consumer used: a queue it paused (cancelled) still has
    # deliveries on their way, whose tag the consumer's own table no longer holds.
    name = (getattr(gate, "tags", None) or {}).get(tag)
    if name is None:
        try:
            name = next((q for q, t in consumer._active_tags.items() if t == tag), None)  # type: ignore[union-attr]
        except Exception:  # a kombu without the tag table: the routing key is matched instead
            return
    if name is None:
        return
    label = _consumed_labels.get(name)
    if label is None:
        queue = next((q for q in getattr(consumer, "queues", None) or () if q.name == name), None)
        # kombu's Broadcast queues get a fresh uuid name per process: label the stable alias
        label = _consumed_labels[name] = str(getattr(queue, "alias", None) or name)
    try:
        request.delivery_info[CONSUMED_QUEUE] = label  # the same dict the pool process gets
    except (AttributeError, TypeError):
        pass


# queue name -> label (its alias for a Broadcast queue); the queues a worker consumes: bounded.
_consumed_labels: Dict[str, str] = {}


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
    return _seconds(value)


def _stamp(request_dict: Mapping[str, Any], name: str) -> Optional[float]:
    """:func:`_header` from a worker request's dict (message headers at its top level)."""
    value = request_dict.get(name)
    if value is None:
        value = (request_dict.get("headers") or {}).get(name)
    return _seconds(value)


def _seconds(value: Any) -> Optional[float]:
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
                state: Optional[str] = None, retval: Any = None, **_: Any) -> None:
    if task_id is None or task is None:
        return
    start = _started.pop(task_id, None)
    if start is None:
        return
    if state is None and _pool_child:
        # Cut short (SystemExit: a hard time limit's SIGTERM, a terminating revoke, the process
        # stopped): the main process times it from the start it saw to the loss, as it does for a
        # child that never got here (SIGKILL). Timing it here too counted it twice.
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
    if state == "IGNORED" and isinstance(retval, Deferred):
        return  # deferred, parked or a dropped duplicate: no SLA check; the attempt that runs is one
    policy = _sla_policy(runtime, task, queue)
    if policy is not None:
        _check_sla(policy, task, task_id, queue, timings)


# -- attempts cut short: their pool process was killed or lost --------------------------------------

#: Task ids of cut-short attempts already settled (Celery sends ``task_failure`` twice for a hard
#: time limit); oldest dropped first past _REMEMBERED.
_lost: OrderedDict[str, bool] = OrderedDict()
_REMEMBERED = 10_000
#: Called with (task, queue label, state) for a cut-short attempt that could not be timed (metrics
#: count its outcome); a timed one reaches them through ``task_timed``.
_untimed_loss_hooks: List[Callable[[Any, str, str], None]] = []
_settling = False
_loss_connected = False
_pool_child = False


def settling_lost_attempt() -> bool:
    """Whether the ``task_timed`` being sent is a cut-short attempt's, from a prefork worker's main
    process (its recorders write at once: a thread writing there while the pool forks could leave
    a lock held in the child)."""
    return _settling


def _on_pool_child_start(**_: Any) -> None:
    global _pool_child
    _pool_child = True


def _on_task_failure(sender: Any = None, task_id: Optional[str] = None, exception: Any = None,
                     **_: Any) -> None:
    """A pool process killed by a hard time limit or lost (SIGKILL, the OOM killer) under a task:
    the worker's main process sends ``task_failure`` for it."""
    from celery.exceptions import TimeLimitExceeded, WorkerLostError

    if isinstance(exception, (TimeLimitExceeded, WorkerLostError)):
        _settle(sender, task_id, "FAILURE")


def _on_revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    """A running task revoked with ``terminate=True``: its pool process is signalled."""
    if terminated:
        _settle(sender, getattr(request, "id", None), "REVOKED")


def _settle(task: Any, task_id: Optional[str], state: str) -> None:
    """Time, SLA-check and count an attempt whose pool process died under it, in the worker's main
    process: the process never finished ``task_postrun`` (killed), or finished it cut short and left
    the attempt here (see :func:`_on_postrun`). Its run time is from the start the main process saw
    to now; it gets the SLA check every attempt gets (killed attempts are the ones an SLA most needs
    to see)."""
    if task is None or not task_id or task_id in _started:
        return  # _started: traced in this process (a green pool's hard limit); its postrun times it
    runtime = _runtime_of(task)
    if runtime is None or task_id in _lost:
        return
    _lost[task_id] = True
    while len(_lost) > _REMEMBERED:
        _lost.popitem(last=False)
    request = _worker_request(task_id)
    info = getattr(request if request is not None else task.request, "delivery_info", None)
    queue = queue_label(task.app, info, getattr(task, "queue", None))
    if _timing_connected and request is not None and _time_cut_short(runtime, task, task_id, request, queue, state):
        return
    for hook in list(_untimed_loss_hooks):
        hook(task, queue, state)


def _worker_request(task_id: str) -> Any:
    """The worker's Request sending the signal for ``task_id`` (from its ``on_failure``,
    ``on_timeout`` or ``_announce_revoked`` frame), or None. Celery has left its active requests by
    then, and the signal carries no start time."""
    frame: Optional[FrameType] = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if getattr(candidate, "id", None) == task_id and hasattr(candidate, "time_start"):
            return candidate
        frame = frame.f_back
    return None


def _time_cut_short(runtime: Any, task: Any, task_id: str, request: Any, queue: str, state: str) -> bool:
    started = getattr(request, "time_start", None)
    if not started:
        return False  # lost before the pool said it started: nothing ran that can be timed
    now = time.time()
    # Celery 5.5+ keeps the wall-clock start; earlier versions the monotonic clock of acceptance.
    started_wall = float(started) if started > 1e9 else now - (time.monotonic() - float(started))
    request_dict = getattr(request, "request_dict", None) or {}
    timings = compute_timings(
        sent_at=_stamp(request_dict, HEADER_SENT),
        published_at=_stamp(request_dict, HEADER_PUBLISHED),
        eta=_eta_seconds(getattr(request, "eta", None)),
        started_wall=started_wall,
        finished_wall=now,
        run=max(0.0, now - started_wall),
    )
    global _settling
    if events.TASK_TIMED.subscribers:
        _settling = True
        try:
            events.task_timed(task, task_id, queue, timings.wait, timings.run, timings.total, state,
                              timings.clamped, 0.0)
        finally:
            _settling = False
    policy = _sla_policy(runtime, task, queue)
    if policy is not None:
        _check_sla(policy, task, task_id, queue, timings)
    return True


def connect_loss_receiver(untimed: Optional[Callable[[Any, str, str], None]] = None) -> None:
    """Settle attempts whose pool process died under them (see :func:`_settle`); ``untimed`` is
    called for those that cannot be timed (all of them while timing is off). Once per process."""
    global _loss_connected
    with _connect_lock:
        if untimed is not None and untimed not in _untimed_loss_hooks:
            _untimed_loss_hooks.append(untimed)
        if not _loss_connected:
            celery_signals.task_failure.connect(
                _on_task_failure, weak=False, dispatch_uid="celery_tuning.lost")
            celery_signals.task_revoked.connect(
                _on_revoked, weak=False, dispatch_uid="celery_tuning.terminated")
            _loss_connected = True


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
            # Worker main process: the queue an AMQP message came from (its consumer tag).
            celery_signals.task_received.connect(
                _on_received, weak=False, dispatch_uid="celery_tuning.received")
            celery_signals.worker_process_init.connect(
                _on_pool_child_start, weak=False, dispatch_uid="celery_tuning.pool_child")
            _timing_connected = True
    connect_loss_receiver()


def timing_connected() -> bool:
    """Whether this process times task attempts (:func:`connect_timing_receivers` ran)."""
    return _timing_connected


def timing_wanted(config: Any) -> bool:
    """Whether the settings ask for worker-side timing."""
    if config.timing is not None:
        return bool(config.timing)
    return bool(config.sla) or config.metrics_port is not None
