"""The pipeline step that applies ``@concurrency_limit``: hold a cluster-wide slot while running."""

from __future__ import annotations

import time
from typing import Any, Optional

from ...concurrency import ConcurrencyLimiter
from ...errors import ConcurrencyLimited
from ...policy import admission
from ...policy.attach import ConcurrencyPolicy
from ..deferral import ParkRequest, defer, deferrals_of, is_eager, jitter, park_info, spot
from ..pipeline import Call, CallContext, Step, register_step
from ..registry import CONCURRENCY_LIMITS, concurrency_limiter_for
from ..runtime import runtime_for

__all__ = ["ConcurrencyStep"]

class ConcurrencyStep(Step):
    """Built once per task class when it is bound."""

    kind = "concurrency"
    #: A slot is refused only after asking Redis: no inner decision is taken ahead across it.
    refuses_remotely = True

    def __init__(self, policy: ConcurrencyPolicy, task_cls: Any) -> None:
        self.policy = policy
        self.runtime = runtime_for(task_cls._app)
        self.runtime.registry.spec(CONCURRENCY_LIMITS, policy.name, by=f"@concurrency_limit({policy.name!r})")
        self._limiter: Optional[ConcurrencyLimiter] = None

    @property
    def limiter(self) -> ConcurrencyLimiter:
        if self._limiter is None:
            self._limiter = concurrency_limiter_for(self.runtime, self.policy.name)
        return self._limiter

    def park_spot(self) -> Any:
        return spot("concurrency", self.policy.name)

    def wrap(self, call_next: Call) -> Call:
        policy = self.policy

        def call(ctx: CallContext) -> Any:
            limiter = self.limiter
            lease = limiter.acquire()
            if not lease.granted:
                request = ctx.request
                if is_eager(request):  # nothing to defer through: wait, bounded, then raise
                    lease = self._wait_for_slot(limiter, lease)
                else:
                    recheck = admission.concurrency_recheck(lease.retry_after, deferrals_of(request))
                    # A waiter the mover woke for a slot that another call took first parks again
                    # at its place without spending its budget (under a backlog, waking is early).
                    woken = (park_info(request) or {}).get("r") == "concurrency"
                    defer(ctx.task, jitter(recheck), reason="concurrency_limit", max_deferrals=policy.max_deferrals,
                          park=ParkRequest(spot("concurrency", policy.name), None), free=woken,
                          on_exhausted=lambda n: ConcurrencyLimited(
                              f"{policy.name} (gave up after {n} deferrals)", lease.retry_after))
            try:
                return call_next(ctx)
            finally:
                limiter.release(lease)

        return call

    def _wait_for_slot(self, limiter: ConcurrencyLimiter, lease: Any) -> Any:
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
                raise ConcurrencyLimited(self.policy.name, lease.retry_after)
            time.sleep(min(pause, left))
            pause = min(pause * 1.5, 1.0)
            lease = limiter.acquire()
            if lease.granted:
                return lease


register_step("concurrency", ConcurrencyStep)
