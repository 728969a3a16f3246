"""Exceptions raised by celery-tuning; every one derives from :class:`TuningError`."""

from __future__ import annotations

import math
from typing import Optional

__all__ = [
    "ConcurrencyLimited",
    "ConfigurationError",
    "DuplicateTask",
    "RateLimited",
    "StorageError",
    "Throttled",
    "TuningError",
]


class TuningError(Exception):
    """Base class of every exception celery-tuning raises on purpose."""


class ConfigurationError(TuningError, ValueError):
    """A ``tuning_*`` setting or a decorator argument is invalid.

    The message always names the setting or argument, the bad value and what
    is accepted instead.
    """


class StorageError(TuningError):
    """The tuning Redis could not be reached or answered something unusable.

    Components catch this and apply their Redis-error policy; it never reaches
    a user's task body.
    """


class RateLimited(TuningError):
    """A rate limit refused a call and the policy says to raise.

    Arguments:
        retry_after: Seconds after which a retry is expected to be admitted.
        name: The limiter's name.
    """

    def __init__(self, retry_after: float, name: Optional[str] = None) -> None:
        self.retry_after = float(retry_after)
        self.name = name
        # args are the constructor's arguments, so Celery's result backends rebuild the
        # exception (exc_type + args) instead of degrading it to a plain Exception.
        super().__init__(self.retry_after, name)

    def __str__(self) -> str:
        where = f" by limiter {self.name!r}" if self.name else ""
        return f"rate limited{where}; retry after {self.retry_after:.3f}s"


class Throttled(TuningError):
    """Raised by task code when a remote API said "slow down" (e.g. HTTP 429).

    Arguments:
        retry_after: Seconds the remote side asked us to wait.
        name: Limiter to pause; defaults to the task's own limiter.
    """

    def __init__(self, retry_after: float = 1.0, name: Optional[str] = None) -> None:
        # A Retry-After header arrives as text ("120"): numbers in either form are taken; what
        # cannot be a pause (negative, inf, nan, not a number) is named here, not deep in a store.
        try:
            seconds = float(retry_after)
        except (TypeError, ValueError):
            seconds = float("nan")
        if not math.isfinite(seconds) or seconds < 0:
            raise ConfigurationError(
                f"Throttled(retry_after={retry_after!r}): must be a finite number of seconds >= 0"
            )
        self.retry_after = seconds
        self.name = name
        super().__init__(self.retry_after, name)

    def __str__(self) -> str:
        return f"throttled by the remote side; retry after {self.retry_after:.3f}s"


class ConcurrencyLimited(TuningError):
    """Every slot of a cluster-wide concurrency limit is taken and the task cannot be deferred.

    Arguments:
        name: The limit's name.
        retry_after: Seconds after which a slot may be free.
    """

    def __init__(self, name: str, retry_after: float) -> None:
        self.name = name
        self.retry_after = float(retry_after)
        super().__init__(name, self.retry_after)

    def __str__(self) -> str:
        return f"concurrency limit {self.name!r} reached; retry after {self.retry_after:.3f}s"


class DuplicateTask(TuningError):
    """A ``@dedupe(on_duplicate="raise")`` task was called while an identical call is queued or
    running; nothing was published.

    Arguments:
        task: The task's name.
        holder_id: The id of the queued or running call (``task.AsyncResult(exc.holder_id)``).
    """

    def __init__(self, task: str, holder_id: str) -> None:
        self.task = task
        self.holder_id = holder_id
        super().__init__(task, holder_id)

    def __str__(self) -> str:
        return f"task {self.task!r} has an identical call queued or running (task id {self.holder_id}); not published"
