"""The pipeline step that applies ``@debounce``: calls collapse into one run, published by the parking mover.

Publish side (:meth:`DebounceStep.publish`): ``apply_async`` does not publish. One script stores
the call as the pending run of its key (its signature as JSON, the latest call's, due ``delay``
after this call and at most ``max_wait`` after the first) and answers the pending run's task id,
so every collapsed caller holds an ``AsyncResult`` of the run that will happen. The tuning Redis
failing here publishes the call at once (logged once): a call is never dropped.

Mover (:class:`DebounceMoving`, one more part of each round of
:class:`~celery_tuning.integration.mover.Mover`): claims due runs of keys no other run holds,
publishes them with the :data:`HEADER_DEBOUNCE` ticket and acknowledges; a mover that dies
between the two leaves a claim that expires and is published again under a higher ticket.

Worker side (:meth:`DebounceStep.wrap`): a run from a mover first asks the store to start: a stale
duplicate is dropped; else it holds the key's running mark, renewed like a concurrency lease while
it runs (a dead worker's mark expires within ``tuning_concurrency_lease_ttl``) and cleared when the
run ends, which makes the call that came meanwhile (the next pending run) due. An attempt that
publishes the run again under its id (``Task.retry``, a deferral, a park) keeps the key, as queued,
for the next attempt. The worker's main process frees the key of a run it revoked, rejected or
did not know (:func:`connect_receivers`).

Calls somebody waits for under their own id (canvas members, links, frozen signatures, an explicit
``task_id`` that is not the pending run's) are published at once, not debounced (:func:`waited_on`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ... import events
from ...errors import ConfigurationError, StorageError
from ...policy.cachekeys import UncacheableArgument, key_function_digest
from ...policy.debounce import DEFAULT_KEY, DebouncePolicy
from ...storage.debounce import STALE_DUPLICATE, STARTED_WITH_MARK, DebounceClaimed, DebounceStore
from ...storage.process import PerProcess
from ..deferral import HEADER_PARK, Deferred, _ignored, decode_payload, is_eager
from ..pipeline import Call, CallContext, PublishCall, PublishContext, Step, register_step
from ..runtime import TuningRuntime, installed_runtime, runtime_for
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
    "HEADER_DEBOUNCE", "DebounceMoving", "DebounceRound", "DebounceStep", "connect_receivers", "debounce_store",
    "key_digest", "queued_ttl_us", "waited_on",
]

logger = logging.getLogger("celery_tuning.debounce")

#: Set by the mover on a debounced run it publishes: ``{"k": key digest, "pub": n}``.
HEADER_DEBOUNCE = "tuning_debounce"
#: Registry kind of the app's debounce stores.
_STORE = "debounce"
#: The payload's field naming the app that stored the run: only its movers publish it.
_APP_FIELD = "tuning_app"
#: Seconds until a run another app stored, which a mover gave back, may be claimed again.
FOREIGN_REST = 1.0

#: ``apply_async`` options with which Celery publishes a call whose very id somebody waits for (a
#: chord's body, a chain's next member, a group's result, a ``link=`` callback's parent, the
#: caller of a frozen signature): such a call is published at once with its own id, never
#: collapsed into another run's. Present at all (any value, even ``[]``): ``chain`` (a chain's
#: members; the tracer publishes the last one with ``chain=[]``), ``reply_to`` (set by
#: ``Signature.freeze``), ``replaced_task_nesting`` (``Task.replace``), ``retries`` (``Task.retry``
#: and every re-publication built by ``signature_from_request``). Given a value: the others, which a
#: plain call has none of (``parent_id``/``root_id``: the tracer publishing callbacks; Celery fills
#: them in later, in ``send_task``, for a plain call made inside a task).
_WAITED_PRESENT = ("chain", "reply_to", "replaced_task_nesting", "retries")
_WAITED_SET = ("link", "link_error", "chord", "group_id", "group_index", "parent_id", "root_id")


def waited_on(options: Dict[str, Any]) -> bool:
    """Whether ``apply_async`` options are those of a canvas member, a frozen signature or a call
    published again (a retry, a parked call's return): published at once, not debounced."""
    if any(name in options for name in _WAITED_PRESENT):
        return True
    if any(options.get(name) not in (None, (), [], {}) for name in _WAITED_SET):
        return True
    headers = options.get("headers")
    return isinstance(headers, dict) and HEADER_PARK in headers


def key_digest(policy: DebouncePolicy, args: Any, kwargs: Any) -> str:
    """The key a call collapses under: ``-`` for the task alone, else a digest of the canonical JSON
    of what ``key=`` returns (as the result cache's keys: ``1`` and ``"1"`` are two keys, and so
    are ``1`` and ``1.0``); the raw key never reaches Redis.

    Raises:
        UncacheableArgument: When ``key=`` returns a value with no canonical JSON form (an object
            of a class of its own, a set, a dict with non-string keys), naming the key function.
    """
    if policy.key is None:
        return DEFAULT_KEY
    try:
        return key_function_digest(policy.key, tuple(args or ()), dict(kwargs or {}))[:24]
    except UncacheableArgument as exc:
        raise UncacheableArgument("key", None, f"@debounce(key=...): {exc}; return str, int, float, bool, "
                                  "None, bytes, or lists and str-keyed dicts of them") from None


def queued_ttl_us(runtime: TuningRuntime) -> int:
    """How long a debounced run published (or published again by a retry or a deferral) and not yet
    started holds its key: ``tuning_dedupe_ttl`` (the bound @dedupe holds a queued call's key by),
    at least ``tuning_park_claim_ttl``. A queue backlog shorter than that never lets the next run
    out before this one starts; a message lost on its way (a purged queue) holds the key that long."""
    config = runtime.config
    return int(max(config.dedupe_ttl, config.park_claim_ttl) * 1_000_000)


def debounce_store(runtime: TuningRuntime, mover: bool = False) -> DebounceStore:
    """The app's debounce store (``mover``: on the mover's own connection); built once per registry."""

    def memory() -> DebounceStore:
        from ...storage.debounce import MemoryDebounceStore

        return MemoryDebounceStore()

    def redis(connector: Any) -> DebounceStore:
        from ...storage.debounce import RedisDebounceStore

        config = runtime.config
        return RedisDebounceStore(connector, prefix=config.key_prefix,
                                  ticket_ttl_us=int(config.park_ticket_ttl * 1_000_000))

    return held_store(runtime, _STORE, mover, memory, redis)


_publish_side = StoreOutage(logger, "@debounce", "storing a call", "publishing debounced calls at once")
_worker_side = StoreOutage(logger, "@debounce", "starting a debounced run", "running debounced runs without their mark")
#: Warnings logged once per process (per task, per foreign task).
_warned = FirstTime()


class DebounceStep(Step):
    """Built once per task class when it is bound."""

    kind = "debounce"

    def __init__(self, policy: DebouncePolicy, task_cls: Any) -> None:
        self.policy = policy
        self.task_name = task_cls.name
        self.runtime = runtime_for(task_cls._app)
        check_held_task(task_cls, self.runtime, "@debounce", "debounced", "publishes debounced runs")
        if "dedupe" in (getattr(task_cls, "_tuning_policies", None) or {}):
            raise ConfigurationError(
                "@debounce and @dedupe on one task: @debounce already keeps one pending and one running "
                "run per key, and @dedupe would swallow the run the mover publishes (its callers would "
                "wait forever); keep one of the two")
        self.delay_us = int(policy.delay * 1_000_000)
        self.max_wait_us = None if policy.max_wait is None else int(policy.max_wait * 1_000_000)

    # -- publish side ---------------------------------------------------------------------------

    def publish(self, publish_next: PublishCall) -> Optional[PublishCall]:
        runtime, policy, name = self.runtime, self.policy, self.task_name

        def publish(pctx: PublishContext) -> Any:
            options = pctx.options
            headers = options.get("headers") or {}
            task = pctx.task
            if (not runtime.enabled or HEADER_DEBOUNCE in headers or task._app.conf.task_always_eager):
                return publish_next(pctx)  # a mover publishing a run (or a run's retry), or no broker
            if waited_on(options):
                return publish_next(pctx)  # its own id is waited for: never collapsed into another run
            serializer = options.get("serializer") or task_serializer(task)
            if serializer != "json":
                raise ConfigurationError(
                    f"task {name!r}: @debounce: apply_async(serializer={serializer!r}): debounced calls wait "
                    "in the tuning Redis as JSON (nothing read from Redis is unpickled); send them as JSON")
            try:
                digest = key_digest(policy, pctx.args, pctx.kwargs)
            except UncacheableArgument as exc:
                raise UncacheableArgument("key", None, f"task {name!r}: {exc}") from None
            payload = self._payload(pctx)
            if payload is None:
                return publish_next(pctx)
            own_id = pctx.task_id is not None
            run_id = str(pctx.task_id or uuid.uuid4())
            try:
                found, collapsed = debounce_store(runtime).call(name, digest, run_id, payload, self.delay_us,
                                                                self.max_wait_us, own_id=own_id)
            except StorageError as exc:
                _publish_side.failed(exc)
                return publish_next(pctx)
            _publish_side.answered()
            if own_id and found != run_id:
                return publish_next(pctx)  # the caller waits for the id it gave: that id runs
            if collapsed:
                events.debounced(name)  # metrics, counted per task (never per key)
            return add_to_parent(task, options, task.AsyncResult(found))

        return publish

    def _payload(self, pctx: PublishContext) -> Optional[str]:
        """The call's signature as JSON (no task id: the pending run's id is kept by the store), or
        None when its options cannot be (the call is then published at once, logged once).

        Raises:
            kombu.exceptions.EncodeError: When its arguments are not JSON-encodable (Celery would
                refuse to publish them as JSON too).
        """
        options = {k: v for k, v in pctx.options.items() if k not in TRANSPORT_OPTIONS and k != "task_id"}
        return encode_call(pctx, options, {_APP_FIELD: _app_name(pctx.task._app)}, logger=logger,
                           feature="@debounce", held_as="debounced", not_held="debounced", warned=_warned)

    # -- worker side ----------------------------------------------------------------------------

    def wrap(self, call_next: Call) -> Call:
        from celery.exceptions import Reject, Retry

        runtime, name = self.runtime, self.task_name
        lease_us = int(runtime.config.concurrency_lease_ttl * 1_000_000)
        queued_us = queued_ttl_us(runtime)

        def requeued_for(exc: BaseException) -> Optional[int]:
            """How long the key stays held, queued, when the attempt ended by publishing the run
            again under its id (a retry, a deferral or a park, a requeueing reject), else None."""
            if isinstance(exc, Retry):
                return queued_us + _retry_delay_us(exc.when)
            if isinstance(exc, Deferred) or (isinstance(exc, Reject) and getattr(exc, "requeue", False)):
                return queued_us
            return None

        def call(ctx: CallContext) -> Any:
            request = ctx.request
            info = _debounce_info(request)
            if info is None or is_eager(request):
                return call_next(ctx)
            try:
                digest, pub = str(info["k"]), int(info["pub"])
            except (KeyError, TypeError, ValueError):
                return call_next(ctx)
            run_id = str(request.id)
            store = debounce_store(runtime)
            try:
                verdict = store.start(name, digest, run_id, pub, lease_us)
            except StorageError as exc:
                _worker_side.failed(exc)
                return call_next(ctx)
            _worker_side.answered()
            if verdict == STALE_DUPLICATE:
                logger.info("task %s[%s]: dropped a duplicate of a debounced run (publication %d)", name, run_id, pub)
                raise _ignored(f"duplicate of debounced run {run_id} (publication {pub})")
            if verdict != STARTED_WITH_MARK:
                return call_next(ctx)  # another run holds the key (a redelivery or retry of an older one)
            mark = _marks.get().hold(store, name, digest, run_id, lease_us)
            try:
                result = call_next(ctx)
            except BaseException as exc:
                # The same run (same id) comes back: the key stays its own, or the next pending run
                # could start before it, and its older arguments would run last.
                _marks.get().let_go(mark, requeued_for(exc))
                raise
            _marks.get().let_go(mark)
            return result

        return call


def _retry_delay_us(when: Any) -> int:
    """µs until a retry is due (``Retry.when``: seconds or an ETA), 0 when unknown."""
    import datetime

    try:
        if isinstance(when, (int, float)):
            return max(0, int(when * 1_000_000))
        if isinstance(when, datetime.datetime):
            now = datetime.datetime.now(when.tzinfo) if when.tzinfo else datetime.datetime.now()
            return max(0, int((when - now).total_seconds() * 1_000_000))
    except (TypeError, ValueError, OverflowError):
        pass
    return 0


def _app_name(app: Any) -> str:
    return str(getattr(app, "main", None) or "")


def _debounce_info(request: Any) -> Optional[Dict[str, Any]]:
    return message_ticket(request, HEADER_DEBOUNCE)


# -- running marks: renewed while the run runs ----------------------------------------------------

_Mark = Tuple[int, str, str, str]


class _Marks:
    """One process's running marks and the thread renewing them (every lease TTL / 3).

    Per process: a forked child must not renew its parent's marks, nor find a lock held by a parent
    thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: Dict[_Mark, Tuple[DebounceStore, int]] = {}
        #: Marks a renewal is on its way for, and what their run's end did meanwhile (the renewal
        #: puts the mark back as running: the end is done again after it).
        self.renewing: Dict[_Mark, Optional[Tuple[Optional[int]]]] = {}
        self.thread: Optional[threading.Thread] = None
        self.failing = False

    def hold(self, store: DebounceStore, task: str, digest: str, run_id: str, lease_us: int) -> _Mark:
        mark = (id(store), task, digest, run_id)
        with self.lock:
            self.held[mark] = (store, lease_us)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._renew_loop, name="celery-tuning-debounce-marks",
                                               daemon=True)
                self.thread.start()
        return mark

    def let_go(self, mark: _Mark, queued_us: Optional[int] = None) -> None:
        """The attempt ended: the run's key is freed, or (``queued_us``: the run was published again
        under its id) kept, queued, that long for its next attempt."""
        with self.lock:
            found = self.held.pop(mark, None)
            if found is not None and mark in self.renewing:
                self.renewing[mark] = (queued_us,)
        if found is not None:
            self._end(found[0], mark, queued_us)

    @staticmethod
    def _end(store: DebounceStore, mark: _Mark, queued_us: Optional[int] = None) -> None:
        try:
            if queued_us is None:
                store.end(mark[1], mark[2], mark[3])
            else:
                store.requeue(mark[1], mark[2], mark[3], queued_us)
        except StorageError:
            pass  # the mark expires by itself within the lease TTL

    def renew(self) -> None:
        with self.lock:
            held = list(self.held.items())
        for mark, (store, lease_us) in held:
            with self.lock:
                if mark not in self.held:
                    continue
                self.renewing[mark] = None
            try:
                store.renew(mark[1], mark[2], mark[3], lease_us)
            except StorageError as exc:
                if not self.failing:
                    self.failing = True
                    logger.warning("celery-tuning @debounce: renewing running marks failed (%s)", exc)
                with self.lock:
                    self.renewing.pop(mark, None)
                continue
            self.failing = False
            with self.lock:
                ended = self.renewing.pop(mark, None)
            if ended is not None:
                # The run ended while this renewal was on its way, which put the mark back as
                # running: do its end again (free the key, or keep it queued for a retry), or it
                # would hold the key as running for a whole lease TTL.
                self._end(store, mark, ended[0])

    def _renew_loop(self) -> None:
        while True:
            with self.lock:
                leases = [lease for _, lease in self.held.values()]
            pause = max(min(leases, default=30_000_000) / 3 / 1_000_000, 0.05)
            time.sleep(pause)
            try:
                self.renew()
            except Exception:  # the renewer must outlive any one bad round
                logger.exception("celery-tuning @debounce: renewing running marks failed")


_marks: PerProcess[_Marks] = PerProcess(_Marks, name="debounce running marks")


# -- the worker's main process: runs that end without their pool process --------------------------


def _free_dropped(app: Any, name: Any, task_id: Any, info: Optional[Dict[str, Any]], why: str) -> None:
    """Free the key a dropped run (revoked, rejected, unknown here) holds, if that id still holds it:
    else it would hold the key, published and never started, for the whole queued bound."""
    if info is None or app is None or not isinstance(name, str) or not task_id:
        return
    digest = info.get("k")
    runtime = installed_runtime(app)
    if not isinstance(digest, str) or runtime is None:
        return
    try:
        if not runtime.enabled:
            return
        debounce_store(runtime).end(name, digest, str(task_id))
    except (StorageError, ConfigurationError) as exc:
        logger.warning("celery-tuning @debounce: could not free the key of %s run %s[%s] (%s); it is freed "
                       "when its bound passes", why, name, task_id, exc)


def _on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A revoked run (dropped when it reaches a worker, or terminated while it runs) frees its key."""
    if request is None:
        return
    info = _debounce_info(request)
    if info is None:
        return
    task = sender if sender is not None else getattr(request, "task", None)
    _free_dropped(getattr(task, "_app", None) or getattr(task, "app", None), getattr(task, "name", None),
                  getattr(request, "id", None), info, "revoked")


def _on_message_dropped(sender: Any = None, message: Any = None, **_: Any) -> None:
    """A message no worker will run (``task_unknown``: not registered here; ``task_rejected``: it
    cannot be decoded): its headers name the task, its id and the key its run holds."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict):
        return
    info = headers.get(HEADER_DEBOUNCE)
    _free_dropped(getattr(sender, "app", None), headers.get("task"), headers.get("id"),
                  info if isinstance(info, dict) else None, "dropped")


def connect_receivers() -> None:
    """Free the keys of runs the worker's main process drops (idempotent; done on import)."""
    from celery import signals as celery_signals

    celery_signals.task_revoked.connect(_on_task_revoked, weak=False, dispatch_uid="celery_tuning.debounce.revoked")
    celery_signals.task_unknown.connect(_on_message_dropped, weak=False,
                                        dispatch_uid="celery_tuning.debounce.unknown")
    celery_signals.task_rejected.connect(_on_message_dropped, weak=False,
                                         dispatch_uid="celery_tuning.debounce.rejected")


connect_receivers()


# -- the mover's part -----------------------------------------------------------------------------


class DebounceRound(NamedTuple):
    """What one round of the mover did for debounced runs."""

    published: int
    #: A claim came back full: more may be due now.
    full: bool
    #: The earliest time a key of the app's debounced tasks is to be looked at (µs), or None.
    next_due_us: Optional[int]


class DebounceMoving:
    """The parking mover's part for ``@debounce``: publishes due debounced runs of its app's tasks.

    Arguments:
        mover: The :class:`~celery_tuning.integration.mover.Mover` whose thread, batch, claim TTL
            and spot refresh interval it uses.
    """

    def __init__(self, mover: Any) -> None:
        self.mover = mover
        self.app = mover.app
        self.runtime: TuningRuntime = mover.runtime
        self._names: List[str] = []
        self._names_at = -1e9

    @property
    def store(self) -> DebounceStore:
        return debounce_store(self.runtime, mover=True)

    def names(self, now: float) -> List[str]:
        """The app's debounced tasks (read again every ``spots_ttl`` seconds)."""
        if now - self._names_at >= self.mover.spots_ttl:
            self._names = sorted(name for name, task in list(self.app.tasks.items())
                                 if "debounce" in (getattr(type(task), "_tuning_policies", None) or {}))
            self._names_at = now
        return self._names

    def run_once(self, now: float) -> DebounceRound:
        """Claim, publish and acknowledge the due runs of every debounced task once.

        Raises:
            StorageError: When the tuning Redis fails (runs claimed so far come back after the claim
            TTL); the broker's errors likewise.
        """
        published, full, earliest = 0, False, None
        names = self.names(now)
        if not names:
            return DebounceRound(0, False, None)
        store = self.store
        batch, claim_ttl_us = self.mover.batch, self.mover.claim_ttl_us
        for name in names:
            claimed = store.claim(name, batch, claim_ttl_us)
            if claimed:
                published += self._publish(store, name, claimed)
                full = full or len(claimed) >= batch
            due = store.next_due_us(name)
            if due is not None:
                earliest = due if earliest is None else min(earliest, due)
        return DebounceRound(published, full, earliest)

    def _publish(self, store: DebounceStore, name: str, claimed: List[DebounceClaimed]) -> int:
        # A published run holds its key until a worker starts it, within the queued bound.
        sent_ttl_us = queued_ttl_us(self.runtime)

        def give_back(entry: DebounceClaimed, exc: Any) -> None:
            # Another app sharing the tuning Redis (and prefix) stored it: its own movers publish it
            # through its broker; given back, claimable again shortly.
            store.unclaim(name, entry.digest, entry.task_id, entry.pub, int(FOREIGN_REST * 1_000_000))
            if _warned.first(("foreign", name, exc.task)):
                logger.warning("parking mover: debounced runs of %s were stored by another app (%r): "
                               "left for its movers (give each app its own tuning_key_prefix)", name, exc.task)

        done, failed = publish_claimed(
            self.app, claimed, lambda entry, producer: self.publish(entry, producer=producer),
            lambda entry: store.ack(name, entry.digest, entry.task_id, entry.pub, sent_ttl_us), give_back,
            lambda entry: (f"parking mover: could not publish debounced run {entry.task_id} of {name}; it is "
                           "tried again after tuning_park_claim_ttl"), logger)
        if failed > 1:
            logger.warning("parking mover: %d debounced runs of %s could not be published this round", failed, name)
        return done

    def publish(self, entry: DebounceClaimed, producer: Any = None) -> Any:
        """Publish one claimed run to its queue with the :data:`HEADER_DEBOUNCE` ticket (no ack).

        Raises:
            ForeignEntry: When the run's task is not one of this app's (another app stored it).
        """
        data = decode_payload(entry.payload)
        # The app's main name is kept for diagnostics only: a producer may name the app differently
        # from the worker (Celery(__name__) run as a script), and refusing its runs would lose them.
        data.pop(_APP_FIELD, None)
        return publish_held(self.app, data, entry.task_id, HEADER_DEBOUNCE, {"k": entry.digest, "pub": entry.pub},
                            producer)


register_step("debounce", DebounceStep)
