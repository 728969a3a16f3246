"""The pipeline step that applies ``@fair``: calls wait per key in the tuning Redis and a dispatcher
releases them round-robin across keys into the task's queue.

Publish side (:meth:`FairStep.publish`): ``apply_async`` does not publish. One script appends the
call (its signature as JSON, its task id kept, a relative ``expires`` made absolute) to its key's
list in the fair keys of the queue Celery routes it to, and the caller gets the call's
``AsyncResult``. The tuning Redis failing here publishes the call at once (logged once): a call is
never dropped. Calls published again under their own id (``Task.retry``, ``Task.replace``, a
parked call's return, the dispatcher's own publication) and calls with a countdown or an ETA are
published as they are.

Dispatcher (:class:`FairMoving`, one more part of each round of the parking mover,
:class:`~celery_tuning.integration.mover.Mover`): for each queue in the fair index, one script
registers this worker's capacity for the queue (when it consumes it), takes the next messages
round-robin within the queue's window, and claims them; each is published with the
:data:`HEADER_FAIR` ticket, then acknowledged. A dispatcher that dies between the two leaves a
claim that expires and is published again under a higher ticket.

Worker side (:meth:`FairStep.wrap`): before anything else, a released message *starts*: it leaves
the window (the dispatcher is told at once when messages wait), and a stale duplicate (a lower
ticket than the message's last publication) is dropped, never run. A released message the worker
revokes (expired, or ``revoke()``) leaves the window at once too. A worker whose mover is off
registers its capacity for the window from a thread of its own (:class:`ConsumerRegistration`).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import threading
import time
import uuid
import weakref
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple

from ... import events
from ...errors import ConfigurationError, StorageError
from ...policy.fair import FairPolicy, weight_of
from ...storage.fair import ADDED, UNDELIVERABLE, FairCap, FairReleased, FairStore
from ...storage.keys import key_digest, lease_key
from ..deferral import HEADER_PARK, _ignored, decode_payload, is_eager
from ..pipeline import Call, CallContext, PublishCall, PublishContext, Step, register_step
from ..runtime import TuningRuntime, runtime_for
from .held import (
    TRANSPORT_OPTIONS,
    FirstTime,
    StoreOutage,
    add_to_parent,
    check_held_task,
    encode_call,
    held_store,
    message_ticket,
    publish_claimed,
    publish_held,
    task_serializer,
)

__all__ = [
    "HEADER_FAIR", "ConsumerRegistration", "FairMoving", "FairMovingRound", "FairStep", "exec_options", "fair_store",
    "has_fair_task", "queue_of", "start_consumer_registration",
]

logger = logging.getLogger("celery_tuning.fair")

#: Set by the dispatcher on a fair message it publishes: ``{"q": queue, "id": msg id, "pub": n, "k": digest}``.
HEADER_FAIR = "tuning_fair"
#: Registry kind of the app's fair stores.
_STORE = "fair"
#: Seconds a dispatcher's registration as a consumer of a queue lasts without renewal (renewed
#: every round): a stopped worker's capacity leaves the window within it.
NODE_TTL = 10.0
#: Seconds until a message a dispatcher could not publish (another app's task, or one a deploy
#: removed; options the broker refuses) is claimed again: doubled at each attempt, at most the claim TTL.
FOREIGN_REST = 1.0
#: Claims of a message that cannot be published before it is set aside as undeliverable (tried
#: after 1, 2, 4 and 8 s): it no longer holds a window place meanwhile, nor after.
PUBLISH_ATTEMPTS = 5
#: Claims after which a message whose task this app does not have is set aside: many more than
#: PUBLISH_ATTEMPTS, so that another app sharing the queue and prefix (discouraged) gets its calls
#: even when this app's dispatchers claim them first several times in a row (at the
#: claim TTL's pace, about half an hour with the default); a task a deploy removed is set aside then.
FOREIGN_ATTEMPTS = 60
NO_SUCH_TASK = "this app has no such task"


def fair_store(runtime: TuningRuntime, mover: bool = False) -> FairStore:
    """The app's fair store (``mover``: on the mover's own connection); built once per registry."""

    def memory() -> FairStore:
        from ...storage.fair import MemoryFairStore

        return MemoryFairStore(ticket_ttl_us=int(runtime.config.park_ticket_ttl * 1_000_000),
                               leases=runtime.memory.lease)

    def redis(connector: Any) -> FairStore:
        from ...storage.fair import RedisFairStore

        config = runtime.config
        return RedisFairStore(connector, prefix=config.key_prefix,
                              ticket_ttl_us=int(config.park_ticket_ttl * 1_000_000))

    return held_store(runtime, _STORE, mover, memory, redis)


def exec_options(task: Any, options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` over the task's own (``@app.task(queue=..., expires=...)``), as ``Task.apply_async``
    merges them before Celery routes and publishes the call."""
    own = {k: v for k, v in task._get_exec_options().items() if v is not None}
    return dict(own, **options)


def queue_of(task: Any, options: Dict[str, Any], args: Any, kwargs: Any) -> str:
    """The name of the queue a call of ``task`` with ``options`` goes to, as Celery routes it.

    Raises:
        celery.exceptions.QueueNotFound: A queue not declared while ``task_create_missing_queues``
            is off (and whatever else the router raises), as ``apply_async`` raises it: the call
            is refused now, not stored for a queue it can never be published to.
    """
    app = task._app
    merged = exec_options(task, options)
    routed = app.amqp.router.route(merged, task.name, args, kwargs, task)
    queue = routed.get("queue") or merged.get("queue")
    queue = getattr(queue, "name", queue) or app.conf.task_default_queue
    return str(queue or "celery")


def absolute_expires(expires: Any) -> str:
    """A call's ``expires`` as the absolute ISO 8601 time it is stored as, checked as Celery checks
    it when it publishes (a stored call Celery would refuse could never be released).

    Seconds count from now, as Celery counts them at the call, not from the release.

    Raises:
        ValueError: A string that is no ISO 8601 time (dateutil's ``isoparse``, as Celery's).
        TypeError: Anything but a number, a datetime or a string.
    """
    if isinstance(expires, numbers.Real):
        return (datetime.now(timezone.utc) + timedelta(seconds=float(expires))).isoformat()
    if isinstance(expires, datetime):
        return expires.isoformat()
    if isinstance(expires, str):
        from dateutil.parser import isoparse

        isoparse(expires)
        return expires
    raise TypeError(f"expires must be seconds, a datetime or an ISO 8601 string, not {type(expires).__name__}")


def _replacing(task: Any, options: Dict[str, Any], task_id: Any) -> bool:
    """Whether the call is ``Task.replace``'s: published under the id of a task that already ran
    (its ticket says so: stored, it would never be released)."""
    if options.get("replaced_task_nesting"):
        return True
    current = task._app.current_worker_task
    return task_id is not None and current is not None and str(task_id) == str(current.request.id)


_publish_side = StoreOutage(logger, "@fair", "queueing a call", "publishing fair calls at once")
_worker_side = StoreOutage(logger, "@fair", "starting a fair message",
                           "running fair messages without leaving the window")
_warned = FirstTime()


class FairStep(Step):
    """Built once per task class when it is bound."""

    kind = "fair"

    def __init__(self, policy: FairPolicy, task_cls: Any) -> None:
        self.policy = policy
        self.task_name = task_cls.name
        self.runtime = runtime_for(task_cls._app)
        policies = getattr(task_cls, "_tuning_policies", None) or {}
        check_held_task(task_cls, self.runtime, "@fair", "fair", "dispatches fair queues")
        for other in ("debounce", "dedupe"):
            if other in policies:
                raise ConfigurationError(
                    f"@fair and @{other} on one task: both decide at apply_async what is published and when; "
                    "keep one of the two")
        self._concurrency = policies.get("concurrency")

    # -- publish side ---------------------------------------------------------------------------

    def _cap(self, args: Any, kwargs: Any) -> Optional[FairCap]:
        """The concurrency cap the call will run under (a ``@concurrency_limit`` on the task), or None."""
        policy = self._concurrency
        if policy is None:
            return None
        runtime = self.runtime
        name = policy.name or self.task_name
        spec = runtime.registry.concurrency_spec(name)
        if spec is None:
            return None
        digest = None
        if policy.key is not None:
            digest = key_digest(policy.key(*tuple(args or ()), **dict(kwargs or {})))
        return FairCap(int(spec.cap_for_digest(digest)), lease_key(runtime.config.key_prefix, name, digest))

    def publish(self, publish_next: PublishCall) -> Optional[PublishCall]:
        runtime, policy, name = self.runtime, self.policy, self.task_name

        def publish(pctx: PublishContext) -> Any:
            options = pctx.options
            headers = options.get("headers") or {}
            task = pctx.task
            if (not runtime.enabled or task._app.conf.task_always_eager or HEADER_FAIR in headers
                    or HEADER_PARK in headers or "retries" in options
                    or options.get("countdown") is not None or options.get("eta") is not None
                    or _replacing(task, options, pctx.task_id)):
                return publish_next(pctx)
            serializer = options.get("serializer") or task_serializer(task)
            if serializer != "json":
                if _warned.first(("serializer", name)):
                    logger.warning("task %s: a fair call sent with serializer=%r is published at once, not "
                                   "queued fairly (fair calls wait in the tuning Redis as JSON)", name, serializer)
                return publish_next(pctx)
            args, kwargs = tuple(pctx.args or ()), dict(pctx.kwargs or {})
            key = policy.key(*args, **kwargs)  # the key function's own errors reach the caller
            try:
                weight = weight_of(policy, key)
            except ValueError as exc:
                raise ConfigurationError(f"task {name!r}: {exc}") from None
            digest = key_digest(key)
            queue = queue_of(task, options, args, kwargs)
            msg_id = str(pctx.task_id or uuid.uuid4())
            payload = self._payload(pctx, msg_id)
            if payload is None:
                return publish_next(pctx)
            try:
                cap = self._cap(args, kwargs)
                answer = fair_store(runtime).add(queue, msg_id, digest, payload, weight, cap)
            except StorageError as exc:
                _publish_side.failed(exc)
                pctx.task_id = msg_id
                return publish_next(pctx)
            _publish_side.answered()
            if answer == ADDED:
                events.fair_queued(queue)
            return add_to_parent(task, options, task.AsyncResult(msg_id))

        return publish

    def _payload(self, pctx: PublishContext, msg_id: str) -> Optional[str]:
        """The call's signature as JSON (its task id included), or None when its options cannot be
        (the call is then published at once, logged once).

        Raises:
            kombu.exceptions.EncodeError: When its arguments are not JSON-encodable.
            ValueError: An ``expires`` string that is no ISO 8601 time, as ``apply_async`` raises it.
            TypeError: An ``expires`` that is no number, datetime or string.
        """
        from ..receivers import stamp_headers

        options = {k: v for k, v in pctx.options.items() if k not in TRANSPORT_OPTIONS}
        options["task_id"] = msg_id
        expires = exec_options(pctx.task, options).get("expires")
        if expires is not None:
            options["expires"] = absolute_expires(expires)
        # The call's publish time is now, not when the dispatcher releases it: queue wait and
        # end-to-end times count the wait for its turn.
        options["headers"] = stamp_headers(dict(options.get("headers") or {}))
        return encode_call(pctx, options, logger=logger, feature="@fair", held_as="fair",
                           not_held="queued fairly", warned=_warned)

    # -- worker side ----------------------------------------------------------------------------

    def wrap(self, call_next: Call) -> Call:
        runtime, name = self.runtime, self.task_name

        def call(ctx: CallContext) -> Any:
            info = message_ticket(ctx.request, HEADER_FAIR)
            if info is None or not runtime.enabled or is_eager(ctx.request):
                return call_next(ctx)
            try:
                queue, msg_id, pub, digest = str(info["q"]), str(info["id"]), int(info["pub"]), str(info.get("k", ""))
            except (KeyError, TypeError, ValueError):
                return call_next(ctx)  # a header this version cannot read: run it (never lose a task)
            try:
                fresh = fair_store(runtime).start(queue, msg_id, pub, digest)
            except StorageError as exc:
                _worker_side.failed(exc)
                return call_next(ctx)
            _worker_side.answered()
            if not fresh:
                logger.info("task %s[%s]: dropped a duplicate of a fair message (publication %d)", name, msg_id, pub)
                raise _ignored(f"duplicate of fair message {msg_id} (publication {pub})")
            return call_next(ctx)

        return call


# -- the worker this process runs (its concurrency and queues size the window) ---------------------

_workers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        _workers[app] = sender


def _on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A released message the worker revokes (it expired while it waited for its turn or in the
    broker, or ``revoke()`` named it) never starts: it leaves the window now, not after the claim
    TTL, and its ticket says it is done (never released again)."""
    info = message_ticket(request, HEADER_FAIR) if request is not None else None
    app = getattr(sender, "_app", None)
    if info is None or app is None:
        return
    runtime = runtime_for(app)
    if not runtime.enabled:
        return
    try:
        queue, msg_id, pub, digest = str(info["q"]), str(info["id"]), int(info["pub"]), str(info.get("k", ""))
    except (KeyError, TypeError, ValueError):
        return
    try:
        fair_store(runtime).start(queue, msg_id, pub, digest)
    except StorageError as exc:
        _worker_side.failed(exc)  # its place comes back after the claim TTL
        return
    _worker_side.answered()


def connect_receivers() -> None:
    """Remember each app's worker, free the window place of a revoked message (idempotent; done on import)."""
    from celery import signals as celery_signals

    celery_signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="celery_tuning.fair.worker_init")
    celery_signals.task_revoked.connect(_on_task_revoked, weak=False, dispatch_uid="celery_tuning.fair.task_revoked")


connect_receivers()


def consumer_capacity(app: Any) -> Tuple[str, int, Set[str]]:
    """(registration name, concurrency x prefetch multiplier, queues consumed) of the worker running
    in this process for ``app``; ("", 0, empty) when none (a producer, a test's own mover).

    The name is the worker's node name and this process's id: two workers started with the same
    ``-n`` each count. The prefetch multiplier is the worker's own (``--prefetch-multiplier`` or a
    queue profile's), else the app's setting.
    """
    worker = _workers.get(app)
    if worker is None:
        return "", 0, set()
    try:
        concurrency = int(getattr(worker, "concurrency", 0) or 0)
        prefetch = getattr(worker, "prefetch_multiplier", None)
        if prefetch is None:
            prefetch = app.conf.worker_prefetch_multiplier
        prefetch = int(prefetch or 0)
        queues = set(app.amqp.queues.consume_from.keys())
    except Exception:  # a worker half set up: it registers nothing yet
        return "", 0, set()
    hostname = str(getattr(worker, "hostname", "") or "")
    # A prefetch multiplier of 0 means "no limit" to Celery: count a worker as 4 per process then.
    return f"{hostname}:{os.getpid()}", max(0, concurrency) * (prefetch if prefetch > 0 else 4), queues


def has_fair_task(app: Any) -> bool:
    """Whether any of ``app``'s tasks is ``@fair``."""
    return any("fair" in (getattr(type(task), "_tuning_policies", None) or {}) for task in list(app.tasks.values()))


class ConsumerRegistration:
    """Registers this worker's capacity for the fair queues it consumes, on a thread of its own, in a
    worker whose parking mover is off (``tuning_park_mover=False``).

    A dispatcher registers its own worker on every round; a worker without one would add nothing to
    the windows of the queues it consumes, and with every consumer's mover off nothing would ever
    be released. Every ``interval`` seconds it renews the registration at each fair queue (of the
    index) the worker consumes: a release of batch 0 (registers, takes nothing). Other workers'
    dispatchers release the calls; none running, none are.

    Arguments:
        app: The worker's Celery app.
        interval: Seconds between renewals (well within the registration's :data:`NODE_TTL`).
    """

    def __init__(self, app: Any, interval: float = 1.0) -> None:
        self.app = app
        self.runtime = runtime_for(app)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._outage = StoreOutage(logger, "@fair", "registering this worker's capacity",
                                   "its fair queues' windows may not count it")

    def start(self) -> ConsumerRegistration:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="celery-tuning-fair-registration", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                self._outage.answered()
            except StorageError as exc:
                self._outage.failed(exc)
            except Exception:  # the thread must outlive any one bad renewal
                logger.exception("fair queues: renewing this worker's registration failed")
            self._stop.wait(self.interval)

    def run_once(self) -> int:
        """Renew the registration at every fair queue this worker consumes; how many.

        Raises:
            StorageError: When the tuning Redis fails.
        """
        node, capacity, consumed = consumer_capacity(self.app)
        if not node or capacity <= 0 or not has_fair_task(self.app):
            return 0
        store = fair_store(self.runtime, mover=True)
        claim_ttl_us = int(self.runtime.config.park_claim_ttl * 1_000_000)
        renewed = 0
        for queue in store.queues():
            if queue in consumed:
                store.release(queue, 0, claim_ttl_us, claim_ttl_us, node, capacity, int(NODE_TTL * 1_000_000),
                              self.runtime.config.fair_window)
                renewed += 1
        return renewed


def start_consumer_registration(app: Any) -> Optional[ConsumerRegistration]:
    """A started :class:`ConsumerRegistration` for a worker whose parking mover is off, when ``app``
    has a fair task (else None); logged."""
    if not has_fair_task(app):
        return None
    logger.info("celery-tuning: the parking mover is off on this worker (tuning_park_mover=False): it "
                "dispatches no fair queue; it registers its capacity for the fair queues it consumes, "
                "whose calls other workers' dispatchers release (none running: none are)")
    return ConsumerRegistration(app).start()


# -- the dispatcher: the parking mover's part ------------------------------------------------------


class FairMovingRound(NamedTuple):
    """What one round of the dispatcher did."""

    published: int
    #: A release came back full: more may be released now.
    full: bool
    #: Messages wait in some queue (the mover keeps its busy pace; a start also wakes it).
    waiting: bool


class FairMoving:
    """The parking mover's part for ``@fair``: releases each fair queue's messages round-robin.

    Arguments:
        mover: The :class:`~celery_tuning.integration.mover.Mover` whose thread, batch, claim TTL
            and refresh interval it uses.
    """

    def __init__(self, mover: Any) -> None:
        self.mover = mover
        self.app = mover.app
        self.runtime: TuningRuntime = mover.runtime
        self._has_fair = False
        self._has_fair_at = -1e9
        self._queues: List[str] = []
        self._queues_at = -1e9
        #: Messages waited (or were in a window) at the last round: keep the index alive.
        self._busy = False
        #: Messages released since start (all queues).
        self.released = 0

    @property
    def store(self) -> FairStore:
        return fair_store(self.runtime, mover=True)

    def active(self, now: float) -> bool:
        """Whether the app has a fair task (read again every ``spots_ttl`` seconds)."""
        if now - self._has_fair_at >= self.mover.spots_ttl:
            self._has_fair = has_fair_task(self.app)
            self._has_fair_at = now
        return self._has_fair

    def queues(self, now: float) -> List[str]:
        """The queues of the fair index (read again every ``spots_ttl`` seconds)."""
        if now - self._queues_at >= self.mover.spots_ttl:
            self._queues = self.store.queues(keep=self._busy)
            self._queues_at = now
        return self._queues

    def run_once(self, now: float) -> FairMovingRound:
        """Release, publish and acknowledge once over every fair queue.

        Raises:
            StorageError: When the tuning Redis fails (messages claimed so far are released again
            after the claim TTL); the broker's errors likewise.
        """
        if not self.active(now):
            return FairMovingRound(0, False, False)
        published, full, waiting, busy = 0, False, False, False
        for queue in self.queues(now):
            done, was_full, left, in_window = self._release(queue)
            published += done
            full = full or was_full
            waiting = waiting or left
            busy = busy or left or in_window
        self._busy = busy
        return FairMovingRound(published, full, waiting)

    def run_woken(self, queues: Set[str]) -> int:
        """Release at the queues whose window a start just freed; how many were published."""
        if not self.active(time.monotonic()):
            return 0
        return sum(self.release(queue)[0] for queue in sorted(queues))

    def release(self, queue: str) -> Tuple[int, bool, bool]:
        """One release at ``queue``: (published, the batch was full, messages still wait)."""
        return self._release(queue)[:3]

    def _release(self, queue: str) -> Tuple[int, bool, bool, bool]:
        config = self.runtime.config
        node, capacity, consumed = consumer_capacity(self.app)
        batch = self.mover.batch
        claim_ttl_us = self.mover.claim_ttl_us
        store = self.store
        done = store.release(queue, batch, claim_ttl_us, claim_ttl_us, node,
                             capacity if queue in consumed else 0, int(NODE_TTL * 1_000_000), config.fair_window)
        published = self._publish(store, queue, done.released) if done.released else 0
        if events.FAIR_COUNT.subscribers:
            events.fair_count(queue, done.waiting, done.keys, done.in_window)
        return published, len(done.released) >= batch, done.waiting > 0, done.in_window > 0

    def _reject(self, store: FairStore, queue: str, entry: FairReleased, why: str) -> None:
        """``entry`` could not be published for a reason of its own: it leaves the window, and is
        claimed again after a rest or, after :data:`PUBLISH_ATTEMPTS` claims, set aside."""
        foreign = why == NO_SUCH_TASK
        attempts = FOREIGN_ATTEMPTS if foreign else PUBLISH_ATTEMPTS
        rest = min(FOREIGN_REST * 2 ** max(0, entry.pub - 1), self.mover.claim_ttl_us / 1e6)
        answer = store.reject(queue, entry.msg_id, entry.pub, int(rest * 1_000_000), attempts)
        if answer == UNDELIVERABLE:
            # The task's name and id only: never its arguments.
            logger.warning("fair dispatcher: message %s (task %r) of queue %s could not be published in %d "
                           "attempts (%s): set aside as undeliverable (`celery tuning fair show` counts it, "
                           "`celery tuning fair purge %s` drops it)", entry.msg_id, _task_of(entry), queue,
                           entry.pub, why, queue)

    def _publish(self, store: FairStore, queue: str, released: List[FairReleased]) -> int:
        def give_back(entry: FairReleased, exc: Any) -> None:
            if _warned.first(("foreign", queue, exc.task)):
                logger.warning("fair dispatcher: queue %s holds task %r, which this app does not have: "
                               "left for an app that has it, set aside as undeliverable after %d attempts "
                               "(a deploy removed or renamed it? two apps sharing the queue: give each "
                               "its own tuning_key_prefix)", queue, exc.task, FOREIGN_ATTEMPTS)
            self._reject(store, queue, entry, NO_SUCH_TASK)

        def reject(entry: FairReleased, exc: BaseException) -> None:
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
            if entry.pub < PUBLISH_ATTEMPTS:
                logger.warning("fair dispatcher: could not publish message %s (task %r) of queue %s (%s); "
                               "attempt %d of %d", entry.msg_id, _task_of(entry), queue, why, entry.pub,
                               PUBLISH_ATTEMPTS, exc_info=entry.pub == 1)
            self._reject(store, queue, entry, why)

        done, _ = publish_claimed(
            self.app, released, lambda entry, producer: self.publish(queue, entry, producer=producer),
            lambda entry: store.ack(queue, entry.msg_id, entry.pub), give_back,
            lambda entry: (f"fair dispatcher: could not publish message {entry.msg_id} of queue {queue}; it is "
                           "tried again after tuning_park_claim_ttl"), logger, reject)
        if done:
            self.released += done
            events.fair_released(queue, done)
        return done

    def publish(self, queue: str, entry: FairReleased, producer: Any = None) -> Any:
        """Publish one released message to its queue with the :data:`HEADER_FAIR` ticket (no ack).

        Raises:
            ForeignEntry: When the message's task is not one of this app's.
        """
        return publish_held(self.app, decode_payload(entry.payload), entry.msg_id, HEADER_FAIR,
                            {"q": queue, "id": entry.msg_id, "pub": entry.pub, "k": entry.digest}, producer)


def _task_of(entry: FairReleased) -> str:
    """The task name in a released message's payload ("?" when it cannot be read)."""
    try:
        return str(json.loads(entry.payload).get("task", "?"))
    except (ValueError, AttributeError):
        return "?"


register_step("fair", FairStep)
