"""Decorators that attach policy to task functions; ``TunedTask`` applies it."""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from .errors import ConfigurationError
from .policy.attach import SlaPolicy, attach_policy

__all__ = ["cache_result", "circuit_breaker", "rate_limit", "sla"]

F = TypeVar("F", bound=Callable[..., Any])


def _not_yet(decorator: str, capability: str) -> NotImplementedError:
    return NotImplementedError(
        f"@{decorator}: {capability} is not available in this version of celery-tuning; "
        "remove the decorator (it would otherwise silently do nothing)"
    )


def rate_limit(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """Attach a distributed rate limit (arrives with the rate-limit capability)."""
    raise _not_yet("rate_limit", "the distributed rate limiter")


def circuit_breaker(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """Attach a shared circuit breaker (arrives with the breaker capability)."""
    raise _not_yet("circuit_breaker", "the shared circuit breaker")


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
