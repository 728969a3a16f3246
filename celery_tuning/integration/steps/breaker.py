"""The pipeline step that applies ``@circuit_breaker``: fail fast, defer, or fall back while open."""

from __future__ import annotations

import logging
from typing import Any, Optional

from ... import events
from ...circuit import CircuitOpen, SharedBreaker
from ...errors import ConfigurationError
from ...policy import admission
from ...policy.attach import BreakerPolicy
from ..deferral import ParkRequest, defer, is_eager, jitter, spot
from ..pipeline import Call, CallContext, Degraded, Step, register_step
from ..registry import BREAKERS, breaker_for
from ..runtime import runtime_for

__all__ = ["BreakerStep"]

logger = logging.getLogger("celery_tuning.breaker")


class BreakerStep(Step):
    """Built once per task class when it is bound."""

    kind = "breaker"

    def __init__(self, policy: BreakerPolicy, task_cls: Any) -> None:
        self.policy = policy
        self.task_name = task_cls.name
        self.runtime = runtime_for(task_cls._app)
        configured = self.runtime.config.circuit_breakers
        if policy.name in configured and policy.options:
            raise ConfigurationError(
                f"@circuit_breaker({policy.name!r}, ...): the breaker is defined in tuning_circuit_breakers; "
                "pass options in one place only")
        if policy.name not in configured and not policy.options:
            error = self.runtime.registry.no_such(BREAKERS, policy.name, by=f"@circuit_breaker({policy.name!r})")
            raise ConfigurationError(f"{error}; define it there or pass fail_max=/reset_timeout= to the decorator")
        self._breaker: Optional[SharedBreaker] = None
        self.degrades = policy.fallback is not None

    @property
    def breaker(self) -> SharedBreaker:
        if self._breaker is None:
            self._breaker = breaker_for(self.runtime, self.policy.name, self.policy.options)
        return self._breaker

    def passes_locally(self, ctx: CallContext) -> bool:
        """An open or half-open breaker decides before any inner decision is taken ahead."""
        return self.breaker.looks_closed()

    def park_spot(self) -> Any:
        return spot("circuit_open", self.policy.name)

    def wrap(self, call_next: Call) -> Call:
        def call(ctx: CallContext) -> Any:
            breaker = self.breaker
            try:
                trial = breaker.admit()
            except CircuitOpen as exc:
                return self._when_open(ctx, exc)
            try:
                result = call_next(ctx)
            except BaseException as exc:
                if breaker.settle_failure(exc, trial):
                    logger.warning("task %s opened circuit breaker %r", self.task_name, breaker.name)
                # The task's own exception goes on to Celery (autoretry_for, retries, failure state).
                raise
            breaker.record_success(trial)
            return result

        return call

    def _when_open(self, ctx: CallContext, exc: CircuitOpen) -> Any:
        policy = self.policy
        action = admission.when_open(policy.fallback is not None, policy.on_open, is_eager(ctx.request))
        fallback = policy.fallback
        events.breaker_rejected(exc.name, self.task_name, "fallback" if action == "fallback" and fallback is not None
                                else "fail" if action == "raise" else "defer", exc.retry_after)
        if action == "fallback" and fallback is not None:
            # Marked, so the cache around this step does not keep it as the task's result.
            return Degraded(fallback(*ctx.args, **ctx.kwargs), "fallback")
        if action == "raise":
            raise exc
        name = exc.name
        defer(ctx.task, jitter(exc.retry_after), reason="circuit_open", max_deferrals=policy.max_deferrals,
              park=ParkRequest(spot("circuit_open", name), exc.retry_after),
              on_exhausted=lambda n: CircuitOpen(f"{name} (gave up after {n} deferrals)", exc.retry_after))


register_step("breaker", BreakerStep)
