"""One pipeline for both sides of a tuned task: the worker-side chain around ``run`` and the
publish-side chain around ``apply_async``, built once per task class when it is bound.

Every call of a tuned task gets one :class:`CallContext`, handed from step to step. Steps
cooperate through it and through what they declare on :class:`Step`, never through
thread-locals or by looking each other up:

- a step whose decision lives in the tuning Redis may offer it **ahead**
  (:meth:`Step.ahead`): an outer step whose store can take it in its own round trip
  (:attr:`Step.carries_ahead`, the cache's miss path) takes it there, and the decision lands
  in :attr:`CallContext.admission` for the offering step to act on;
- the pipeline, not the steps, decides when that is allowed: a decision is never taken ahead
  across a step that may still refuse the call after it is taken (:attr:`Step.refuses_remotely`,
  the concurrency slot), and only while every step in between would let the call through by a
  local look (:meth:`Step.passes_locally`, an open breaker says no);
- a step that may return a stand-in for the body's result returns a :class:`Degraded`; outer
  steps see it for what it is and the chain hands Celery its value;
- publish-side hooks (:meth:`Step.publish`) wrap ``apply_async`` in the same order, except that
  the cache's short circuit runs before ``dedupe`` claims a key (:data:`PUBLISH_ORDER`);
- before every step, a **guard** drops a stale duplicate of a message the parking mover published
  twice (:func:`celery_tuning.integration.deferral.guard`), so it never runs.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

__all__ = [
    "PUBLISH_ORDER", "STEP_ORDER", "Ahead", "Call", "CallContext", "Degraded", "PublishCall", "PublishContext", "Step",
    "build_chain", "build_publisher", "register_step",
]

#: Outermost first: a cache hit skips everything; an open breaker is checked
#: before a slot or a token is taken; the concurrency slot is taken before the
#: rate-limit token, because a slot is given back the moment the call is refused
#: while a spent token is not (the slot is held while a call waits up to
#: ``max_wait`` for its token); the cache store runs after ``run`` on the way back
#: out. ``celery_tuning.integration.interactions`` tabulates what each step does
#: with every outcome of the steps inside it. ``dedupe`` is outermost: its lock follows the whole
#: attempt (held while running, kept when an inner step defers the call, freed on every other exit).
#: ``debounce`` is before it: a debounced call is stored, not published, and its run (published by
#: the mover) holds the key's running mark around everything else. ``fair`` is first of all: a fair
#: call waits in its key's list, not in the broker, and its run leaves the queue's window before
#: anything else (see docs/fair.md).
STEP_ORDER: Tuple[str, ...] = ("fair", "debounce", "dedupe", "cache", "breaker", "concurrency", "rate_limit")

#: How the steps' publish hooks nest around ``apply_async``, outermost first: as
#: :data:`STEP_ORDER`, except that the cache's short circuit answers before ``dedupe`` claims a key.
#: A claim taken for a call the cache then answers would name, for a moment, an id that is never
#: published: an identical call made in that moment would be answered with it and wait forever.
PUBLISH_ORDER: Tuple[str, ...] = ("fair", "debounce", "cache", "dedupe", "breaker", "concurrency", "rate_limit")


class CallContext:
    """One call of a tuned task, as every step of its chain sees it.

    Made once per call by the chain's outermost link; lives as long as the call.
    """

    __slots__ = ("admission", "admission_key", "args", "digest", "kwargs", "request", "task")

    def __init__(self, task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        self.task = task
        self.request = task.request
        self.args = args
        self.kwargs = kwargs
        #: The cache key digest of these arguments (set by the cache step).
        self.digest: Optional[str] = None
        #: A rate-limit decision already taken for this call in an outer step's round trip.
        self.admission: Any = None
        #: The per-key limiter key ``admission`` was taken for.
        self.admission_key: Any = None


#: A link of the chain: ``call(ctx) -> result``.
Call = Callable[[CallContext], Any]


class Ahead:
    """A decision a step offers to have taken in an outer step's round trip.

    ``keys`` and ``packed`` are what the store's combined operation needs; ``connector`` is the
    Redis it must run on (a carrier on another Redis cannot take it); ``settle(reply)`` turns
    the store's reply into the decision and writes it into the call's context.
    """

    __slots__ = ("_settle", "connector", "keys", "packed")

    def __init__(self, connector: Any, keys: List[str], packed: str, settle: Callable[[int], None]) -> None:
        self.connector, self.keys, self.packed, self._settle = connector, keys, packed, settle

    def settle(self, reply: int) -> None:
        self._settle(reply)


class Degraded:
    """A stand-in an inner step returned instead of the body's result (a breaker's fallback).

    Outer steps must not take it for the body's result (the cache does not store it); the
    chain's outermost call hands ``value`` to Celery.
    """

    __slots__ = ("source", "value")

    def __init__(self, value: Any, source: str) -> None:
        self.value = value
        self.source = source


class PublishContext:
    """One ``apply_async`` of a tuned task, as the publish-side hooks see it."""

    __slots__ = ("args", "kwargs", "options", "task", "task_id")

    def __init__(self, task: Any, args: Any, kwargs: Any, task_id: Any, options: Dict[str, Any]) -> None:
        self.task = task
        #: As the caller passed them (None, a list, a tuple...): Celery validates them when it publishes.
        self.args = args
        self.kwargs = kwargs
        self.task_id = task_id
        self.options = options


#: A link of the publish-side chain: ``publish(pctx) -> AsyncResult``.
PublishCall = Callable[[PublishContext], Any]


class Step:
    """One capability's part of a task's pipeline.

    Subclasses implement :meth:`wrap` and declare how they cooperate. Steps are built once per
    task class when it is bound and must be safe to call from several threads; per-call state
    lives in the :class:`CallContext`.
    """

    #: Policy kind this step applies (a key of ``STEP_ORDER``).
    kind: str = ""
    #: Whether this step may return a :class:`Degraded` value (the chain then unwraps it).
    degrades: bool = False
    #: Whether this step's store can take an inner step's :class:`Ahead` decision in its own round
    #: trip; the pipeline then gives it :meth:`take_ahead_from`.
    carries_ahead: bool = False
    #: Whether this step may refuse a call after consulting its store: no decision of a step
    #: inside it is taken ahead (the token would be spent for a call the slot then refuses).
    refuses_remotely: bool = False

    def park_spot(self) -> Optional[Any]:
        """The parking spot this step's deferrals park at (None: it never parks, or the call's
        arguments decide it: see :meth:`park_spot_for`)."""
        return None

    def park_spot_for(self, ctx: CallContext) -> Optional[Any]:
        """The parking spot this call's deferral would park at (the fixed one by default)."""
        return self.park_spot()

    def wrap(self, call_next: Call) -> Call:  # pragma: no cover - interface
        """Return a call that applies this step, then ``call_next``."""
        raise NotImplementedError

    def ahead(self, ctx: CallContext, connector: Any) -> Optional[Ahead]:
        """The decision this call will need from this step, for an outer carrier whose store runs on
        ``connector`` to take in its round trip; None when there is none or this step's store is elsewhere.

        Called only for a carrier that can combine: check ``connector`` before any per-call work.
        """
        return None

    def passes_locally(self, ctx: CallContext) -> bool:
        """False when a local look (no I/O) says this step would stop the call now."""
        return True

    def take_ahead_from(self, offer: Callable[[CallContext, Any], Optional[Ahead]]) -> None:
        """Called once on a carrier with ``offer(ctx, connector)``, which yields a call's :class:`Ahead`, if any."""

    def bind(self, task_cls: Any) -> None:
        """Attach what this step exposes on the task class (``task.cache``)."""

    def publish(self, publish_next: PublishCall) -> Optional[PublishCall]:
        """Wrap ``apply_async`` (None: this step does nothing when the task is published)."""
        return None


#: kind -> factory(policy, task_cls) -> Step
_FACTORIES: Dict[str, Callable[[Any, Any], Step]] = {}


def register_step(kind: str, factory: Callable[[Any, Any], Step]) -> None:
    """Make ``factory`` build the step for policies of ``kind``."""
    if kind not in STEP_ORDER:
        raise ValueError(f"unknown step kind {kind!r}; known: {STEP_ORDER}")
    _FACTORIES[kind] = factory


def build_steps(task_cls: Any, policies: Mapping[str, Any]) -> List[Step]:
    """The steps the policies ask for, outermost first (``sla`` has none: receivers time it)."""
    steps = [
        _FACTORIES[kind](policies[kind], task_cls)
        for kind in STEP_ORDER
        if kind in policies and kind in _FACTORIES
    ]
    _wire_ahead(steps)
    return steps


def _wire_ahead(steps: List[Step]) -> None:
    """Give each carrier the decisions of the steps inside it that may be taken ahead."""
    for i, carrier in enumerate(steps):
        if not carrier.carries_ahead:
            continue
        between: List[Step] = []
        offers: List[Tuple[Step, List[Step]]] = []
        for inner in steps[i + 1:]:
            if inner.refuses_remotely:
                break  # a decision taken ahead across it could be spent on a refused call
            if type(inner).ahead is not Step.ahead:
                offers.append((inner, list(between)))
            between.append(inner)
        if offers:
            carrier.take_ahead_from(_offer(offers))


def _offer(offers: List[Tuple[Step, List[Step]]]) -> Callable[[CallContext, Any], Optional[Ahead]]:
    def offer(ctx: CallContext, connector: Any) -> Optional[Ahead]:
        for step, between in offers:
            if all(gate.passes_locally(ctx) for gate in between):
                found = step.ahead(ctx, connector)
                if found is not None:
                    return found
        return None

    return offer


def build_chain(task_cls: Any, policies: Mapping[str, Any],
                run: Callable[[Any, Tuple[Any, ...], Dict[str, Any]], Any]) -> Tuple[Callable[..., Any], List[Step]]:
    """Wrap ``run(task, args, kwargs)`` in the steps the policies ask for, in :data:`STEP_ORDER`.

    Returns ``(call(task, args, kwargs), steps)``, steps outermost first; ``call`` makes the
    call's :class:`CallContext` and hands Celery a plain value (a :class:`Degraded` unwrapped).
    """
    steps = build_steps(task_cls, policies)

    def body(ctx: CallContext) -> Any:
        return run(ctx.task, ctx.args, ctx.kwargs)

    chain: Call = body
    for step in reversed(steps):
        chain = step.wrap(chain)
    if steps:
        chain = _guarded(chain, steps)
    inner = chain

    if any(step.degrades for step in steps):
        def call(task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            result = inner(CallContext(task, args, kwargs))
            return result.value if type(result) is Degraded else result
    else:
        def call(task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            return inner(CallContext(task, args, kwargs))

    return call, steps


def _guarded(call_next: Call, steps: List[Step]) -> Call:
    """The outermost link: a message published back by the parking mover is redeemed first (and a
    redelivered message whose attempt parked again at one of the steps' spots is dropped; the
    spots are worked out only for a redelivered message, the call's arguments may decide them)."""
    from .deferral import guard

    def call(ctx: CallContext) -> Any:
        guard(ctx.task, ctx.request,
              lambda: [where for where in (step.park_spot_for(ctx) for step in steps) if where is not None])
        return call_next(ctx)

    return call


def _publish_order(steps: List[Step]) -> List[Step]:
    """``steps`` (outermost first) as their publish hooks nest: :data:`PUBLISH_ORDER` (a step of
    no known kind keeps its place)."""
    places = [i for i, step in enumerate(steps) if step.kind in PUBLISH_ORDER]
    ordered = sorted((steps[i] for i in places), key=lambda step: PUBLISH_ORDER.index(step.kind))
    out = list(steps)
    for i, step in zip(places, ordered):
        out[i] = step
    return out


def build_publisher(steps: List[Step], send: Callable[..., Any]) -> Optional[Callable[..., Any]]:
    """An ``apply_async(self, args, kwargs, task_id, **options)`` running the steps' publish hooks
    around ``send`` (the class's own ``apply_async``), or None when no step has one."""

    def last(pctx: PublishContext) -> Any:
        return send(pctx.task, pctx.args, pctx.kwargs, task_id=pctx.task_id, **pctx.options)

    chain: PublishCall = last
    wrapped = False
    for step in reversed(_publish_order(steps)):
        hooked = step.publish(chain)
        if hooked is not None:
            chain, wrapped = hooked, True
    if not wrapped:
        return None
    outer = chain

    def apply_async(self: Any, args: Any = None, kwargs: Any = None, task_id: Any = None, **options: Any) -> Any:
        return outer(PublishContext(self, args, kwargs, task_id, options))

    return apply_async
