"""The pipeline step that applies ``@dedupe``: one queued (or running) call per key; ``task.dedupe``.

Publish side (:meth:`DedupeStep.publish`, around ``apply_async``): the call's task id is chosen
first (the caller's ``task_id`` or a new uuid), then one script claims the key for it or names the
task holding it; a duplicate gets the holder's ``AsyncResult`` and nothing is published. The key's
digest travels in the :data:`HEADER_DEDUPE` header.

Worker side (:meth:`DedupeStep.wrap`, outermost): when the body starts, the lock turns running
(``until="done"``: renewed every lease TTL / 3 by one thread per process, so a worker killed mid-run
frees the key within ``tuning_concurrency_lease_ttl``) or is released (``until="started"``). It is
freed when the attempt ends, kept (queued again) when the call is retried, deferred or replaced by
a call under the same key (the new message has the same id: a running call publishing itself
again queues its lock before the message exists), and freed from the worker's main process on a
hard time limit, a lost pool process and a revoke (:func:`connect_receivers`), and for a message
the worker drops unrun: an unregistered task, an undecodable message (:func:`_on_message_dropped`).
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from celery import signals as celery_signals
from celery.exceptions import Retry

from ... import events
from ...errors import ConfigurationError, DuplicateTask, StorageError
from ...policy.cachekeys import CallDigester, UncacheableArgument
from ...policy.dedupe import DedupePolicy
from ...storage.dedupe import CLAIMED, OTHER, DedupeLock, DedupeStore, RedisDedupeStore
from ...storage.process import PerProcess
from ..deferral import HEADER_PARK, Deferred, is_eager
from ..pipeline import Call, CallContext, PublishCall, PublishContext, Step, register_step
from ..runtime import installed_runtime, runtime_for

__all__ = ["HEADER_DEDUPE", "DedupeHandle", "DedupeStep", "connect_receivers"]

logger = logging.getLogger("celery_tuning.dedupe")

#: The key's digest (hex SHA-256), stamped on the message of a call whose key was claimed.
HEADER_DEDUPE = "tuning_dedupe"

#: ``apply_async`` options Celery passes to a canvas member, whose very id something waits for:
#: such a call is never answered with another call's id (the rest of its canvas would be lost,
#: or wait for an id nobody publishes); it claims a free key and is published either way.
#: Present at all (any value, even ``[]``): ``chain`` (a chain's member; the tracer publishes its
#: last one with ``chain=[]``), ``reply_to`` (set by ``Signature.freeze``: a frozen signature, whose
#: id a chord body, a ``link=`` callback or a caller holds), ``replaced_task_nesting``
#: (``Task.replace``). Given a value: ``link``, ``link_error``, ``chord`` (a chord's header),
#: ``group_id``, ``group_index`` (group members, chord headers, errbacks published as a group),
#: ``parent_id``, ``root_id`` (the tracer publishing callbacks and a chain's next member; Celery
#: fills both in itself only later, in ``send_task``, so a plain call made inside a task has neither).
_CANVAS_PRESENT = ("chain", "reply_to", "replaced_task_nesting")
_CANVAS_SET = ("link", "link_error", "chord", "group_id", "group_index", "parent_id", "root_id")


def _republished(options: Dict[str, Any]) -> bool:
    """Whether ``apply_async`` publishes an existing call again: ``Task.retry``, a deferral and a
    parked call's return (all built by ``signature_from_request``, which always sets ``retries``)."""
    if "retries" in options:
        return True
    headers = options.get("headers")
    return isinstance(headers, dict) and HEADER_PARK in headers


def _in_canvas(options: Dict[str, Any]) -> bool:
    return (any(name in options for name in _CANVAS_PRESENT)
            or any(options.get(name) not in (None, (), [], {}) for name in _CANVAS_SET))


def _digest_header(request: Any) -> Optional[str]:
    """The digest the publisher claimed under, when the message carries a well-formed one."""
    headers = getattr(request, "headers", None)
    found = headers.get(HEADER_DEDUPE) if isinstance(headers, dict) else None
    if found is None:
        found = getattr(request, HEADER_DEDUPE, None)
    if isinstance(found, str) and len(found) == 64 and all(c in "0123456789abcdef" for c in found):
        return found
    return None


class DedupeHandle:
    """``task.dedupe``: the task's held locks, from anywhere (the CLI uses it)."""

    def __init__(self, step: DedupeStep) -> None:
        self._step = step

    def locks(self, limit: int = 1000) -> List[DedupeLock]:
        """Locks held now (soonest expiry first), at most ``limit``.

        Raises:
            StorageError: When the tuning Redis fails.
        """
        return self._step.store.locks(self._step.task_name, limit)

    def clear(self) -> int:
        """Drop every lock of this task (the next identical call publishes); returns how many were held.
        A running call's lock comes back at its next renewal: it is still running.

        Raises:
            StorageError: When the tuning Redis fails.
        """
        return self._step.store.clear(self._step.task_name)

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The digest a call with these arguments is deduplicated under (``show`` prints digests)."""
        return self._step.digester(args, kwargs)

    @property
    def policy(self) -> DedupePolicy:
        """The task's ``@dedupe`` settings."""
        return self._step.policy


class _Running:
    """One process's running calls holding a lock of one task, and the thread renewing them."""

    __slots__ = ("held", "lock", "requeued", "thread", "wake")

    def __init__(self) -> None:
        #: task id -> (digest, deadline µs)
        self.held: Dict[str, Tuple[str, int]] = {}
        #: Running calls that published themselves again under their own key (``Task.retry``, a
        #: deferral, ``Task.replace``): their lock is queued already and stays when they end.
        self.requeued: Set[str] = set()
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None
        self.wake = threading.Event()


class DedupeStep(Step):
    """Built once per task class when it is bound."""

    kind = "dedupe"

    def __init__(self, policy: DedupePolicy, task_cls: Any) -> None:
        self.policy = policy
        self.task_name: str = task_cls.name
        self.app = task_cls._app
        self.runtime = runtime_for(self.app)
        run = task_cls.__dict__["run"]
        fun = run.__func__ if isinstance(run, staticmethod) else run
        signature = inspect.signature(fun)
        if not isinstance(run, staticmethod):  # bound task: drop ``self``
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        #: The result cache's key function: the call's canonical arguments (or ``key=``'s value), hashed.
        self.digester = CallDigester(signature, key=policy.key)
        self._dedupe_store: Optional[DedupeStore] = None
        self._running: PerProcess[_Running] = PerProcess(_Running, name=f"dedupe locks of {self.task_name}")
        self._warned: set = set()
        self.handle = DedupeHandle(self)
        connect_receivers()

    # -- what it runs on -----------------------------------------------------------------------

    @property
    def store(self) -> DedupeStore:
        store = self._dedupe_store
        if store is None:
            runtime = self.runtime
            store = self._dedupe_store = (runtime.memory.dedupe if runtime.in_memory else
                                          RedisDedupeStore(runtime.connector, runtime.config.key_prefix))
        return store

    @property
    def ttl_us(self) -> int:
        ttl = self.policy.ttl if self.policy.ttl is not None else self.runtime.config.dedupe_ttl
        return int(ttl * 1_000_000)

    @property
    def lease_us(self) -> int:
        return int(self.runtime.config.concurrency_lease_ttl * 1_000_000)

    def _failed(self, where: str, exc: StorageError) -> None:
        if "storage" not in self._warned:
            self._warned.add("storage")
            logger.warning("@dedupe of task %s: tuning Redis failed while %s (%s); calls are published and run "
                           "without deduplication until it answers again", self.task_name, where, exc)

    def _answered(self) -> None:
        if "storage" in self._warned:
            self._warned.discard("storage")
            logger.info("@dedupe of task %s: tuning Redis is back", self.task_name)

    def _digest(self, args: Any, kwargs: Any, caller: bool = False) -> Optional[str]:
        """The call's key digest, or None when it has none (the call is not deduplicated).

        ``key=`` is the user's code: what it raises reaches the ``caller`` of ``apply_async``
        (nothing is published), but never fails a call in a worker (``send_task``, a message
        without the digest header): logged once, the call runs without a lock.
        """
        try:
            return self.digester(tuple(args or ()), dict(kwargs or {}))
        except UncacheableArgument as exc:
            if "arguments" not in self._warned:
                self._warned.add("arguments")
                logger.warning("@dedupe of task %s: a call is not deduplicated: %s", self.task_name, exc)
            return None
        except TypeError as exc:
            if self.policy.key is None:
                return None  # arguments that do not fit the task: Celery says so (or the worker fails the call)
            return self._key_failed(exc, caller)  # the key function's own TypeError (a missing **kw...)
        except Exception as exc:
            return self._key_failed(exc, caller)

    def _key_failed(self, exc: Exception, caller: bool) -> Optional[str]:
        """The key function raised ``exc``: it reaches the caller of ``apply_async``; in a worker it
        is logged once and the call runs without a lock."""
        if caller:
            raise exc
        if "key" not in self._warned:
            self._warned.add("key")
            logger.warning("@dedupe of task %s: its key function raised %r; the call runs without a lock",
                           self.task_name, exc)
        return None

    def bind(self, task_cls: Any) -> None:
        task_cls.dedupe = self.handle

    # -- publish side ----------------------------------------------------------------------------

    def publish(self, publish_next: PublishCall) -> Optional[PublishCall]:
        from celery.utils import uuid

        runtime, app, policy, name = self.runtime, self.app, self.policy, self.task_name

        def publish(pctx: PublishContext) -> Any:
            if not runtime.enabled or app.conf.task_always_eager:
                return publish_next(pctx)  # run in this process: nothing is queued to hold a key
            digest = self._digest(pctx.args, pctx.kwargs, caller=True)
            if digest is None:
                return publish_next(pctx)
            if pctx.task_id is not None:
                here = self._running_here(str(pctx.task_id), digest)
                if here is not None:
                    return self._publish_again(pctx, digest, here[0], here[1], publish_next)
            task_id = str(pctx.task_id or uuid())
            options = pctx.options
            try:
                claim = self.store.claim(name, digest, task_id, self.ttl_us)
            except StorageError as exc:
                self._failed("claiming a key", exc)
                return publish_next(pctx)  # never drop the call
            self._answered()
            if claim.status != CLAIMED and not (_republished(options) or _in_canvas(options)):
                events.deduplicated(name)  # metrics
                if policy.on_duplicate == "raise":
                    raise DuplicateTask(name, claim.holder)
                if policy.on_duplicate == "ignore":
                    return None
                return pctx.task.AsyncResult(claim.holder)
            headers = dict(options.get("headers") or {})
            headers[HEADER_DEDUPE] = digest
            pctx.options = {**options, "headers": headers}
            pctx.task_id = task_id
            try:
                result = publish_next(pctx)
            except BaseException:
                if claim.status == CLAIMED:
                    self._release(task_id, digest)  # not published: no stale lock
                raise
            if claim.status == CLAIMED and getattr(result, "id", task_id) != task_id:
                self._release(task_id, digest)  # an inner hook answered without publishing this id
            return result

        return publish

    def _running_here(self, task_id: str, digest: str) -> Optional[Tuple[_Running, int]]:
        """This process's registry and the call's deadline when call ``task_id`` runs here holding
        ``digest`` (it is publishing itself again), else None."""
        running = self._running.get()
        with running.lock:
            found = running.held.get(task_id)
        return (running, found[1]) if found is not None and found[0] == digest else None

    def _publish_again(self, pctx: PublishContext, digest: str, running: _Running, deadline: int,
                       publish_next: PublishCall) -> Any:
        """A running call publishes itself again under its own key (``Task.retry``, a deferral,
        ``Task.replace`` with a signature of the same key): its lock turns queued *before* the new
        message exists, so the new attempt (which may start at once, in another process) finds it
        queued and makes it running; and the call's end keeps it instead of freeing it."""
        task_id = str(pctx.task_id)
        try:
            self.store.hold(self.task_name, "q", self.lease_us, [(task_id, digest, deadline)])
        except StorageError as exc:
            self._failed("keeping a retried call's key", exc)
        else:
            self._answered()
        with running.lock:
            running.requeued.add(task_id)
        headers = dict(pctx.options.get("headers") or {})
        headers[HEADER_DEDUPE] = digest
        pctx.options = {**pctx.options, "headers": headers}
        try:
            return publish_next(pctx)
        except BaseException:
            # Not published: the call runs on (its lock running again) and its end frees the key.
            with running.lock:
                running.requeued.discard(task_id)
            try:
                self.store.start(self.task_name, digest, task_id, self.lease_us, self.ttl_us, True)
            except StorageError as exc:
                self._failed("keeping a running call's key", exc)
            raise

    # -- worker side -----------------------------------------------------------------------------

    def wrap(self, call_next: Call) -> Call:
        keep = self.policy.until == "done"
        name = self.task_name

        def call(ctx: CallContext) -> Any:
            request = ctx.request
            task_id = getattr(request, "id", None)
            if not task_id or is_eager(request):
                return call_next(ctx)
            digest = _digest_header(request) or self._digest(ctx.args, ctx.kwargs)
            if digest is None:
                return call_next(ctx)
            try:
                started = self.store.start(name, digest, task_id, self.lease_us, self.ttl_us, keep)
            except StorageError as exc:
                self._failed("starting a call", exc)
                return call_next(ctx)
            self._answered()
            if not keep or started.status == OTHER:
                return call_next(ctx)  # released as it starts, or another call holds the key
            self._hold(task_id, digest, started.deadline)
            try:
                result = call_next(ctx)
            except (Retry, Deferred):
                # Published again with the same id (Task.retry, a deferral or a park): its new
                # message holds the key, queued, until the deadline.
                self._end(task_id, digest, started.deadline, queue_again=True)
                raise
            except BaseException:
                self._end(task_id, digest, started.deadline)  # Ignore after Task.replace: kept too
                raise
            self._end(task_id, digest, started.deadline)
            return result

        return call

    def _end(self, task_id: str, digest: str, deadline: int, queue_again: bool = False) -> None:
        """The attempt of call ``task_id`` ends: its lock is kept, queued, when the call was published
        again (by this step's publish hook, or ``queue_again``: a park), else freed."""
        running = self._running.get()
        with running.lock:
            requeued = task_id in running.requeued
            running.requeued.discard(task_id)
        if requeued or queue_again:
            if not requeued:
                self._queue_again(task_id, digest, deadline)
            # Out of the renewals only now that it is queued: a renewal on its way leaves a queued
            # lock alone, and frees only a running one (see renew).
            self._unhold(task_id)
            return
        # Out of the renewals before the release: a renewal on its way re-creates the lock, sees
        # the call gone and frees it again (the last wins).
        self._unhold(task_id)
        self._release(task_id, digest)

    def _release(self, task_id: str, digest: str, state: str = "") -> None:
        try:
            self.store.release(self.task_name, digest, task_id, state=state)
        except StorageError as exc:
            self._failed("releasing a key", exc)  # it expires by itself

    def _queue_again(self, task_id: str, digest: str, deadline: int) -> None:
        try:
            self.store.hold(self.task_name, "q", self.lease_us, [(task_id, digest, deadline)])
        except StorageError as exc:
            self._failed("keeping a retried call's key", exc)

    def release_call(self, task_id: str, request: Any = None, args: Any = None, kwargs: Any = None) -> bool:
        """Free the key of call ``task_id`` if it still holds it (the worker's main process: a hard
        time limit, a lost pool process, a revoke). The digest comes from the message's header when
        ``request`` has one, else from the arguments. Never raises because Redis fails."""
        digest = None
        if request is not None:
            request_dict = getattr(request, "request_dict", None)
            found = request_dict.get(HEADER_DEDUPE) if isinstance(request_dict, dict) else None
            digest = _digest_header(request) or (found if isinstance(found, str) else None)
        if digest is None:
            digest = self._digest(args, kwargs)
        if digest is None:
            return False
        self._unhold(task_id)
        try:
            return self.store.release(self.task_name, digest, task_id)
        except StorageError as exc:
            self._failed("releasing a key", exc)
            return False

    # -- renewal ---------------------------------------------------------------------------------

    def _hold(self, task_id: str, digest: str, deadline: int) -> None:
        running = self._running.get()
        with running.lock:
            running.held[task_id] = (digest, deadline)
            thread = running.thread
            if thread is None or not thread.is_alive():
                running.thread = threading.Thread(target=self._renew_loop, args=(running,),
                                                  name=f"celery-tuning-dedupe-{self.task_name}", daemon=True)
                running.thread.start()

    def _unhold(self, task_id: str) -> None:
        running = self._running.get()
        with running.lock:
            running.held.pop(task_id, None)

    def renew(self) -> int:
        """Renew the locks of this process's running calls, re-creating those the store lost.

        The renewer thread calls this every lease TTL / 3; it never raises because Redis is down.

        Returns:
            How many locks were missing and put back.
        """
        running = self._running.get()
        with running.lock:
            held: Sequence[Tuple[str, str, int]] = [(task_id, digest, deadline)
                                                    for task_id, (digest, deadline) in running.held.items()]
        if not held:
            return 0
        try:
            recreated = self.store.hold(self.task_name, "r", self.lease_us, held)
        except StorageError as exc:
            self._failed("renewing running calls' keys", exc)
            return 0
        self._answered()
        # A call that ended while its renewal was on the way has just had its lock put back:
        # take it out again, or identical calls would be answered with a finished call's id for
        # a lease TTL (the call removes itself from ``held`` before releasing: the last wins).
        with running.lock:
            gone = [(task_id, digest) for task_id, digest, _ in held if task_id not in running.held]
        for task_id, digest in gone:
            # Only while it runs: a call that ended re-queued (a retry) keeps its lock for its new message.
            self._release(task_id, digest, state="r")
        if recreated:
            logger.warning("@dedupe of task %s: re-created %d lock(s) of running calls the store had lost",
                           self.task_name, recreated)
        return recreated

    def _renew_loop(self, running: _Running) -> None:
        while True:
            running.wake.wait(max(self.lease_us / 3_000_000, 0.05))
            try:
                self.renew()
            except Exception:  # the renewer must outlive any one bad round
                logger.exception("@dedupe of task %s: lock renewal failed", self.task_name)


# -- the worker's main process: calls that end without their pool process's help ---------------

_connected = False
_connect_lock = threading.Lock()


def _step_of(task: Any) -> Optional[DedupeStep]:
    handle = getattr(type(task), "dedupe", None)
    return handle._step if isinstance(handle, DedupeHandle) else None


def _on_task_failure(sender: Any = None, task_id: Optional[str] = None, exception: Any = None,
                     args: Any = None, kwargs: Any = None, **_: Any) -> None:
    """A hard time limit (the pool process is killed) or a lost pool process: the worker's main
    process sends ``task_failure``, and the call's key is freed here (its process cannot)."""
    from celery.exceptions import TimeLimitExceeded, WorkerLostError

    step = _step_of(sender)
    if step is None or not task_id or not isinstance(exception, (TimeLimitExceeded, WorkerLostError)):
        return
    request = getattr(sender, "request", None)
    step.release_call(task_id, request if getattr(request, "id", None) == task_id else None, args, kwargs)


def _on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A revoked call (dropped when it reaches a worker, or terminated while running) frees its key."""
    step = _step_of(sender if sender is not None else getattr(request, "task", None))
    task_id = getattr(request, "id", None)
    if step is None or not task_id:
        return
    step.release_call(task_id, request, getattr(request, "args", None), getattr(request, "kwargs", None))


def _on_message_dropped(sender: Any = None, message: Any = None, **_: Any) -> None:
    """A message no worker will run: its task is not registered here (``task_unknown``: a rolling
    deploy) or it cannot be decoded (``task_rejected``: a serializer the worker does not accept).
    The message's headers name the task, its id and the digest it claimed; the key is freed if that
    id still holds it. The worker may know nothing of the task, so the store is the app's, not a step's."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict) or HEADER_DEDUPE not in headers:
        return
    digest, name, task_id = _digest_header(message), headers.get("task"), headers.get("id")
    app = getattr(sender, "app", None)
    runtime = installed_runtime(app) if app is not None else None
    if digest is None or not isinstance(name, str) or not isinstance(task_id, str) or runtime is None:
        return
    try:
        if not runtime.enabled:
            return
        store: DedupeStore = (runtime.memory.dedupe if runtime.in_memory else
                              RedisDedupeStore(runtime.connector, runtime.config.key_prefix))
        store.release(name, digest, task_id)
    except (StorageError, ConfigurationError) as exc:
        logger.warning("@dedupe: could not free the key of dropped message %s[%s] (%s); it expires by itself",
                       name, task_id, exc)


def connect_receivers() -> None:
    """Free keys of calls that end in the worker's main process (once per process)."""
    global _connected
    with _connect_lock:
        if _connected:
            return
        celery_signals.task_failure.connect(_on_task_failure, weak=False, dispatch_uid="celery_tuning.dedupe.failure")
        celery_signals.task_revoked.connect(_on_task_revoked, weak=False, dispatch_uid="celery_tuning.dedupe.revoked")
        _connected = True


# Connected on import, not by a step: a worker that has no @dedupe task (a rolling deploy's new
# version) still frees the keys of the messages it drops. Both signals are sent only for them.
celery_signals.task_unknown.connect(_on_message_dropped, weak=False, dispatch_uid="celery_tuning.dedupe.unknown")
celery_signals.task_rejected.connect(_on_message_dropped, weak=False, dispatch_uid="celery_tuning.dedupe.rejected")

register_step("dedupe", DedupeStep)
