"""The ordered chain of policy steps TunedTask builds around ``run`` when a task is bound."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple

__all__ = ["STEP_ORDER", "Call", "Degraded", "Step", "build_chain", "register_step"]

#: A link of the chain: ``call(task, args, kwargs) -> result``.
Call = Callable[[Any, Tuple[Any, ...], Dict[str, Any]], Any]

#: Outermost first: a cache hit skips everything; an open breaker is checked
#: before a slot or a token is taken; the concurrency slot is taken before the
#: rate-limit token, because a slot is given back the moment the call is refused
#: while a spent token is not (the slot is held while a call waits up to
#: ``max_wait`` for its token); the cache store runs after ``run`` on the way back
#: out. ``celery_tuning.integration.interactions`` tabulates what each step does
#: with every outcome of the steps inside it.
STEP_ORDER: Tuple[str, ...] = ("cache", "breaker", "concurrency", "rate_limit")


class Degraded:
    """A stand-in an inner step returned instead of the body's result (a breaker's fallback).

    Outer steps must not take it for the body's result (the cache does not store it); the
    chain's outermost call hands ``value`` to Celery.
    """

    __slots__ = ("source", "value")

    def __init__(self, value: Any, source: str) -> None:
        self.value = value
        self.source = source


class Step:
    """One capability's wrapper around the rest of the chain.

    Subclasses implement :meth:`wrap`. Steps are built once per task class
    when it is bound and must be safe to call from several threads.
    """

    #: Policy kind this step applies (a key of ``STEP_ORDER``).
    kind: str = ""
    #: Whether this step may return a :class:`Degraded` value (the chain then unwraps it).
    degrades: bool = False

    def wrap(self, task_cls: Any, call_next: Call) -> Call:  # pragma: no cover - interface
        """Return a call that applies this step, then ``call_next``."""
        raise NotImplementedError

    def chain_built(self, steps: List[Step]) -> None:
        """Called once with every step of the task, outermost first (to cooperate with siblings)."""


#: kind -> factory(policy, task_cls) -> Step
_FACTORIES: Dict[str, Callable[[Any, Any], Step]] = {}


def register_step(kind: str, factory: Callable[[Any, Any], Step]) -> None:
    """Make ``factory`` build the step for policies of ``kind``."""
    if kind not in STEP_ORDER:
        raise ValueError(f"unknown step kind {kind!r}; known: {STEP_ORDER}")
    _FACTORIES[kind] = factory


def build_chain(task_cls: Any, policies: Mapping[str, Any], run: Call) -> Tuple[Call, List[Step]]:
    """Wrap ``run`` in the steps the policies ask for, in :data:`STEP_ORDER`.

    Policies without a step (e.g. ``sla``, read by signal receivers) are
    ignored here. Returns the outermost call and the steps, outermost first.
    """
    steps = [
        _FACTORIES[kind](policies[kind], task_cls)
        for kind in STEP_ORDER
        if kind in policies and kind in _FACTORIES
    ]
    for step in steps:
        step.chain_built(steps)
    call = run
    for step in reversed(steps):
        call = step.wrap(task_cls, call)
    if any(step.degrades for step in steps):
        return _unwrapping(call), steps
    return call, steps


def _unwrapping(chain: Call) -> Call:
    def call(task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        result = chain(task, args, kwargs)
        return result.value if type(result) is Degraded else result

    return call
