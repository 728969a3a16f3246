"""Policy records that decorators attach to task functions, and the attach helper."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple, Union

from ..errors import ConfigurationError
from .rates import Rate

if TYPE_CHECKING:  # pragma: no cover
    from ..conf import BreakerSpec, Tier

__all__ = [
    "ON_LIMIT",
    "ON_OPEN",
    "POLICY_ATTR",
    "BreakerPolicy",
    "CachePolicy",
    "ConcurrencyPolicy",
    "RateLimitPolicy",
    "RateLimitStack",
    "SlaPolicy",
    "attach_policy",
    "policies_of",
]

#: Attribute on a task function holding ``{kind: policy}``.
POLICY_ATTR = "__tuning_policies__"


@dataclass(frozen=True)
class SlaPolicy:
    """Per-task SLA thresholds in seconds."""

    warning: Optional[float] = None
    critical: Optional[float] = None
    #: What is measured: 'wait', 'run' or 'total' (first publish -> finish).
    on: str = "total"


#: What a rate-limited task does: wait briefly else defer; always defer; only wait; raise.
ON_LIMIT = ("auto", "defer", "wait", "raise")


@dataclass(frozen=True)
class RateLimitPolicy:
    """A task's rate limit: a named limiter from ``tuning_rate_limits`` or an inline rate."""

    #: Name in ``tuning_rate_limits``; None for an inline limit (named after the task).
    name: Optional[str] = None
    rate: Optional[Rate] = None
    burst: Optional[int] = None
    #: Per-key limit: called with the task's arguments, returns the bucket key.
    key: Optional[Callable[..., Any]] = None
    #: Tokens one run takes, or a callable taking the task's arguments that returns them (>= 0).
    cost: Union[int, Callable[..., int]] = 1
    on_limit: str = "auto"
    #: Longest wait (s) spent sleeping in the worker before deferring instead.
    max_wait: float = 1.0
    #: Furthest (s) a deferred task's slot is reserved ahead; keep below the broker's visibility_timeout.
    max_defer: float = 300.0
    #: Deferrals allowed per task before it fails with RateLimited (separate from max_retries).
    max_deferrals: int = 100
    adaptive: bool = False
    #: Tiers: an inline limit's ``{key value: Tier}``, or a callable taking the call's key and
    #: returning its tier (a rate, ``{"rate", "burst"}`` or None for the configured one).
    per_key: Union[Mapping[str, Tier], Callable[[Any], Any], None] = dataclass_field(default=None, hash=False)


#: What every limit of a stack must agree on: a call is admitted, waits or is deferred once, for all.
STACK_SHARED = ("on_limit", "max_wait", "max_defer", "max_deferrals")


@dataclass(frozen=True)
class RateLimitStack:
    """Several ``@rate_limit`` on one task: admitted only when every limit admits.

    ``policies`` in reading order (the topmost decorator first). The first limit names the stack
    (:attr:`name`) and its deferrals' parking spot; ``on_limit``, ``max_wait``, ``max_defer`` and
    ``max_deferrals`` are the same on every limit (checked when they are stacked).
    """

    policies: Tuple[RateLimitPolicy, ...]

    @property
    def name(self) -> Optional[str]:
        """The first limit's limiter name (None: inline, named after the task)."""
        return self.policies[0].name

    @property
    def on_limit(self) -> str:
        return self.policies[0].on_limit


def _stacked(existing: Any, new: RateLimitPolicy, fun_name: str) -> RateLimitStack:
    """``new`` (a decorator above) stacked on ``existing`` (a policy or a stack)."""
    below = existing.policies if isinstance(existing, RateLimitStack) else (existing,)
    for field in STACK_SHARED:
        mine, theirs = getattr(new, field), getattr(below[0], field)
        if mine != theirs:
            raise ConfigurationError(
                f"@rate_limit({field}={mine!r}) stacked on {fun_name!r} whose other @rate_limit has "
                f"{field}={theirs!r}: a task's limits admit, wait or defer it together, so give every "
                f"@rate_limit of the task the same {field}")
    if new.name is not None and any(p.name == new.name for p in below):
        raise ConfigurationError(
            f"@rate_limit({new.name!r}) is stacked twice on {fun_name!r}: each limiter may limit a task once")
    return RateLimitStack((new, *below))


#: What a task does when its breaker is open: defer without a retry, or fail fast.
ON_OPEN = ("retry", "fail")


@dataclass(frozen=True)
class BreakerPolicy:
    """A task's circuit breaker: a named breaker from ``tuning_circuit_breakers``."""

    name: str
    on_open: str = "retry"
    #: Called with the task's arguments when the breaker is open; its return value is the result.
    fallback: Optional[Callable[..., Any]] = None
    max_deferrals: int = 100
    #: Inline breaker options, validated (used when the name is not in the config).
    options: Optional[BreakerSpec] = None


@dataclass(frozen=True)
class CachePolicy:
    """A task's result cache."""

    ttl: float = 3600.0
    l1_ttl: float = 60.0
    key: Optional[Callable[..., Any]] = None
    version: int = 1
    vary_on: Optional[Tuple[str, ...]] = None
    max_size: int = 1_000_000
    serializer: str = "json"
    short_circuit: bool = False
    lock_timeout: Optional[float] = None
    wait_timeout: Optional[float] = None


@dataclass(frozen=True)
class ConcurrencyPolicy:
    """A task's cluster-wide concurrency limit: a key of ``tuning_concurrency_limits``, or an
    inline ``limit`` (named after the task)."""

    #: Name in ``tuning_concurrency_limits``; None for an inline limit (named after the task).
    name: Optional[str] = None
    max_deferrals: int = 100
    #: Seconds a call with no broker to defer through waits for a slot (None: the lease TTL).
    max_wait: Optional[float] = None
    #: An inline limit's cap (per key with ``key``).
    limit: Optional[int] = None
    #: Per-key limit: called with the task's arguments, returns the caller key (None: the shared cap).
    key: Optional[Callable[..., Any]] = None
    #: An inline limit's per-key caps: key value (``str``) -> cap.
    per_key: Optional[Mapping[str, int]] = dataclass_field(default=None, hash=False)


def _looks_like_task(obj: Any) -> bool:
    # Celery tasks and their lazy proxies both expose apply_async.
    try:
        return callable(getattr(obj, "apply_async", None))
    except Exception:
        return False


def attach_policy(fun: Callable[..., Any], kind: str, policy: Any, decorator: str) -> None:
    """Record ``policy`` under ``kind`` on ``fun``.

    Raises:
        TypeError: When ``fun`` is already a Celery task (the decorator must
            sit below ``@app.task``) or is not callable, or when the same kind
            is attached twice (except ``rate_limit``: several stack, see :class:`RateLimitStack`).
        ConfigurationError: When stacked rate limits disagree on how the task waits, or name one
            limiter twice.
    """
    if _looks_like_task(fun):
        raise TypeError(
            f"@{decorator} must be placed below @app.task (on the function), not above it"
        )
    if not callable(fun):
        raise TypeError(f"@{decorator} decorates a function, got {fun!r}")
    existing: Dict[str, Any] = dict(getattr(fun, POLICY_ATTR, None) or {})
    if kind == "rate_limit" and kind in existing:
        policy = _stacked(existing[kind], policy, getattr(fun, "__name__", repr(fun)))
    elif kind in existing:
        raise TypeError(f"@{decorator} is applied twice to {getattr(fun, '__name__', fun)!r}")
    existing[kind] = policy
    setattr(fun, POLICY_ATTR, existing)


def policies_of(fun: Any) -> Dict[str, Any]:
    """The policies attached to ``fun`` (empty when none)."""
    raw = getattr(fun, "__func__", fun)
    return dict(getattr(raw, POLICY_ATTR, None) or {})
