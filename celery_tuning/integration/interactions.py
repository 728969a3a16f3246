"""What each step of a task's chain does with every outcome of the steps inside it: one table.

The chain runs ``cache → breaker → concurrency → rate limit → body`` (``pipeline.STEP_ORDER``),
with SLA timing around all of it (Celery's ``task_prerun``/``task_postrun``). An outcome
produced by one step or by the body travels out through every step around it; each row below
says what the caller sees and what each of those outer steps records. The breaker's list of
exceptions that are never failures is read from this table (:data:`NOT_A_FAILURE`), the tests
run every cell against a real redis-server (``tests/integration/test_interactions.py``), and
``docs/architecture.md`` shows the same table (:func:`render_interactions_markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Type

from celery.exceptions import Ignore, Reject, Retry

from ..circuit import CircuitOpen
from ..errors import ConcurrencyLimited, RateLimited, Throttled

__all__ = ["NOT_A_FAILURE", "OUTCOMES", "STEPS", "Outcome", "render_interactions_markdown", "render_into"]

#: Step kinds, outermost first, as the table's columns name them (``sla``: the timing receivers).
STEPS: Tuple[str, ...] = ("sla", "cache", "breaker", "concurrency", "rate_limit")

# Cell values. "—": the step produced the outcome itself or sits inside the step that did.
STORED, NOT_STORED = "stored", "not stored (lock released)"
SUCCESS, FAILURE, NOT_COUNTED = "success", "failure", "not counted"
SPENT, NOT_SPENT, RESERVED = "spent", "not spent", "reserved for the re-run"
FREED, NOT_TAKEN = "freed", "not taken"
NONE = "—"


@dataclass(frozen=True)
class Outcome:
    """One row: an outcome, who produces it, and what the caller and every outer step make of it."""

    #: Short name (test ids and the doc's first column).
    name: str
    #: Step kind that produces it, or ``"body"``.
    producer: str
    #: How it comes about.
    how: str
    #: What the caller sees (``AsyncResult`` / ``apply()``).
    sees: str
    #: Celery state the SLA timing records for the attempt (``task_postrun``).
    sla: str
    #: Stored in L1 and L2?
    cache: str
    #: What the breaker records.
    breaker: str
    #: The concurrency slot.
    lease: str
    #: The rate-limit token.
    token: str
    #: Exception types that are this outcome when they reach an outer step.
    types: Tuple[Type[BaseException], ...] = ()


#: Every outcome, in the order the doc lists them.
OUTCOMES: Tuple[Outcome, ...] = (
    Outcome("value", "body", "the body returns", "the body's value", "SUCCESS",
            STORED, SUCCESS, FREED, SPENT),
    Outcome("exception", "body", "the body raises (e.g. `ValueError`)", "the exception", "FAILURE",
            NOT_STORED, FAILURE, FREED, SPENT),
    Outcome("fallback", "breaker", "breaker open, `fallback=` given", "the fallback's value", "SUCCESS",
            NOT_STORED, NONE, NOT_TAKEN, NOT_SPENT),
    Outcome("CircuitOpen", "breaker", "breaker open, `on_open=\"fail\"` or deferrals used up",
            "`CircuitOpen`", "FAILURE", NOT_STORED, NONE, NOT_TAKEN, NOT_SPENT, (CircuitOpen,)),
    Outcome("breaker deferral", "breaker", "breaker open, `on_open=\"retry\"` (worker)",
            "runs again later, same id, no retry spent", "IGNORED",
            NOT_STORED, NONE, NOT_TAKEN, NOT_SPENT),
    Outcome("ConcurrencyLimited", "concurrency",
            "every slot taken: `apply()`/direct call past `max_wait`, or deferrals used up",
            "`ConcurrencyLimited`", "FAILURE", NOT_STORED, NOT_COUNTED, NONE, NOT_SPENT, (ConcurrencyLimited,)),
    Outcome("concurrency deferral", "concurrency", "every slot taken (worker)",
            "runs again later, same id, no retry spent", "IGNORED",
            NOT_STORED, NOT_COUNTED, NONE, NOT_SPENT),
    Outcome("RateLimited", "rate_limit", "no token, `on_limit=\"raise\"` or deferrals used up",
            "`RateLimited`", "FAILURE", NOT_STORED, NOT_COUNTED, FREED, NOT_SPENT, (RateLimited,)),
    Outcome("rate-limit deferral", "rate_limit", "no token within `max_wait` (worker)",
            "runs again later, same id, no retry spent", "IGNORED",
            NOT_STORED, NOT_COUNTED, FREED, RESERVED),
    Outcome("Throttled", "rate_limit", "the body raises `Throttled` (an HTTP 429); the limiter pauses",
            "runs again later, same id, no retry spent", "IGNORED",
            NOT_STORED, NOT_COUNTED, FREED, RESERVED, (Throttled,)),
    Outcome("Retry", "body", "the body calls `self.retry()`", "Celery's retry", "RETRY",
            NOT_STORED, NOT_COUNTED, FREED, SPENT, (Retry,)),
    Outcome("Ignore", "body", "the body raises `Ignore`", "nothing: the attempt is ignored", "IGNORED",
            NOT_STORED, NOT_COUNTED, FREED, SPENT, (Ignore,)),
    Outcome("Reject", "body", "the body raises `Reject`", "the message is rejected", "REJECTED",
            NOT_STORED, NOT_COUNTED, FREED, SPENT, (Reject,)),
)

#: Exceptions that steer Celery or come from our own limits, not from the guarded service:
#: a breaker counts none of them (a deferral is an ``Ignore``).
NOT_A_FAILURE: Tuple[Type[BaseException], ...] = tuple(
    t for outcome in OUTCOMES if outcome.breaker in (NOT_COUNTED, NONE) for t in outcome.types)

_COLUMNS = (("SLA timing records", "sla"), ("cache", "cache"), ("breaker", "breaker"),
            ("concurrency slot", "lease"), ("rate-limit token", "token"))


def render_interactions_markdown() -> str:
    """The table as Markdown, for ``docs/architecture.md`` (``python docs/generate_interactions.py``)."""
    head = ["outcome", "produced by", "how", "the caller sees", *(title for title, _ in _COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in OUTCOMES:
        cells = [o.name, o.producer.replace("_", " "), o.how, o.sees, *(getattr(o, attr) for _, attr in _COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: The generated table sits between these two lines of ``docs/architecture.md``.
BEGIN = "<!-- interaction table: generated by docs/generate_interactions.py, do not edit -->"
END = "<!-- end of interaction table -->"


def render_into(page: str) -> str:
    """``page`` with the text between :data:`BEGIN` and :data:`END` replaced by the current table."""
    head, found, rest = page.partition(BEGIN + "\n")
    if not found or END not in rest:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} section")
    return head + BEGIN + "\n" + render_interactions_markdown() + rest[rest.index(END):]
