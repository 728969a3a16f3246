"""The policy record ``@dedupe`` attaches to a task function, and the choices it accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["ON_DUPLICATE", "UNTIL", "DedupePolicy"]

#: How long a call's lock keeps identical calls out: while it is queued or running ('done'), or
#: only while it is queued ('started': released when the body starts).
UNTIL = ("done", "started")
#: What a duplicate call gets: the holder's AsyncResult, a DuplicateTask error, or None.
ON_DUPLICATE = ("return", "raise", "ignore")


@dataclass(frozen=True)
class DedupePolicy:
    """A task's ``@dedupe``: one queued (or running) call per key."""

    #: Called with the task's arguments; its value (canonical JSON, hashed) is the key. None: every
    #: argument (the result cache's key function).
    key: Optional[Callable[..., Any]] = None
    until: str = "done"
    #: Upper bound on a lock's life in seconds, whatever happens (None: ``tuning_dedupe_ttl``).
    ttl: Optional[float] = None
    on_duplicate: str = "return"
