"""What the steps that hold calls in the tuning Redis instead of publishing them share (``@debounce``, ``@fair``).

Each of them stores a call's signature as JSON at ``apply_async`` and has the parking mover publish
it later under a ticket header, with the same claim/publish/acknowledge protocol as parking; the
tuning Redis failing at the call publishes it at once, logged once per outage.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, TypeVar

from ...errors import ConfigurationError
from ..deferral import PAYLOAD_VERSION, route_declarations
from ..deferral import _Once as FirstTime  # True the first time a key is seen: a warning logged once
from ..pipeline import PublishContext
from ..runtime import TuningRuntime

__all__ = [
    "TRANSPORT_OPTIONS", "FirstTime", "StoreOutage", "add_to_parent", "broker_failure", "check_held_task",
    "encode_call", "held_store",
    "message_ticket", "publish_claimed", "publish_held", "task_serializer",
]

#: ``apply_async`` options that are the caller's connection to the broker, not part of the call
#: (``add_to_parent`` is acted on at the call: the caller's task gets the held call as a child).
TRANSPORT_OPTIONS = ("producer", "connection", "publisher", "router", "declare", "add_to_parent")

S = TypeVar("S")
E = TypeVar("E")


def task_serializer(task: Any) -> str:
    """The serializer a call of ``task`` is sent with unless ``apply_async`` says otherwise."""
    return str(getattr(task, "serializer", None) or task._app.conf.task_serializer)


class StoreOutage:
    """Log the tuning Redis failing at one place once per process, until it answers again.

    Arguments:
        logger: Where to log.
        feature: The decorator, as the log names it (``"@fair"``).
        what: What failed (``"queueing a call"``).
        then: What happens meanwhile (``"publishing fair calls at once"``).
    """

    def __init__(self, logger: logging.Logger, feature: str, what: str, then: str) -> None:
        self.logger, self.feature, self.what, self.then = logger, feature, what, then
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        if not self.failing:
            self.failing = True
            self.logger.warning("celery-tuning %s: tuning Redis failed %s (%s); %s until it answers again",
                                self.feature, self.what, exc, self.then)

    def answered(self) -> None:
        if self.failing:
            self.failing = False
            self.logger.info("celery-tuning %s: tuning Redis answers again", self.feature)


def check_held_task(task_cls: Any, runtime: TuningRuntime, feature: str, held_as: str, mover_does: str) -> None:
    """Refuse a task whose calls cannot be held: a serializer other than JSON (nothing read from
    Redis is unpickled), or ``tuning_defer_via="countdown"`` (the parking mover publishes them).

    Raises:
        ConfigurationError: Naming the decorator, the setting and what to give instead.
    """
    serializer = task_serializer(task_cls)
    if serializer != "json":
        raise ConfigurationError(
            f"{feature}: the task's serializer is {serializer!r}; {held_as} calls wait in the tuning Redis as "
            "JSON (nothing read from Redis is unpickled): give the task serializer='json'")
    if runtime.config.defer_via != "park":
        raise ConfigurationError(
            f"{feature} needs tuning_defer_via='park' (got 'countdown'): the parking mover in the workers "
            f"{mover_does}")


def held_store(runtime: TuningRuntime, kind: str, mover: bool, memory: Callable[[], S],
               redis: Callable[[Any], S]) -> S:
    """The app's store of ``kind``, built once per registry: ``memory()`` when the app runs on the
    memory stores (the mover then shares the producers' store), else ``redis(connector)`` on the
    app's connection, or (``mover``) on the mover's own."""

    def build() -> S:
        if runtime.in_memory:
            return memory() if not mover else held_store(runtime, kind, False, memory, redis)
        connector = runtime.connector
        if mover:
            from ...storage.redis import MOVER_CLIENT_NAME

            connector = runtime.connector_named(MOVER_CLIENT_NAME)
        return redis(connector)

    return runtime.registry.get(kind, "mover" if mover else "store", build)


def encode_call(pctx: PublishContext, options: Dict[str, Any], extra: Optional[Dict[str, Any]] = None, *,
                logger: logging.Logger, feature: str, held_as: str, not_held: str,
                warned: FirstTime) -> Optional[str]:
    """The call's signature with ``options`` as JSON (``extra`` fields added), or None when its
    options cannot be encoded (the call is then published at once, logged once per task).

    Arguments:
        feature: The decorator, as errors name it (``"@fair"``).
        held_as: The call as the warning names it (``"fair"``: "a fair call").
        not_held: What the call is not when published at once (``"queued fairly"``).

    Raises:
        kombu.exceptions.EncodeError: When its arguments are not JSON-encodable (Celery would
            refuse to publish them as JSON too).
    """
    from kombu.exceptions import EncodeError
    from kombu.utils.json import dumps

    task = pctx.task
    parent = task._app.current_worker_task
    if parent is not None and "parent_id" not in options:
        # The mover publishes from no task: keep the caller's place in the workflow now.
        options["parent_id"] = parent.request.id
        options["root_id"] = parent.request.root_id or parent.request.id
    data = dict(task.signature(pctx.args, pctx.kwargs, options))
    data["v"] = PAYLOAD_VERSION
    data.update(extra or {})
    try:
        return str(dumps(data))
    except (TypeError, ValueError, OverflowError) as exc:
        try:
            dumps([pctx.args, pctx.kwargs])
        except (TypeError, ValueError, OverflowError):
            raise EncodeError(f"task {task.name!r}: {feature}: the call's arguments are not "
                              f"JSON-encodable: {exc}") from None
        if warned.first(("options", task.name)):
            logger.warning("task %s: a %s call whose apply_async options are not JSON-encodable (%s) is "
                           "published at once, not %s", task.name, held_as, exc, not_held)
        return None


def add_to_parent(task: Any, options: Dict[str, Any], result: Any) -> Any:
    """``result`` of a held call, made a child of the calling task as Celery's ``send_task`` does
    for a call it publishes (unless ``add_to_parent=False``)."""
    if options.get("add_to_parent", True):
        parent = task._app.current_worker_task
        if parent is not None:
            parent.add_trail(result)
    return result


def message_ticket(request: Any, header: str) -> Optional[Dict[str, Any]]:
    """The ticket header ``header`` a mover set on the message being run, or None."""
    headers = getattr(request, "headers", None) or {}
    info = headers.get(header) if isinstance(headers, dict) else None
    if info is None:
        info = getattr(request, header, None)
    return info if isinstance(info, dict) else None


def publish_held(app: Any, data: Dict[str, Any], task_id: str, header: str, ticket: Dict[str, Any],
                 producer: Any = None) -> Any:
    """Publish a held call (its decoded payload) under ``task_id`` with ``ticket`` in ``header``.

    Raises:
        ForeignEntry: When the call's task is not one of ``app``'s (another app sharing the
            tuning Redis and prefix stored it).
    """
    from ..mover import ForeignEntry

    signature = app.signature(data)
    if signature.task not in app.tasks:
        raise ForeignEntry(str(signature.task))
    signature.options["task_id"] = task_id
    headers: Dict[str, Any] = dict(signature.options.get("headers") or {})
    headers[header] = ticket
    signature.options["headers"] = headers
    declare = route_declarations(app, signature.options)
    if declare:
        signature.options["declare"] = declare
    return signature.apply_async(producer=producer)


def broker_failure(producer: Any, exc: BaseException) -> bool:
    """Whether ``exc``, raised publishing through ``producer``, is the broker's or the tuning
    Redis's (the connection, the channel: another try may succeed), not the message's own."""
    from kombu.exceptions import OperationalError

    from ...errors import StorageError

    connection = getattr(producer, "connection", None)
    errors = (tuple(getattr(connection, "connection_errors", ()) or ())
              + tuple(getattr(connection, "channel_errors", ()) or ()))
    return isinstance(exc, (OperationalError, StorageError, ConnectionError, TimeoutError, *errors))


def publish_claimed(app: Any, claimed: Iterable[E], publish: Callable[[E, Any], Any], ack: Callable[[E], Any],
                    give_back: Callable[[E, Any], None], failure: Callable[[E], str],
                    logger: logging.Logger,
                    reject: Optional[Callable[[E, BaseException], None]] = None) -> Tuple[int, int]:
    """Publish claimed entries through one producer, acknowledging each after its publication:
    (published, failed).

    A mover that dies between the two leaves a claim that expires, and the entry is published again
    under a higher ticket (the worker drops whichever copy starts second).

    Arguments:
        publish: Publishes one entry (``entry, producer``); raises ``ForeignEntry`` for another app's.
        ack: Acknowledges a published entry.
        give_back: Called with an entry another app stored and the ``ForeignEntry``: unclaim it.
        failure: The log line for an entry that could not be published (logged for the first one).
        reject: Called with an entry whose publication failed for a reason of its own (not the
            broker's connection: :func:`broker_failure`) and the error; None: it stays claimed.
    """
    from ..mover import _NO_FORK_WHILE_PUBLISHING, ForeignEntry

    done, failed = 0, 0
    with _NO_FORK_WHILE_PUBLISHING, app.producer_or_acquire() as producer:
        for entry in claimed:
            try:
                publish(entry, producer)
            except ForeignEntry as exc:
                give_back(entry, exc)
                continue
            except Exception as exc:
                # Whatever one entry does (an undecodable payload, a publish hook raising), the others
                # go on; it stays claimed and is claimed again (pub + 1) after the claim TTL, or
                # (reject) is told apart from the broker failing: it would fail on every claim.
                failed += 1
                if reject is not None and not broker_failure(producer, exc):
                    reject(entry, exc)
                elif failed == 1:
                    logger.exception(failure(entry))
                continue
            ack(entry)
            done += 1
    return done, failed
