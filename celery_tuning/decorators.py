"""Decorators that attach policy to task functions; ``TunedTask`` applies it."""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from .errors import ConfigurationError
from .policy.attach import ON_LIMIT, ON_OPEN, BreakerPolicy, RateLimitPolicy, SlaPolicy, attach_policy

__all__ = ["cache_result", "circuit_breaker", "rate_limit", "sla"]

F = TypeVar("F", bound=Callable[..., Any])


def _not_yet(decorator: str, capability: str) -> NotImplementedError:
    return NotImplementedError(
        f"@{decorator}: {capability} is not available in this version of celery-tuning; "
        "remove the decorator (it would otherwise silently do nothing)"
    )


def _seconds(decorator: str, name: str, value: Any, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            not allow_zero and value == 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"@{decorator}({name}={value!r}): expected a number of seconds {bound}")
    return float(value)


def _count(decorator: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"@{decorator}({name}={value!r}): expected an integer >= {minimum}")
    return value


def rate_limit(
    limit: str,
    *,
    burst: Optional[int] = None,
    key: Optional[Callable[..., Any]] = None,
    cost: int = 1,
    on_limit: str = "auto",
    max_wait: float = 1.0,
    max_defer: float = 300.0,
    max_deferrals: int = 100,
    adaptive: bool = False,
) -> Callable[[F], F]:
    """Limit a task with a token bucket shared by every worker through Redis.

    Arguments:
        limit: A name from ``tuning_rate_limits`` (``"openai"``) or an inline
            rate (``"10/s"``, ``"600/m"``, ``"5000/h"``) named after the task.
        burst: Bucket capacity for an inline rate (default 1); named limiters
            take theirs from the config.
        key: Per-key limit: called with the task's arguments
            (``key=lambda tenant_id, **kw: tenant_id``); one bucket per key,
            keys hashed before they reach Redis, idle buckets expire.
        cost: Tokens one run takes (1 to burst).
        on_limit: ``"auto"`` (default) sleeps in the worker when the wait is at
            most ``max_wait`` and otherwise re-publishes the task for its
            reserved slot without touching ``request.retries``; ``"defer"``
            always re-publishes; ``"wait"`` only sleeps (up to ``max_wait``, then
            raises); ``"raise"`` raises :class:`~celery_tuning.RateLimited`.
        max_wait: Seconds a task may sleep in the worker for its slot.
        max_defer: Furthest a slot is reserved ahead (seconds); keep it below
            the Redis broker's ``visibility_timeout``.
        max_deferrals: Deferrals allowed per task before it fails with
            :class:`~celery_tuning.RateLimited` (its own budget, not ``max_retries``).
        adaptive: On :class:`~celery_tuning.Throttled`, halve the shared rate
            and recover it over a minute.

    Raises:
        ConfigurationError: On anything malformed, naming the argument.
    """
    from .policy.rates import parse_rate

    if not isinstance(limit, str) or not limit.strip():
        raise ConfigurationError(
            f"@rate_limit({limit!r}): expected a limiter name from tuning_rate_limits or a rate like '10/s'")
    rate = None
    name: Optional[str] = limit
    if "/" in limit:
        try:
            rate = parse_rate(limit)
        except ValueError as exc:
            raise ConfigurationError(f"@rate_limit({limit!r}): {exc}") from None
        name = None
    if burst is not None:
        if rate is None:
            raise ConfigurationError(
                f"@rate_limit({limit!r}, burst={burst!r}): a named limiter takes its burst from "
                f"tuning_rate_limits[{limit!r}]")
        _count("rate_limit", "burst", burst)
    if key is not None and not callable(key):
        raise ConfigurationError(f"@rate_limit(key={key!r}): expected a callable taking the task's arguments")
    _count("rate_limit", "cost", cost)
    if rate is not None and cost > (burst or 1):
        raise ConfigurationError(f"@rate_limit(cost={cost}): must not exceed burst ({burst or 1})")
    if on_limit not in ON_LIMIT:
        raise ConfigurationError(
            f"@rate_limit(on_limit={on_limit!r}): expected one of {', '.join(repr(x) for x in ON_LIMIT)}")
    policy = RateLimitPolicy(
        name=name, rate=rate, burst=burst, key=key, cost=cost, on_limit=on_limit,
        max_wait=_seconds("rate_limit", "max_wait", max_wait),
        max_defer=_seconds("rate_limit", "max_defer", max_defer, allow_zero=False),
        max_deferrals=_count("rate_limit", "max_deferrals", max_deferrals, minimum=0),
        adaptive=bool(adaptive),
    )

    def decorate(fun: F) -> F:
        attach_policy(fun, "rate_limit", policy, "rate_limit")
        return fun

    return decorate


def circuit_breaker(
    name: str,
    *,
    on_open: str = "retry",
    fallback: Optional[Callable[..., Any]] = None,
    max_deferrals: int = 100,
    **options: Any,
) -> Callable[[F], F]:
    """Guard a task with a circuit breaker shared by every worker through Redis.

    Arguments:
        name: A key of ``tuning_circuit_breakers``, or a new name defined by
            ``options`` (``fail_max``, ``reset_timeout``, ``success_threshold``,
            ``trial_timeout``, ``exclude``).
        on_open: ``"retry"`` (default) re-publishes the task for when the breaker
            may close, without touching ``request.retries``; ``"fail"`` fails it
            with :class:`~celery_tuning.CircuitOpen` (a ``pybreaker.CircuitBreakerError``).
        fallback: Called with the task's arguments while the breaker is open;
            its return value becomes the task's result.
        max_deferrals: Deferrals allowed per task before it fails with ``CircuitOpen``.

    Raises:
        ConfigurationError: On anything malformed, naming the argument.
    """
    from .conf import parse_breaker_spec

    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"@circuit_breaker({name!r}): expected a breaker name")
    if on_open not in ON_OPEN:
        raise ConfigurationError(
            f"@circuit_breaker(on_open={on_open!r}): expected one of {', '.join(repr(x) for x in ON_OPEN)}")
    if fallback is not None and not callable(fallback):
        raise ConfigurationError(f"@circuit_breaker(fallback={fallback!r}): expected a callable")
    inline = parse_breaker_spec(f"@circuit_breaker({name!r})", options) if options else None
    policy = BreakerPolicy(name=name, on_open=on_open, fallback=fallback,
                           max_deferrals=_count("circuit_breaker", "max_deferrals", max_deferrals, minimum=0),
                           options=inline)

    def decorate(fun: F) -> F:
        attach_policy(fun, "breaker", policy, "circuit_breaker")
        return fun

    return decorate


def cache_result(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """Attach the two-level result cache (arrives with the cache capability)."""
    raise _not_yet("cache_result", "the two-level result cache")


def _threshold(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(f"@sla({name}={value!r}): expected a number of seconds > 0")
    return float(value)


def sla(
    warning: Optional[float] = None,
    critical: Optional[float] = None,
    on: str = "total",
) -> Callable[[F], F]:
    """Attach SLA thresholds to a task; a breach is logged and sent as a signal.

    Arguments:
        warning: Seconds above which the ``warning`` level is breached.
        critical: Seconds above which the ``critical`` level is breached.
        on: What is measured: ``"wait"`` (queue wait), ``"run"`` (run time)
            or ``"total"`` (first publish to finish, the time users feel).

    Raises:
        ConfigurationError: On non-positive thresholds, warning > critical,
            neither threshold given, or an unknown ``on``.
    """
    w = _threshold("warning", warning)
    c = _threshold("critical", critical)
    if w is None and c is None:
        raise ConfigurationError("@sla(): give warning=seconds, critical=seconds or both")
    if w is not None and c is not None and w > c:
        raise ConfigurationError(f"@sla(warning={w}, critical={c}): warning must not exceed critical")
    if on not in ("wait", "run", "total"):
        raise ConfigurationError(f"@sla(on={on!r}): expected 'wait', 'run' or 'total'")
    policy = SlaPolicy(warning=w, critical=c, on=on)

    def decorate(fun: F) -> F:
        attach_policy(fun, "sla", policy, "sla")
        return fun

    return decorate
