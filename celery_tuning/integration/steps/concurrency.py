"""The pipeline step that applies ``@concurrency_limit``: hold a cluster-wide slot while running."""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

from ...concurrency import ConcurrencyLimiter, Lease
from ...conf import ConcurrencySpec
from ...errors import ConcurrencyLimited, StorageError
from ...policy import admission
from ...policy.attach import ConcurrencyPolicy
from ..deferral import ParkRequest, defer, deferrals_of, is_eager, jitter, park_info, spot
from ..pipeline import Call, CallContext, Step, register_step
from ..registry import CONCURRENCY_LIMITS, concurrency_limiter_for
from ..runtime import runtime_for

__all__ = ["ConcurrencyStep"]

#: A standby retries its lease this often when no release was heard (a lost message, an expired lease).
STANDBY_POLL = 0.25
#: A standby's entry outlives its wait by this much (its expiry only matters when its worker died).
STANDBY_MARGIN = 2.0

def _may_stand_by(task: Any, request: Any) -> bool:
    """Whether a woken waiter of ``task`` may hold on as the standby. Only with ``acks_late``: the
    standby is a running attempt, and without it Celery has acknowledged the message, so a worker
    that died while it waited would lose a task that never ran (parking again keeps it in Redis).
    Never under a time limit: the wait would count against it (waiters failed with
    SoftTimeLimitExceeded before their body started)."""
    limits = getattr(request, "timelimit", None) or (None, None)
    return _may_ever_stand_by(task) and not any(limits)


def _may_ever_stand_by(task: Any) -> bool:
    """The part of :func:`_may_stand_by` that the task class decides: ``acks_late``, no time limit."""
    if not getattr(task, "acks_late", False):
        return False
    conf = task._app.conf
    return not any(value for value in (getattr(task, "time_limit", None), getattr(task, "soft_time_limit", None),
                                       conf.task_time_limit, conf.task_soft_time_limit))


class ConcurrencyStep(Step):
    """Built once per task class when it is bound."""

    kind = "concurrency"
    #: A slot is refused only after asking Redis: no inner decision is taken ahead across it.
    refuses_remotely = True

    def __init__(self, policy: ConcurrencyPolicy, task_cls: Any) -> None:
        self.policy = policy
        self.runtime = runtime_for(task_cls._app)
        #: The limit's name: the configured one, or the task's for an inline limit.
        self.name: str = policy.name or task_cls.name
        self._inline: Optional[ConcurrencySpec] = None
        if policy.name is not None:
            self.runtime.registry.spec(CONCURRENCY_LIMITS, policy.name, by=f"@concurrency_limit({policy.name!r})")
        else:
            self._inline = ConcurrencySpec(self.name, int(policy.limit or 1), dict(policy.per_key or {}))
            self.runtime.registry.inline_concurrency(self._inline)  # the mover reads its caps
        self._limiter: Optional[ConcurrencyLimiter] = None
        # A limit keeps a slot for a standby only when its woken waiters can take it: one that
        # cannot parks again at once, and a slot kept for it had it woken again every mover round
        # (a plain task's waiter was received 17 times a second for as long as the slot was held).
        self._standby_able = policy.key is None and _may_ever_stand_by(task_cls)
        self.runtime.registry.note_standby(self.name, self._standby_able)

    @property
    def limiter(self) -> ConcurrencyLimiter:
        if self._limiter is None:
            limiter = concurrency_limiter_for(self.runtime, self.name, self._inline)
            if self._standby_wait() > 0 and self.runtime.registry.standby_able(self.name):
                limiter.standby_slots = 1
            self._limiter = limiter
        return self._limiter

    def _standby_wait(self) -> float:
        config = self.runtime.config
        return float(config.concurrency_standby) if config.defer_via == "park" else 0.0

    def park_spot(self) -> Any:
        # A per-key limit parks at the spot of the call's key, which the arguments decide.
        return spot("concurrency", self.name) if self.policy.key is None else None

    def park_spot_for(self, ctx: CallContext) -> Any:
        if self.policy.key is None:
            return self.park_spot()
        try:
            key = self.policy.key(*ctx.args, **ctx.kwargs)
        except Exception:  # the step itself will raise it when the call runs
            return None
        return spot("concurrency", self.limiter.spot_name(key))

    def wrap(self, call_next: Call) -> Call:
        policy = self.policy

        def call(ctx: CallContext) -> Any:
            limiter = self.limiter
            key = policy.key(*ctx.args, **ctx.kwargs) if policy.key is not None else None
            where = spot("concurrency", limiter.spot_name(key))
            lease = limiter.acquire(key)
            if not lease.granted:
                request = ctx.request
                if is_eager(request):  # nothing to defer through: wait, bounded, then raise
                    lease = self._wait_for_slot(limiter, lease, key)
                else:
                    info = park_info(request) or {}
                    # A waiter the mover woke for this limit holds on for the next slot when no
                    # other waiter does (the standby); else, or when its wait ends, it parks again.
                    # Never a caller key's waiter: only its own key's releases free its slot, and
                    # holding a worker process for them would keep other tenants' tasks (under
                    # their caps) from running; a release of its key wakes the next one at once.
                    woken = info.get("r") == "concurrency"
                    held = (self._stand_by(limiter, request, where, key) if woken and key is None
                            and info.get("n") == where.name and _may_stand_by(ctx.task, request) else None)
                    if held is not None:
                        lease = held
                        request.tuning_standby = True  # for the task (and tests) to tell
                    else:
                        recheck = admission.concurrency_recheck(lease.retry_after, deferrals_of(request))
                        # A woken waiter whose slot another call took first parks again at its
                        # place without spending its budget (under a backlog, waking is early).
                        refused = lease
                        defer(ctx.task, jitter(recheck), reason="concurrency_limit",
                              max_deferrals=policy.max_deferrals,
                              park=ParkRequest(where, None), free=woken,
                              on_exhausted=lambda n: ConcurrencyLimited(
                                  f"{self.name} (gave up after {n} deferrals)", refused.retry_after))
            try:
                return call_next(ctx)
            finally:
                limiter.release(lease)

        return call

    def _stand_by(self, limiter: ConcurrencyLimiter, request: Any, where: Any, key: Any) -> Optional[Lease]:
        """A woken waiter that found no free slot: hold on as the standby of its spot ``where`` (one
        at a time per limit cluster-wide; never for a caller key) and take the next slot a release frees,
        for up to ``tuning_concurrency_standby`` seconds. The lease, or None: not the standby (another
        is), Redis failed, or the wait ended (then the call parks again at its place, as any refused
        woken waiter does)."""
        wait = self._standby_wait()
        if wait <= 0:
            return None
        store = self.runtime.registry.park_store()
        token = f"{getattr(request, 'id', None)}:{uuid.uuid4().hex[:12]}"
        try:
            bell = store.standby_bell(where)  # listening before standing by: no release missed
        except StorageError:
            return None
        try:
            try:
                if not store.standby(where, token, int((wait + STANDBY_MARGIN) * 1_000_000)):
                    return None
            except StorageError:
                return None
            try:
                deadline = time.monotonic() + wait
                while True:
                    bell.clear()
                    lease = limiter.acquire(key)  # first at once: a release may have come meanwhile
                    if lease.granted:
                        return lease
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    bell.wait(min(STANDBY_POLL, left))
            finally:
                try:
                    store.unstandby(where, token)  # the next release promotes the next standby
                except StorageError:
                    pass
        finally:
            store.standby_unbell(where, bell)

    def _wait_for_slot(self, limiter: ConcurrencyLimiter, lease: Any, key: Any = None) -> Any:
        """A slot for a call with no message to defer (``apply()``, direct calls, map/chunks members).

        Slots free up when tasks end, which no expiry time tells, so the call looks again at a
        growing interval until ``max_wait`` (default: the lease TTL) has passed.
        """
        wait = self.policy.max_wait
        if wait is None:
            wait = float(self.runtime.config.concurrency_lease_ttl)
        deadline = time.monotonic() + wait
        pause = 0.02
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConcurrencyLimited(self.name, lease.retry_after)
            time.sleep(min(pause, left))
            pause = min(pause * 1.5, 1.0)
            lease = limiter.acquire(key)
            if lease.granted:
                return lease


register_step("concurrency", ConcurrencyStep)
