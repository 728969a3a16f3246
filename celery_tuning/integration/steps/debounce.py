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
it runs (a dead worker's mark expires within ``tuning_concurrency_lease_ttl``) and cleared at its
end, which makes the call that came meanwhile (the next pending run) due.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ... import events
from ...errors import ConfigurationError, StorageError
from ...policy.debounce import DEFAULT_KEY, DebouncePolicy
from ...storage.debounce import STALE_DUPLICATE, STARTED_WITH_MARK, DebounceClaimed, DebounceStore
from ...storage.process import PerProcess
from ..deferral import PAYLOAD_VERSION, _ignored, decode_payload, is_eager, route_declarations
from ..pipeline import Call, CallContext, PublishCall, PublishContext, Step, register_step
from ..runtime import TuningRuntime, runtime_for

__all__ = ["HEADER_DEBOUNCE", "DebounceMoving", "DebounceRound", "DebounceStep", "debounce_store", "key_digest"]

logger = logging.getLogger("celery_tuning.debounce")

#: Set by the mover on a debounced run it publishes: ``{"k": key digest, "pub": n}``.
HEADER_DEBOUNCE = "tuning_debounce"
#: Registry kind of the app's debounce stores.
_STORE = "debounce"
#: ``apply_async`` options that are the caller's connection to the broker, not part of the call.
_TRANSPORT = ("producer", "connection", "publisher", "router", "declare", "add_to_parent")


def key_digest(policy: DebouncePolicy, args: Any, kwargs: Any) -> str:
    """The key a call collapses under: ``-`` for the task alone, else a digest of what ``key=``
    returns (the raw key never reaches Redis)."""
    if policy.key is None:
        return DEFAULT_KEY
    value = policy.key(*(args or ()), **(kwargs or {}))
    return hashlib.sha256(str(value).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def debounce_store(runtime: TuningRuntime, mover: bool = False) -> DebounceStore:
    """The app's debounce store (``mover``: on the mover's own connection); built once per registry."""

    def build() -> DebounceStore:
        from ...storage.debounce import MemoryDebounceStore, RedisDebounceStore

        if runtime.in_memory:
            return MemoryDebounceStore() if not mover else debounce_store(runtime)
        config = runtime.config
        connector = runtime.connector
        if mover:
            from ...storage.redis import MOVER_CLIENT_NAME

            connector = runtime.connector_named(MOVER_CLIENT_NAME)
        return RedisDebounceStore(connector, prefix=config.key_prefix,
                                  ticket_ttl_us=int(config.park_ticket_ttl * 1_000_000))

    return runtime.registry.get(_STORE, "mover" if mover else "store", build)


class _Once:
    """Log a condition once per process until it clears (the tuning Redis failing)."""

    def __init__(self) -> None:
        self.failing = False

    def failed(self, what: str, exc: BaseException) -> None:
        if not self.failing:
            self.failing = True
            logger.warning("celery-tuning @debounce: tuning Redis failed %s (%s); %s until it answers again",
                           what, exc, "publishing debounced calls at once" if what == "storing a call"
                           else "running debounced runs without their mark")

    def answered(self) -> None:
        if self.failing:
            self.failing = False
            logger.info("celery-tuning @debounce: tuning Redis answers again")


_publish_side, _worker_side = _Once(), _Once()


def _serializer(task: Any) -> str:
    return str(getattr(task, "serializer", None) or task._app.conf.task_serializer)


class DebounceStep(Step):
    """Built once per task class when it is bound."""

    kind = "debounce"

    def __init__(self, policy: DebouncePolicy, task_cls: Any) -> None:
        self.policy = policy
        self.task_name = task_cls.name
        self.runtime = runtime_for(task_cls._app)
        serializer = _serializer(task_cls)
        if serializer != "json":
            raise ConfigurationError(
                f"@debounce: the task's serializer is {serializer!r}; debounced calls wait in the tuning "
                "Redis as JSON (nothing read from Redis is unpickled): give the task serializer='json'")
        if self.runtime.config.defer_via != "park":
            raise ConfigurationError(
                "@debounce needs tuning_defer_via='park' (got 'countdown'): the parking mover in the "
                "workers publishes debounced runs")
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
                return publish_next(pctx)  # a mover publishing a run, or no broker to wait for
            serializer = options.get("serializer") or _serializer(task)
            if serializer != "json":
                raise ConfigurationError(
                    f"task {name!r}: @debounce: apply_async(serializer={serializer!r}): debounced calls wait "
                    "in the tuning Redis as JSON (nothing read from Redis is unpickled); send them as JSON")
            digest = key_digest(policy, pctx.args, pctx.kwargs)
            payload = self._payload(pctx)
            if payload is None:
                return publish_next(pctx)
            run_id = str(pctx.task_id or uuid.uuid4())
            try:
                run_id, collapsed = debounce_store(runtime).call(name, digest, run_id, payload, self.delay_us,
                                                                 self.max_wait_us)
            except StorageError as exc:
                _publish_side.failed("storing a call", exc)
                return publish_next(pctx)
            _publish_side.answered()
            if collapsed:
                events.debounced(name)  # metrics, counted per task (never per key)
            return task.AsyncResult(run_id)

        return publish

    def _payload(self, pctx: PublishContext) -> Optional[str]:
        """The call's signature as JSON (no task id: the pending run's id is kept by the store), or
        None when its options cannot be (the call is then published at once, logged once).

        Raises:
            kombu.exceptions.EncodeError: When its arguments are not JSON-encodable (Celery would
                refuse to publish them as JSON too).
        """
        from kombu.exceptions import EncodeError
        from kombu.utils.json import dumps

        task = pctx.task
        options = {k: v for k, v in pctx.options.items() if k not in _TRANSPORT and k != "task_id"}
        parent = task._app.current_worker_task
        if parent is not None and "parent_id" not in options:
            # The mover publishes from no task: keep the caller's place in the workflow now.
            options["parent_id"] = parent.request.id
            options["root_id"] = parent.request.root_id or parent.request.id
        data = dict(task.signature(pctx.args, pctx.kwargs, options))
        data["v"] = PAYLOAD_VERSION
        try:
            return str(dumps(data))
        except (TypeError, ValueError, OverflowError) as exc:
            try:
                dumps([pctx.args, pctx.kwargs])
            except (TypeError, ValueError, OverflowError):
                raise EncodeError(f"task {self.task_name!r}: @debounce: the call's arguments are not "
                                  f"JSON-encodable: {exc}") from None
            if _once_options.first(self.task_name):
                logger.warning("task %s: a debounced call whose apply_async options are not JSON-encodable "
                               "(%s) is published at once, not debounced", self.task_name, exc)
            return None

    # -- worker side ----------------------------------------------------------------------------

    def wrap(self, call_next: Call) -> Call:
        runtime, name = self.runtime, self.task_name
        lease_us = int(runtime.config.concurrency_lease_ttl * 1_000_000)

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
                _worker_side.failed("starting a debounced run", exc)
                return call_next(ctx)
            _worker_side.answered()
            if verdict == STALE_DUPLICATE:
                logger.info("task %s[%s]: dropped a duplicate of a debounced run (publication %d)", name, run_id, pub)
                raise _ignored(f"duplicate of debounced run {run_id} (publication {pub})")
            if verdict != STARTED_WITH_MARK:
                return call_next(ctx)  # another run holds the key (a redelivery or retry of an older one)
            mark = _marks.get().hold(store, name, digest, run_id, lease_us)
            try:
                return call_next(ctx)
            finally:
                _marks.get().let_go(mark)

        return call


class _OnceByKey:
    def __init__(self) -> None:
        self._seen: set = set()
        self._lock = threading.Lock()

    def first(self, key: Any) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True


_once_options = _OnceByKey()


def _debounce_info(request: Any) -> Optional[Dict[str, Any]]:
    headers = getattr(request, "headers", None) or {}
    info = headers.get(HEADER_DEBOUNCE) if isinstance(headers, dict) else None
    if info is None:
        info = getattr(request, HEADER_DEBOUNCE, None)
    return info if isinstance(info, dict) else None


# -- running marks: renewed while the run runs ----------------------------------------------------

_Mark = Tuple[int, str, str, str]


class _Marks:
    """One process's running marks and the thread renewing them (every lease TTL / 3).

    Per process: a forked child must not renew its parent's marks, nor find a lock held by a parent
    thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: Dict[_Mark, Tuple[DebounceStore, int]] = {}
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

    def let_go(self, mark: _Mark) -> None:
        with self.lock:
            found = self.held.pop(mark, None)
        if found is not None:
            self._end(found[0], mark)

    @staticmethod
    def _end(store: DebounceStore, mark: _Mark) -> None:
        try:
            store.end(mark[1], mark[2], mark[3])
        except StorageError:
            pass  # the mark expires by itself within the lease TTL

    def renew(self) -> None:
        with self.lock:
            held = list(self.held.items())
        for mark, (store, lease_us) in held:
            try:
                store.renew(mark[1], mark[2], mark[3], lease_us)
            except StorageError as exc:
                if not self.failing:
                    self.failing = True
                    logger.warning("celery-tuning @debounce: renewing running marks failed (%s)", exc)
                continue
            self.failing = False
            with self.lock:
                ended = mark not in self.held
            if ended:
                # The run ended while this renewal was on its way, which put the mark back: clear it
                # again, or it would hold the key for a whole lease TTL.
                self._end(store, mark)

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
        from ..mover import _NO_FORK_WHILE_PUBLISHING

        done = 0
        # A published run holds its key as long as a claim would, until a worker starts it.
        sent_ttl_us = self.mover.claim_ttl_us
        with _NO_FORK_WHILE_PUBLISHING, self.app.producer_or_acquire() as producer:
            for entry in claimed:
                try:
                    self.publish(entry, producer=producer)
                except (TypeError, ValueError, KeyError):
                    # Unreadable by this version: it stays claimed and comes back after the claim TTL.
                    logger.exception("parking mover: cannot decode debounced run %s of %s", entry.task_id, name)
                    continue
                store.ack(name, entry.digest, entry.task_id, entry.pub, sent_ttl_us)
                done += 1
        return done

    def publish(self, entry: DebounceClaimed, producer: Any = None) -> Any:
        """Publish one claimed run to its queue with the :data:`HEADER_DEBOUNCE` ticket (no ack)."""
        signature = self.app.signature(decode_payload(entry.payload))
        signature.options["task_id"] = entry.task_id
        headers: Dict[str, Any] = dict(signature.options.get("headers") or {})
        headers[HEADER_DEBOUNCE] = {"k": entry.digest, "pub": entry.pub}
        signature.options["headers"] = headers
        declare = route_declarations(self.app, signature.options)
        if declare:
            signature.options["declare"] = declare
        return signature.apply_async(producer=producer)


register_step("debounce", DebounceStep)
