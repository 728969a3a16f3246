"""Deferring a task for later without spending one of its retries: parked in the tuning Redis
(``tuning_defer_via="park"``, the default) or re-published with a countdown.

Parking (docs/parking.md): the call's signature, encoded as JSON, waits in the tuning Redis at a
*spot* ``(reason, name)`` until it is due; a mover in the workers (:mod:`.mover`) publishes it back
to its queue with a :data:`HEADER_PARK` header, and :func:`guard` drops a duplicate of a message a
mover published twice (it died between publishing and acknowledging) before any step runs.
When the tuning Redis fails, or the call cannot be encoded as JSON, the task is deferred with a
countdown instead (logged once, counted through ``events.park_fallback``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, NoReturn, Optional, Sequence, Set, Union

from celery import states
from celery.exceptions import Ignore

from .. import events
from ..errors import StorageError
from ..storage.keys import split_keyed_spot

if TYPE_CHECKING:  # pragma: no cover
    from ..storage.park import Spot
    from .runtime import TuningRuntime

__all__ = [
    "HEADER_DEFERRALS", "HEADER_PARK", "HEADER_PARK_SEQ", "PAYLOAD_VERSION", "ParkRequest", "decode_payload",
    "defer", "deferrals_of", "encode_payload", "guard", "is_eager", "jitter", "park_info", "parking_on", "spot",
    "warn_beyond_visibility",
]

logger = logging.getLogger("celery_tuning.parking")

#: How many times this task id has been deferred (its own budget, apart from retries).
HEADER_DEFERRALS = "tuning_deferrals"
#: Set by the mover on a message it publishes back: {"id": park id, "pub": n, "r": reason, "n": name}.
HEADER_PARK = "tuning_park"
#: A concurrency waiter's first-park sequence (µs), so a waiter parked again keeps its place.
HEADER_PARK_SEQ = "tuning_park_seq"
#: Deferrals that do not count against ``max_deferrals`` (a waiter woken for a slot that was
#: gone when it arrived parks again at its place: waking it was the mover's guess, not its wait).
HEADER_FREE_DEFERRALS = "tuning_free_deferrals"
#: Version of the parked payload's layout.
PAYLOAD_VERSION = 1
#: Keys the payload adds to the signature's dict.
_META = ("v", "reason", "name", "parked_at")


class ParkRequest(NamedTuple):
    """Where a deferred call parks: its spot, and in how many seconds it is due (None: a FIFO
    waiter of a concurrency limit, due when a slot frees)."""

    spot: Any
    delay: Optional[float]


def spot(reason: str, name: str) -> Spot:
    """The store's :class:`~celery_tuning.storage.park.Spot` ``(reason, name)``."""
    from ..storage.park import Spot

    return Spot(reason, name)


def parking_on(runtime: TuningRuntime) -> bool:
    """Whether deferrals of this app park (``tuning_defer_via="park"``)."""
    return runtime.config.defer_via == "park"


class _Once:
    """Log a condition once per key per process (until :meth:`clear`)."""

    def __init__(self) -> None:
        self._seen: Set[Any] = set()
        self._lock = threading.Lock()

    def first(self, key: Any) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

    def clear(self, key: Any) -> None:
        with self._lock:
            self._seen.discard(key)


_once = _Once()


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


def _counter(request: Any, header: str) -> int:
    value = (getattr(request, "headers", None) or {}).get(header)
    if value is None:
        value = getattr(request, header, 0)
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def deferrals_of(request: Any) -> int:
    """Deferrals so far, from the message headers (0 for a fresh task)."""
    return _counter(request, HEADER_DEFERRALS)


class Deferred(Ignore):
    """The ``Ignore`` that ends an attempt celery-tuning deferred, parked or dropped as a duplicate.

    The task's ``run`` re-raises it without the pipeline's frames: Celery builds two
    ``ExceptionInfo`` for every ``Ignore`` and each formats the whole traceback (three quarters of
    a parked attempt's CPU with the nine frames it was raised under)."""


def _ignored(message: str) -> Ignore:
    """The ``Ignore`` that ends a deferred or dropped attempt (its memory freed at once: see
    :func:`~celery_tuning.integration.receivers.connect_ignore_cycle_breaker`)."""
    from .receivers import connect_ignore_cycle_breaker

    connect_ignore_cycle_breaker()
    return Deferred(message)


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
    park: Optional[ParkRequest] = None,
    free: bool = False,
) -> NoReturn:
    """Park the current task, or publish it again with a countdown (same id, same retries count),
    and stop this attempt.

    With ``park`` and ``tuning_defer_via="park"`` the call waits in the tuning Redis at
    ``park.spot`` (due in ``park.delay`` s, or a FIFO waiter when None) and a mover publishes it
    back; otherwise (or when the tuning Redis fails, or the call is not JSON-encodable) it is
    re-published with ``countdown``.

    ``Task.retry`` would add one to ``request.retries`` and fire retry handlers;
    here a header counter (:data:`HEADER_DEFERRALS`) with its own cap counts
    deferrals instead, and the attempt ends with :class:`celery.exceptions.Ignore`
    so the message is acknowledged without touching the task's state: the
    result stays pending until the re-published message runs.

    Raises:
        celery.exceptions.Ignore: Always, after publishing.
        BaseException: ``on_exhausted(count)`` when the deferral budget is spent (``free``: this
            deferral does not count against it).
    """
    request = task.request
    count = deferrals_of(request) + 1
    uncounted = _counter(request, HEADER_FREE_DEFERRALS) + (1 if free else 0)
    if count - uncounted > max_deferrals:
        raise on_exhausted(count - uncounted - 1)
    new_headers = dict(getattr(request, "headers", None) or {})
    new_headers[HEADER_DEFERRALS] = count  # every deferral: the park id and the ticket need a new one
    if uncounted:
        new_headers[HEADER_FREE_DEFERRALS] = uncounted
    new_headers.pop(HEADER_PARK, None)  # the mover's ticket of the previous run is spent
    if headers:
        new_headers.update(headers)
    _unstart(task, request)
    if park is not None:
        _park(task, request, park, new_headers, count, reason)  # raises Ignore once parked
    countdown = max(0.0, countdown)
    signature = task.signature_from_request(request, countdown=countdown, headers=new_headers)
    serializer = _serializer_keeping(task, request)
    if serializer is not None:
        signature.set(serializer=serializer)
    declare = route_declarations(task._app, signature.options)
    if declare:
        signature.set(declare=declare)
    signature.apply_async()
    events.task_deferred(task, request.id, reason, countdown, count)  # metrics, the task_deferred signal
    raise _ignored(f"deferred by celery-tuning ({reason}) for {countdown:.3f}s")


def _unstart(task: Any, request: Any) -> None:
    """Put a deferred task's result back to PENDING when Celery marked it STARTED for this attempt
    (``task_track_started``): it waits, it has not started. Done before the call is parked or
    published again, so its next attempt's STARTED (or result) cannot be overwritten. A result
    backend that fails here is logged, not raised: the deferral goes on."""
    if not getattr(task, "track_started", False) or getattr(task, "ignore_result", False):
        return
    if getattr(request, "is_eager", False) or not getattr(request, "id", None):
        return
    try:
        task.backend.store_result(request.id, None, states.PENDING, request=request)
    except Exception as exc:  # the backend's trouble must not cost the deferral (or leak into the task)
        logger.warning("celery-tuning could not set deferred task %s back to PENDING: %s: %s",
                       request.id, exc.__class__.__name__, exc)


def route_declarations(app: Any, options: Dict[str, Any]) -> Optional[List[Any]]:
    """The app's queue a re-published call's exchange and routing key lead to, when its exchange
    is a topic or fanout one: declared before publishing (once per channel, kombu remembers).

    On the Redis broker a process routes by the exchange's type as it knows it: one that never
    declared ``tx`` takes the topic exchange for a direct one, matches ``orders.eu.1`` against the
    binding ``orders.#`` literally, finds no queue and drops the message (a deferred call of a
    task routed through a topic exchange was lost)."""
    exchange = options.get("exchange")
    exchange = getattr(exchange, "name", exchange)
    if not exchange:
        return None
    from .receivers import queue_label

    try:
        queue = app.amqp.queues.get(queue_label(app, {"exchange": str(exchange),
                                                      "routing_key": options.get("routing_key") or ""}))
    except Exception:  # an app whose amqp cannot be set up: publish as before
        return None
    ex = getattr(queue, "exchange", None)
    if queue is None or ex is None or getattr(ex, "type", "direct") == "direct":
        return None
    return [queue]


# -- parking -------------------------------------------------------------------------------------


def encode_payload(task: Any, request: Any, headers: Dict[str, Any], reason: str, name: str) -> str:
    """The parked message: the call's signature (task id, arguments, headers, links and errbacks,
    chord, group, parent/root ids, routing, priority) as JSON text, with the park's own fields.

    Raises:
        TypeError, ValueError: When the call cannot be encoded as JSON (pickle-only arguments).
    """
    from kombu.utils.json import dumps

    signature = task.signature_from_request(request, headers=headers)
    data = dict(signature)
    data.update(v=PAYLOAD_VERSION, reason=reason, name=name, parked_at=time.time())
    return str(dumps(data))


def decode_payload(payload: str) -> Dict[str, Any]:
    """The signature dict of a parked message (the park's own fields removed)."""
    from kombu.utils.json import loads

    data = dict(loads(payload))
    for key in _META:
        data.pop(key, None)
    return data


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (a tuple is not a list, an IntEnum not an
    int, a ZoneInfo datetime not a fixed-offset one, an OrderedDict not a dict)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            if not (_same(ka, kb) and _same(va, vb)):
                return False
        return True
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "tzinfo") and a == b:
        return type(a.tzinfo) is type(b.tzinfo)
    try:
        return bool(a == b)
    except Exception:  # an object whose == raises: it did not survive
        return False


def _calls_of(request: Any) -> List[Any]:
    """The arguments a re-published message carries: the call's, and those of the calls its
    chain, links, errbacks and chord hold."""
    calls: List[Any] = [list(getattr(request, "args", None) or []), dict(getattr(request, "kwargs", None) or {})]
    others = [*(getattr(request, "chain", None) or []), *(getattr(request, "callbacks", None) or []),
              *(getattr(request, "errbacks", None) or [])]
    chord = getattr(request, "chord", None)
    if chord:
        others.append(chord)
    for sig in others:
        if isinstance(sig, dict):
            calls += [sig.get("args"), sig.get("kwargs")]
    return calls


def _survives_json(request: Any) -> bool:
    """Whether the message's arguments come back from JSON as they are: not so for a call
    published with another serializer (``apply_async(serializer="pickle")``) holding tuples,
    non-str dict keys, enums, or objects JSON has no form for; its chain and links included."""
    from kombu.utils.json import dumps, loads

    calls = _calls_of(request)
    try:
        back = loads(dumps(calls))
    except (TypeError, ValueError, OverflowError):
        return False
    # Containers read from a JSON message are lists and dicts: the outer ones are normalised.
    return all(_same(_plain(a), b) for a, b in zip(calls, back))


def _plain(value: Any) -> Any:
    if type(value) is tuple:
        return list(value)
    return value


def _serializer_keeping(task: Any, request: Any) -> Optional[str]:
    """The serializer a re-published call needs so its arguments arrive unchanged: None (the
    task's own) when they survive it; else one the workers accept that is not JSON (pickle first)."""
    own = getattr(task, "serializer", None) or task._app.conf.task_serializer
    if own != "json" or _survives_json(request):
        return None
    from kombu.serialization import registry

    accepted = [registry.type_to_name.get(c, c) for c in (task._app.conf.accept_content or ())]
    others = [name for name in accepted if name != "json"]
    if not others:
        return None
    return "pickle" if "pickle" in others else others[0]


def _seq_of(headers: Dict[str, Any]) -> int:
    """The waiter's first-park sequence: kept from an earlier park, else now (µs); stored in ``headers``."""
    try:
        seq = int(headers[HEADER_PARK_SEQ])
    except (KeyError, TypeError, ValueError):
        seq = int(time.time() * 1_000_000)
    headers[HEADER_PARK_SEQ] = seq
    return seq


def _carry_trace(headers: Dict[str, Any]) -> None:
    """Keep the parking run's OpenTelemetry context in the parked call (when spans are recorded)."""
    from . import otel

    if otel.tracing_connected():
        carrier = otel.trace_carrier()
        if carrier:
            headers[otel.HEADER_TRACE] = carrier


def _park(task: Any, request: Any, park: ParkRequest, headers: Dict[str, Any], count: int, reason: str) -> None:
    """Park the call and raise Ignore; return (to defer with a countdown) when parking is off or fails."""
    from .runtime import runtime_for

    runtime = runtime_for(task._app)
    if not parking_on(runtime):
        return
    where = park.spot
    serializer = getattr(task, "serializer", None) or task._app.conf.task_serializer
    if serializer != "json" or not _survives_json(request):
        # JSON would hand the task lists for its tuples and str keys for its int keys: only a call
        # whose arguments survive JSON parks (a call sent with serializer="pickle" may not).
        if _once.first(("serializer", task.name)):
            logger.warning("task %s: a call sent with a serializer other than JSON (the task's is %r) is "
                           "deferred with a countdown message, not parked (parked calls are JSON)",
                           task.name, serializer)
        events.park_fallback(where.reason, "serializer")
        return
    seq: Optional[int] = None
    if park.delay is None:
        seq = _seq_of(headers)
    _carry_trace(headers)
    try:
        payload = encode_payload(task, request, headers, where.reason, where.name)
    except (TypeError, ValueError, OverflowError) as exc:
        if _once.first(("encoding", task.name)):
            logger.warning("task %s cannot be parked (%s: its call is not JSON-encodable); deferred with a "
                           "countdown instead", task.name, exc)
        events.park_fallback(where.reason, "encoding")
        return
    delay_us = None if park.delay is None else max(0, int(park.delay * 1_000_000))
    try:
        # Task id, retries and deferral count: the same attempt redelivered by the broker (its worker
        # died before acking) has the same id, so a call that already ran is not parked again.
        retries = int(getattr(request, "retries", 0) or 0)
        park_id = f"{request.id}:{retries}:{count}"
        store = runtime.registry.park_store()
        parked = store.park(where, park_id, payload, delay_us, seq)
        if not parked and not _redelivered(request):
            # Not a redelivery: a new call that reuses a task id whose earlier call parked here
            # and ran (apply_async(task_id=...) with a fixed id). It parks under an id of its own.
            park_id = f"{park_id}:{uuid.uuid4().hex[:12]}"
            parked = store.park(where, park_id, payload, delay_us, seq)
    except StorageError as exc:
        if _once.first("storage"):
            logger.warning("tuning Redis failed while parking a task (%s); deferring with countdowns until "
                           "it answers again", exc)
        events.park_fallback(where.reason, "storage")
        return
    _once.clear("storage")
    if not parked:
        raise _ignored(f"already ran: a redelivered message that celery-tuning had parked ({reason})")
    # Labelled by the limit: a per-key spot's name carries its key's digest (one series per tenant).
    label = split_keyed_spot(where.name)[0] if where.reason == "concurrency" else where.name
    events.task_parked(where.reason, label)
    events.task_deferred(task, request.id, reason, park.delay or 0.0, count)  # the task_deferred signal
    raise _ignored(f"parked by celery-tuning ({reason}) at {where.reason}:{where.name}")


def park_info(request: Any) -> Optional[Dict[str, Any]]:
    """The mover's :data:`HEADER_PARK` on this message, if it carries one."""
    headers = getattr(request, "headers", None) or {}
    info = headers.get(HEADER_PARK)
    if info is None:
        info = getattr(request, HEADER_PARK, None)
    return info if isinstance(info, dict) else None


def guard(task: Any, request: Any, spots: Union[Sequence[Spot], Callable[[], Sequence[Spot]]] = ()) -> None:
    """Before any step: drop a stale duplicate of a message the mover published (Ignore, acked).

    A message published by the mover is redeemed against its ticket: a lower publication number
    than the ticket's means a mover died between publishing and acknowledging and the entry was
    published again, so this copy never runs. A message the broker redelivered (``acks_late``:
    its worker died after parking it, before acking) whose attempt parked at one of ``spots``
    (the task's parking steps) is dropped too: its parked copy owns the run. Redis failing here
    lets the call run (logged once): a lost task is worse than the rare duplicate.
    """
    info = park_info(request)
    if info is None:
        if spots and _redelivered(request):
            _drop_if_parked(task, request, spots() if callable(spots) else spots)
        return
    try:
        where = spot(str(info["r"]), str(info["n"]))
        park_id, pub = str(info["id"]), int(info["pub"])
    except (KeyError, TypeError, ValueError):
        return
    from .runtime import runtime_for

    try:
        fresh = runtime_for(task._app).registry.park_store().redeem(where, park_id, pub)
    except StorageError as exc:
        if _once.first("redeem"):
            logger.warning("tuning Redis failed while checking a parked task's ticket (%s); running it", exc)
        return
    _once.clear("redeem")
    if not fresh:
        logger.info("task %s[%s]: dropped a duplicate of a parked message (publication %d)",
                    task.name, request.id, pub)
        raise _ignored(f"duplicate of parked message {park_id} (publication {pub})")
    if spots and _redelivered(request):
        # The same publication again (acks_late, its worker died): if that attempt parked the call
        # again before dying, the new entry owns the run.
        _drop_if_parked(task, request, spots() if callable(spots) else spots)


def _redelivered(request: Any) -> bool:
    info = getattr(request, "delivery_info", None) or {}
    return bool(info.get("redelivered")) if isinstance(info, dict) else False


def _drop_if_parked(task: Any, request: Any, spots: Sequence[Spot]) -> None:
    """Drop a redelivered original whose attempt had parked (its park id has a ticket)."""
    from .runtime import runtime_for

    runtime = runtime_for(task._app)
    if not parking_on(runtime) or not getattr(request, "id", None):
        return
    retries = int(getattr(request, "retries", 0) or 0)
    park_id = f"{request.id}:{retries}:{deferrals_of(request) + 1}"
    try:
        store = runtime.registry.park_store()
        parked = next((where for where in spots if store.seen(where, park_id)), None)
    except StorageError as exc:
        if _once.first("redeem"):
            logger.warning("tuning Redis failed while checking a parked task's ticket (%s); running it", exc)
        return
    if parked is not None:
        logger.info("task %s[%s]: dropped a redelivered message whose attempt was parked at %s:%s (its "
                    "parked copy runs instead)", task.name, request.id, parked.reason, parked.name)
        raise _ignored(f"redelivered original of parked call {park_id}")
