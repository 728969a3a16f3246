"""The pipeline's wiring: the per-call context, decisions taken ahead, publish hooks, admission rules."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from celery_tuning.integration import pipeline
from celery_tuning.integration.pipeline import Ahead, CallContext, Step
from celery_tuning.policy import admission


class Task(SimpleNamespace):
    pass


def task():
    return Task(request=SimpleNamespace(id="t1", headers={}))


class Carrier(Step):
    """Takes whatever is offered in its 'round trip' and settles it with reply 0 (admitted)."""

    kind = "cache"
    carries_ahead = True

    def __init__(self):
        self.offer = None
        self.taken = []

    def take_ahead_from(self, offer):
        self.offer = offer

    def wrap(self, call_next):
        def call(ctx):
            found = self.offer(ctx, "conn") if self.offer else None
            if found is not None:
                self.taken.append(found.keys)
                found.settle(0)
            return call_next(ctx)

        return call


class Offerer(Step):
    kind = "rate_limit"

    def __init__(self):
        self.seen = []

    def ahead(self, ctx, connector):
        if connector != "conn":
            return None

        def settle(reply):
            ctx.admission = ("settled", reply)

        return Ahead(object(), ["k"], "packed", settle)

    def wrap(self, call_next):
        def call(ctx):
            self.seen.append(ctx.admission)
            return call_next(ctx)

        return call


class Gate(Step):
    kind = "breaker"

    def __init__(self, open_=False, remote=False):
        self.open = open_
        self.refuses_remotely = remote

    def passes_locally(self, ctx):
        return not self.open

    def wrap(self, call_next):
        return call_next


@pytest.fixture()
def factories(monkeypatch):
    monkeypatch.setattr(pipeline, "_FACTORIES", {})
    return pipeline._FACTORIES


def build(factories, steps):
    for step in steps:
        factories[step.kind] = lambda policy, cls, step=step: step
    return pipeline.build_chain(object, {s.kind: None for s in steps}, lambda t, a, k: ("ran", a, k))


def test_a_decision_taken_ahead_reaches_its_step_through_the_context(factories):
    carrier, offerer = Carrier(), Offerer()
    call, _ = build(factories, [carrier, offerer])
    assert call(task(), (1,), {"x": 2}) == ("ran", (1,), {"x": 2})
    assert carrier.taken == [["k"]]
    assert offerer.seen == [("settled", 0)]


def test_nothing_is_taken_ahead_across_a_step_that_refuses_after_asking_its_store(factories):
    carrier, gate, offerer = Carrier(), Gate(remote=True), Offerer()
    gate.kind = "concurrency"
    call, _ = build(factories, [carrier, gate, offerer])
    call(task(), (), {})
    assert carrier.offer is None and carrier.taken == []
    assert offerer.seen == [None]


def test_a_step_that_would_stop_the_call_locally_keeps_the_decision_from_being_taken(factories):
    carrier, gate, offerer = Carrier(), Gate(open_=True), Offerer()
    call, _ = build(factories, [carrier, gate, offerer])
    call(task(), (), {})
    assert carrier.taken == [] and offerer.seen == [None]
    gate.open = False
    call(task(), (), {})
    assert carrier.taken == [["k"]] and offerer.seen == [None, ("settled", 0)]


def test_each_call_has_its_own_context_across_threads(factories):
    carrier, offerer = Carrier(), Offerer()
    call, _ = build(factories, [carrier, offerer])
    barrier = threading.Barrier(8)
    seen = []

    class Slow(Offerer):
        def wrap(self, call_next):
            def inner(ctx):
                barrier.wait(timeout=5)
                seen.append(ctx.admission)
                return call_next(ctx)
            return inner

    slow = Slow()
    call, _ = build(factories, [Carrier(), slow])
    threads = [threading.Thread(target=call, args=(task(), (i,), {})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [("settled", 0)] * 8


def test_publish_hooks_run_outermost_first_around_apply_async():
    log = []

    class Hook(Step):
        def __init__(self, name):
            self.name = name

        def publish(self, publish_next):
            def publish(pctx):
                log.append(self.name)
                pctx.options.setdefault("seen", []).append(self.name)
                return publish_next(pctx)
            return publish

    def send(task, args, kwargs, task_id=None, **options):
        return (task, args, kwargs, task_id, options)

    apply_async = pipeline.build_publisher([Hook("outer"), Step(), Hook("inner")], send)
    out = apply_async("T", [1], {"a": 1}, task_id=None, queue="q")
    assert log == ["outer", "inner"]
    assert out == ("T", [1], {"a": 1}, None, {"queue": "q", "seen": ["outer", "inner"]})
    assert pipeline.build_publisher([Step()], send) is None


def test_context_holds_the_call():
    t = task()
    ctx = CallContext(t, (1,), {"k": 2})
    assert (ctx.task, ctx.request, ctx.args, ctx.kwargs) == (t, t.request, (1,), {"k": 2})
    assert ctx.admission is None and ctx.digest is None


@pytest.mark.parametrize("on_limit, eager, allowed, wait, max_wait, expected", [
    ("raise", False, True, 0.0, 1.0, admission.Action("admit")),
    ("raise", False, True, 0.5, 1.0, admission.Action("admit")),  # raise never reserves: allowed is now
    ("raise", False, False, 2.0, 1.0, admission.Action("raise", 2.0)),
    ("wait", False, False, 2.0, 1.0, admission.Action("wait")),
    ("defer", True, False, 2.0, 1.0, admission.Action("wait")),  # eager: nothing to defer through
    ("auto", False, True, 0.0, 1.0, admission.Action("admit")),
    ("auto", False, True, 0.5, 1.0, admission.Action("sleep", 0.5)),
    ("auto", False, True, 1.5, 1.0, admission.Action("defer", 1.5, keep_slot=True)),
    ("defer", False, True, 0.5, 1.0, admission.Action("defer", 0.5, keep_slot=True)),
    ("auto", False, False, 9.0, 1.0, admission.Action("defer", 9.0, keep_slot=False)),
])
def test_rate_limit_action(on_limit, eager, allowed, wait, max_wait, expected):
    assert admission.rate_limit_action(on_limit, eager, allowed, wait, max_wait) == expected


def test_rate_limit_reserve_and_timeouts():
    assert admission.rate_limit_reserve("raise", False, 60.0, 5.0) is None
    assert admission.rate_limit_reserve("wait", False, 60.0, 5.0) == 5.0
    assert admission.rate_limit_reserve("auto", True, 60.0, 5.0) == 5.0
    assert admission.rate_limit_reserve("auto", False, 60.0, 5.0) == 60.0
    assert admission.rate_limit_wait_timeout("wait", 2.0, 60.0) == 2.0
    assert admission.rate_limit_wait_timeout("auto", 2.0, 60.0) == 60.0


def test_concurrency_recheck_grows_and_is_bounded():
    assert admission.concurrency_recheck(30.0, 0) == 0.25
    assert admission.concurrency_recheck(30.0, 1) == 0.375
    assert admission.concurrency_recheck(30.0, 40) == admission.MAX_RECHECK
    assert admission.concurrency_recheck(0.1, 3) == 0.1


def test_when_open():
    assert admission.when_open(True, "fail", False) == "fallback"
    assert admission.when_open(False, "fail", False) == "raise"
    assert admission.when_open(False, "retry", True) == "raise"
    assert admission.when_open(False, "retry", False) == "defer"


def test_publish_order_names_every_step_once_and_puts_the_cache_before_dedupe():
    """A kind missing from PUBLISH_ORDER would fail every bind of a task using it."""
    from celery_tuning.integration.pipeline import PUBLISH_ORDER, STEP_ORDER

    assert sorted(PUBLISH_ORDER) == sorted(STEP_ORDER) and len(set(PUBLISH_ORDER)) == len(PUBLISH_ORDER)
    assert PUBLISH_ORDER.index("cache") < PUBLISH_ORDER.index("dedupe")
