"""The pipeline step that applies ``@rate_limit``: admit, sleep briefly, defer, or raise."""

from __future__ import annotations

import logging
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from ...conf import LimiterSpec, Tier, parse_tier
from ...errors import ConfigurationError, RateLimited, Throttled
from ...policy import admission
from ...policy.attach import RateLimitPolicy, RateLimitStack
from ...ratelimit import Decision, GcraLimiter, decide_all
from ..deferral import ParkRequest, defer, is_eager, jitter, parking_on, spot, warn_beyond_visibility
from ..pipeline import Ahead, Call, CallContext, Step, register_step
from ..registry import LIMITERS, limiter_for
from ..runtime import runtime_for
from ..slots import HEADER_SLOT, holds_slot, slot_headers, take_slot

__all__ = ["HEADER_SLOT", "RateLimitStep", "StackedRateLimitStep"]

logger = logging.getLogger("celery_tuning.ratelimit")

#: The limiter event of a call back later than ``tuning_rate_limit_slot_grace`` for its slot, and
#: the key part of the bucket such calls take turns in.
SLOT_EXPIRED = "slot_expired"


class RateLimitStep(Step):
    """Built once per task class when it is bound."""

    kind = "rate_limit"

    def __init__(self, policy: RateLimitPolicy, task_cls: Any) -> None:
        self.policy = policy
        self.task_name = task_cls.name
        self.app = task_cls._app
        runtime = runtime_for(self.app)
        self.runtime = runtime
        if policy.name is not None:
            _check_fixed_cost(policy, runtime.registry.spec(LIMITERS, policy.name, by=f"@rate_limit({policy.name!r})"))
        self.limiter_name = policy.name or self.task_name
        self._limiter: Optional[GcraLimiter] = None
        if policy.on_limit not in ("raise", "wait") and not parking_on(runtime):
            warn_beyond_visibility(self.app, f"task {self.task_name!r}: @rate_limit(max_defer={policy.max_defer})",
                                   policy.max_defer)

    @property
    def limiter(self) -> GcraLimiter:
        if self._limiter is None:
            p = self.policy
            self._limiter = limiter_for(self.runtime, self.limiter_name, rate=p.rate,
                                        burst=p.burst, adaptive=p.adaptive, per_key=_static_tiers(p))
        return self._limiter

    def park_spot(self) -> Any:
        return spot("rate_limit", self.limiter_name)

    def wrap(self, call_next: Call) -> Call:
        policy = self.policy

        def call(ctx: CallContext) -> Any:
            limiter = self.limiter
            task, request = ctx.task, ctx.request
            decision = ctx.admission
            cost: Optional[int] = None  # evaluated once, when first needed
            if decision is not None:  # taken in an outer step's round trip for this call
                key = ctx.admission_key
                tier = _tier(self.task_name, policy, limiter, key)
                self._admit(task, request, limiter, key, 1, decision)
            else:
                key = policy.key(*ctx.args, **ctx.kwargs) if policy.key is not None else None
                tier = _tier(self.task_name, policy, limiter, key)
                if not self._use_reserved_slot(task, request, limiter, key, ctx, tier):
                    cost = self._cost(ctx)
                    if cost:  # a call of cost 0 takes no token: nothing to decide
                        self._admit(task, request, limiter, key, cost, tier=tier)
            try:
                return call_next(ctx)
            except Throttled as exc:
                self._throttled(task, request, limiter, key, exc, self._cost(ctx) if cost is None else cost, tier)
                raise  # not reached: _throttled defers or raises

        return call

    def ahead(self, ctx: CallContext, connector: Any) -> Optional[Ahead]:
        """The decision this call will need, for an outer step whose store runs on ``connector``.

        None when the limiter's store is elsewhere (checked first: nothing else runs then), or the
        call holds a reserved slot (no new decision is due). The decision lands in
        ``ctx.admission`` for :meth:`wrap`'s call.
        """
        limiter = self.limiter
        if connector is None or getattr(limiter.store, "connector", None) is not connector:
            return None
        request = ctx.request
        if holds_slot(request):
            return None
        policy = self.policy
        cost = self._cost(ctx)
        if not cost:
            return None  # takes no token: wrap's call admits it without a decision
        key = policy.key(*ctx.args, **ctx.kwargs) if policy.key is not None else None
        plan = limiter.plan(cost, reserve=self._reserve(request), key=key,
                            tier=_tier(self.task_name, policy, limiter, key))
        if plan is None:
            return None

        def settle(reply: int) -> None:
            ctx.admission, ctx.admission_key = limiter.settle(reply), key

        return Ahead(connector, plan[0], plan[1], settle)

    def _cost(self, ctx: CallContext) -> int:
        """Tokens this call takes: ``cost``, or what the ``cost`` callable returns for its arguments."""
        cost = self.policy.cost
        if not callable(cost):
            return cost
        return _called_cost(self.task_name, cost, ctx)

    def _reserve(self, request: Any) -> Optional[float]:
        """The ``reserve`` :meth:`_admit` decides with."""
        policy = self.policy
        return admission.rate_limit_reserve(policy.on_limit, is_eager(request), policy.max_defer,
                                            GcraLimiter.acquire_reserve(self._wait_timeout()))

    def _wait_timeout(self) -> float:
        """How long a call that waits instead of deferring may wait."""
        policy = self.policy
        return admission.rate_limit_wait_timeout(policy.on_limit, policy.max_wait, policy.max_defer)

    def _use_reserved_slot(self, task: Any, request: Any, limiter: GcraLimiter, key: Any,
                           ctx: CallContext, tier: Tier) -> bool:
        early = take_slot(request, limiter.name, key)
        if early is None:
            return False
        grace = self.runtime.config.rate_limit_slot_grace
        if early < -grace:
            cost = self._cost(ctx)
            if cost:
                self._pace_late(task, request, limiter, key, -early, grace, cost, tier)
            return True
        if early > 0:
            # Countdown fired a little early (or host clocks differ): wait out the rest, bounded.
            limiter.sleep(min(early, max(self.policy.max_wait, 0.05)))
        return True

    def _pace_late(self, task: Any, request: Any, limiter: GcraLimiter, key: Any, late: float,
                   grace: float, cost: int, tier: Tier) -> None:
        """Run a call that came back ``late`` seconds after its slot, at the rate among the late ones.

        Every task deferred behind the same backlog comes back late together: run each in its old
        slot at once and they run back to back, several times the rate. Asking the limiter again
        instead would spend a slot that also falls while the backlog lasts, and a worker short of
        capacity would defer them over and over. So the late calls take turns in a bucket of their
        own at the limiter's rate (key ``(SLOT_EXPIRED, key)``): a turn within
        ``max(max_wait, grace)`` is slept for in the worker; a later one (more late calls than the
        rate lets through in that time) is deferred to, holding it as its slot. Late runs stay
        within ``burst + rate * (t + grace)`` over any ``t`` seconds (the key's tier's).
        """
        limiter._emit(SLOT_EXPIRED, late)
        decision = limiter.decide(cost, reserve=86_400.0, key=(SLOT_EXPIRED, key), tier=tier)
        self._take_late_turn(task, request, limiter, decision, key, grace)

    def _take_late_turn(self, task: Any, request: Any, limiter: GcraLimiter, decision: Decision,
                        slot_key: Any, grace: float) -> None:
        """A late call's turn: now, slept for when near, else deferred to (holding it as its slot)."""
        if not decision.allowed or decision.wait <= 0:
            return  # admitted now (or the store failed open)
        if decision.wait <= max(self.policy.max_wait, grace) or is_eager(request):
            limiter.sleep(decision.wait)
            return
        self._defer(task, decision.wait, "rate_limit",
                    slot_headers(self.limiter_name, slot_key, decision.wait, request.id))

    def _admit(self, task: Any, request: Any, limiter: GcraLimiter, key: Any, cost: int,
               decision: Optional[Decision] = None, *, tier: Optional[Tier] = None) -> None:
        """Admit, wait, defer or raise a call of ``cost`` tokens from ``key``'s bucket at ``tier``;
        ``decision``: one already taken with :meth:`_reserve` (then ``cost`` is not used)."""
        if decision is None:
            decision = limiter.decide(cost, reserve=self._reserve(request), key=key, tier=tier)
        self._act(task, request, limiter, decision, key)

    def _act(self, task: Any, request: Any, limiter: GcraLimiter, decision: Decision, slot_key: Any) -> None:
        """What ``on_limit`` makes of ``decision`` (taken by ``limiter``, the tightest of a stack):
        run, raise, wait, sleep, or defer (to the reserved slot, named by ``slot_key``)."""
        policy = self.policy
        action = admission.rate_limit_action(policy.on_limit, is_eager(request), decision.allowed,
                                             decision.wait, policy.max_wait)
        kind = action.kind
        if kind == admission.ADMIT:
            return
        if kind == admission.RAISE:
            raise RateLimited(decision.wait, limiter.name)
        if kind == admission.WAIT:
            # No broker to defer through (eager / direct call) or waiting is what was asked.
            limiter.acquire(timeout=self._wait_timeout(), decision=decision)
            return
        if kind == admission.SLEEP:
            limiter._emit("waited", decision.wait)
            limiter.sleep(decision.wait)
            return
        headers = None
        if action.keep_slot:  # a slot is ours: come back for it without queueing again
            headers = slot_headers(self.limiter_name, slot_key, decision.wait, request.id)
        self._defer(task, decision.wait, "rate_limit", headers)

    def _defer(self, task: Any, wait: float, reason: str, headers: Optional[Dict[str, Any]]) -> None:
        limiter_name = self.limiter_name
        defer(task, jitter(wait), reason=reason, max_deferrals=self.policy.max_deferrals,
              headers=headers, park=ParkRequest(spot("rate_limit", limiter_name), wait),
              on_exhausted=lambda n: RateLimited(wait, f"{limiter_name} (gave up after {n} deferrals)"))

    def _throttled(self, task: Any, request: Any, limiter: GcraLimiter, key: Any, exc: Throttled,
                   cost: int, tier: Tier) -> None:
        target, target_key = limiter, key
        target_tier: Optional[Tier] = tier
        if exc.name is not None and exc.name != limiter.name:
            # Another limiter's whole bucket is paused; this task still comes back for its own key.
            target, target_key, target_tier = limiter_for(self.runtime, exc.name), None, None
        target.throttle(exc.retry_after, key=target_key, tier=target_tier)
        logger.warning("task %s: remote side throttled limiter %r for %.1fs; task deferred",
                       self.task_name, target.name, exc.retry_after)
        if is_eager(request) or self.policy.on_limit == "raise":
            raise RateLimited(exc.retry_after, target.name) from exc
        headers, wait = None, 0.0
        if cost:  # a call of cost 0 takes no token: it comes back after the pause, with no slot
            decision = limiter.decide(cost, reserve=self.policy.max_defer, key=key, tier=tier)
            if decision.allowed:
                headers = slot_headers(limiter.name, key, decision.wait, request.id)
            wait = decision.wait
        self._defer(task, max(wait, exc.retry_after if target is limiter else 0.0), "throttled", headers)


def _check_fixed_cost(policy: RateLimitPolicy, spec: LimiterSpec) -> None:
    """A fixed cost above the named limiter's burst, or a tier's, would wait for a full bucket every call."""
    if callable(policy.cost):
        return
    bursts = [(f"the limiter's burst ({spec.burst})", spec.burst)]
    bursts += [(f"the burst of tuning_rate_limits[{spec.name!r}]['per_key'][{k!r}] ({t.burst})", t.burst)
               for k, t in spec.per_key.items()]
    for what, burst in bursts:
        if policy.cost > burst:
            raise ConfigurationError(f"@rate_limit({policy.name!r}, cost={policy.cost}): exceeds {what}")


def _static_tiers(policy: RateLimitPolicy) -> Optional[Mapping[str, Tier]]:
    """An inline limit's ``per_key`` dict (a callable is asked per call, see :func:`_tier`)."""
    return policy.per_key if isinstance(policy.per_key, Mapping) else None


def _tier(task_name: str, policy: RateLimitPolicy, limiter: GcraLimiter, key: Any) -> Tier:
    """The tier of this call's bucket: the ``per_key`` callable's answer for ``key``, else the
    limiter's configured one for ``key`` (its ``per_key`` entry, else its own rate)."""
    per_key = policy.per_key
    if key is not None and callable(per_key) and not isinstance(per_key, Mapping):
        value = per_key(key)
        if value is not None:
            try:
                return _parsed_tier(value)
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"task {task_name!r}: @rate_limit(per_key={getattr(per_key, '__name__', per_key)}) returned "
                    f"{value!r} for this call's key; expected a rate like '100/s', a dict like "
                    f"{{'rate': '100/s', 'burst': 20}}, or None for the configured tier ({exc})") from None
    return limiter.tier(key)


_TIERS: Dict[str, Tier] = {}


def _parsed_tier(value: Any) -> Tier:
    """``parse_tier`` with the rate strings a callable returns remembered (it answers every call)."""
    if isinstance(value, str):
        found = _TIERS.get(value)
        if found is None:
            found = parse_tier("per_key", value)
            if len(_TIERS) < 1024:
                _TIERS[value] = found
        return found
    return parse_tier("per_key", value)


def _called_cost(task_name: str, cost: Callable[..., int], ctx: CallContext) -> int:
    value = cost(*ctx.args, **ctx.kwargs)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigurationError(
            f"task {task_name!r}: @rate_limit(cost={getattr(cost, '__name__', cost)}) returned "
            f"{value!r} for this call; expected an integer >= 0")
    return int(value)


class StackedRateLimitStep(RateLimitStep):
    """Several ``@rate_limit`` on one task (a :class:`~celery_tuning.policy.attach.RateLimitStack`):
    one step, one decision over every limiter's bucket (``gcra_acquire_many.lua``), admitted only
    when all admit, tokens taken from all or none.

    Each limit keeps its own ``key`` and ``cost``; the wait is the longest of the buckets'. The first
    limit names the stack: deferrals park at its spot and a slot header names it (with every key).
    Inline limits are named after the task, the second and later ones ``TASK#2``, ``TASK#3``...
    No decision is offered ahead to the cache's lookup script (one bucket only rides there).
    Refused on Redis Cluster, where different limiters' keys live in different slots.
    """

    def __init__(self, stack: RateLimitStack, task_cls: Any) -> None:
        super().__init__(stack.policies[0], task_cls)
        self.stack = stack
        runtime = self.runtime
        names: List[str] = []
        inline = 0
        for policy in stack.policies:
            if policy.name is None:
                inline += 1
                names.append(self.task_name if inline == 1 else f"{self.task_name}#{inline}")
                continue
            names.append(policy.name)
            _check_fixed_cost(policy, runtime.registry.spec(LIMITERS, policy.name, by=f"@rate_limit({policy.name!r})"))
        self.limiter_names = names
        if not runtime.in_memory and runtime.connector.target.kind == "cluster":
            raise ConfigurationError(
                f"stacked @rate_limit ({', '.join(map(repr, names))}) is not supported "
                "on Redis Cluster: one decision must read every bucket in one script, and each limiter's "
                "keys live in their own slot; keep one @rate_limit per task there")
        self._limiters: Optional[List[GcraLimiter]] = None

    @property
    def limiters(self) -> List[GcraLimiter]:
        if self._limiters is None:
            self._limiters = [limiter_for(self.runtime, name, rate=p.rate, burst=p.burst, adaptive=p.adaptive,
                                          per_key=_static_tiers(p))
                              for name, p in zip(self.limiter_names, self.stack.policies)]
        return self._limiters

    @property
    def limiter(self) -> GcraLimiter:
        """The first limit's limiter (the one that names the stack)."""
        return self.limiters[0]

    def ahead(self, ctx: CallContext, connector: Any) -> Optional[Ahead]:
        return None  # a stack decides in gcra_acquire_many.lua, never inside the cache's script

    def wrap(self, call_next: Call) -> Call:
        policies = self.stack.policies

        def call(ctx: CallContext) -> Any:
            task, request = ctx.task, ctx.request
            keys = [p.key(*ctx.args, **ctx.kwargs) if p.key is not None else None for p in policies]
            tiers = [_tier(self.task_name, p, lim, key) for p, lim, key in zip(policies, self.limiters, keys)]
            costs: Optional[List[int]] = None  # evaluated once, when first needed
            if not self._use_stacked_slot(task, request, keys, ctx, tiers):
                costs = self._costs(ctx)
                self._admit_all(task, request, keys, costs, tiers)
            try:
                return call_next(ctx)
            except Throttled as exc:
                self._throttled_all(task, request, keys, exc, self._costs(ctx) if costs is None else costs, tiers)
                raise  # not reached: _throttled_all defers or raises

        return call

    def _costs(self, ctx: CallContext) -> List[int]:
        return [_called_cost(self.task_name, p.cost, ctx) if callable(p.cost) else p.cost
                for p in self.stack.policies]

    def _parts(self, costs: Sequence[int], keys: Sequence[Any], tiers: Sequence[Tier]) -> List[Any]:
        return list(zip(self.limiters, costs, keys, tiers))

    def _use_stacked_slot(self, task: Any, request: Any, keys: List[Any], ctx: CallContext,
                          tiers: List[Tier]) -> bool:
        early = take_slot(request, self.limiter_name, tuple(keys))
        if early is None:
            return False
        grace = self.runtime.config.rate_limit_slot_grace
        if early < -grace:
            self._pace_late_all(task, request, keys, self._costs(ctx), -early, grace, tiers)
            return True
        if early > 0:
            self.limiter.sleep(min(early, max(self.policy.max_wait, 0.05)))
        return True

    def _pace_late_all(self, task: Any, request: Any, keys: List[Any], costs: List[int], late: float,
                       grace: float, tiers: List[Tier]) -> None:
        """:meth:`RateLimitStep._pace_late` over every limit: late calls take turns in late buckets of
        their own, one per limit, at each limit's rate."""
        self.limiter._emit(SLOT_EXPIRED, late)
        decision, limiter = decide_all(self._parts(costs, [(SLOT_EXPIRED, key) for key in keys], tiers),
                                       reserve=86_400.0)
        self._take_late_turn(task, request, limiter, decision, tuple(keys), grace)

    def _admit_all(self, task: Any, request: Any, keys: List[Any], costs: List[int], tiers: List[Tier]) -> None:
        decision, limiter = decide_all(self._parts(costs, keys, tiers), reserve=self._reserve(request))
        self._act(task, request, limiter, decision, tuple(keys))

    def _throttled_all(self, task: Any, request: Any, keys: List[Any], exc: Throttled, costs: List[int],
                       tiers: List[Tier]) -> None:
        """``Throttled`` pauses the first limit's bucket (its key's), or the limit ``exc.name`` names
        (its key's when it is one of the stack, else that limiter's whole bucket)."""
        limiters = self.limiters
        target, target_key, own = limiters[0], keys[0], True
        target_tier: Optional[Tier] = tiers[0]
        if exc.name is not None and exc.name != target.name:
            for lim, key, tier in zip(limiters, keys, tiers):
                if lim.name == exc.name:
                    target, target_key, target_tier = lim, key, tier
                    break
            else:
                target, target_key, target_tier, own = limiter_for(self.runtime, exc.name), None, None, False
        target.throttle(exc.retry_after, key=target_key, tier=target_tier)
        logger.warning("task %s: remote side throttled limiter %r for %.1fs; task deferred",
                       self.task_name, target.name, exc.retry_after)
        if is_eager(request) or self.policy.on_limit == "raise":
            raise RateLimited(exc.retry_after, target.name) from exc
        # A limit whose cost is 0 for this call takes no token (decide_all leaves it out).
        decision, _ = decide_all(self._parts(list(costs), keys, tiers), reserve=self.policy.max_defer)
        headers = None
        if decision.allowed:
            headers = slot_headers(self.limiter_name, tuple(keys), decision.wait, request.id)
        self._defer(task, max(decision.wait, exc.retry_after if own else 0.0), "throttled", headers)


def _build(policy: Union[RateLimitPolicy, RateLimitStack], task_cls: Any) -> RateLimitStep:
    if isinstance(policy, RateLimitStack):
        return StackedRateLimitStep(policy, task_cls)
    return RateLimitStep(policy, task_cls)


register_step("rate_limit", _build)
