"""Celery canvases and celery-tuning: short_circuit only answers plain calls; every canvas form on a real worker."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import redis
from celery import chain, chord, group
from celery import signals as celery_signals
from celery.app.task import Context
from celery.result import EagerResult

from celery_tuning import TunedTask, cache_result
from tests.support.apps import make_app

pytestmark = pytest.mark.integration


# --- short_circuit and the options Celery passes (no worker: what gets published) -------------


@pytest.fixture()
def published():
    """Ids of every task message this process publishes while the test runs."""
    ids: List[str] = []

    def record(headers=None, **_: Any) -> None:
        ids.append(headers["id"])

    celery_signals.before_task_publish.connect(record, weak=False)
    yield ids
    celery_signals.before_task_publish.disconnect(record)


@pytest.fixture()
def cached_app(redis_clean):
    """``price(x)`` with short_circuit and its value for 1 (and [1]) already cached; ``plain(x)``."""
    app = make_app(redis_clean, "canvas_publish")

    @app.task(base=TunedTask, shared=False, name="canvas_publish.price")
    @cache_result(ttl=60, l1_ttl=30, short_circuit=True)
    def price(x):
        return x

    @app.task(shared=False, name="canvas_publish.plain")
    def plain(x):
        return x

    assert price.apply((1,)).get() == 1 and price.apply(([1],)).get() == [1]
    assert price.cache.flush() and price.cache.get(1) == (True, 1)
    return app, price, plain


def _ids(result: Any) -> List[str]:
    return [r.id for r in getattr(result, "results", None) or [result]]


def _group(app, price, plain) -> Tuple[Any, List[str]]:
    res = group(price.s(1), price.s(1)).apply_async()
    return res, _ids(res)


def _chord_header(app, price, plain):
    res = chord([price.s(1), price.s(1)], plain.s()).apply_async()
    return res, _ids(res.parent)


def _chord_body(app, price, plain):
    # The result backend calls the body like this when the header is done: frozen, its id known.
    body = chord([plain.s(1)], price.s()).freeze()
    sig = app.signature({"task": price.name, "args": (), "kwargs": {}, "options": {"task_id": body.id},
                         "subtask_type": None, "immutable": False})
    res = sig.delay([1])
    return res, [body.id]


def _chain_first(app, price, plain):
    res = chain(price.s(1), plain.s()).apply_async()
    return res, [res.parent.id]


def _chain_last(app, price, plain):
    # How the worker publishes the last task of a chain (celery/app/trace.py): chain=[] is falsy.
    res = price.s().apply_async((1,), chain=[], parent_id="p-1", root_id="r-1")
    return res, [res.id]


def _group_in_chain(app, price, plain):
    # How the worker applies a group that follows a task in a chain: parent and root ids set.
    res = group(price.s(), price.s()).apply_async((1,), parent_id="p-2", root_id="r-2")
    return res, _ids(res)


def _chord_in_chain(app, price, plain):
    res = chord([price.s(), price.s()], plain.s()).apply_async((1,), parent_id="p-3", root_id="r-3")
    return res, _ids(res.parent)


def _link(app, price, plain):
    res = price.apply_async((1,), link=plain.s())
    return res, [res.id]


def _link_error(app, price, plain):
    res = price.apply_async((1,), link_error=plain.si(0))
    return res, [res.id]


def _callback(app, price, plain):
    # A task's link callback, as the worker publishes it.
    res = price.s().apply_async((1,), parent_id="p-4", root_id="r-4")
    return res, [res.id]


def _frozen_signature(app, price, plain):
    sig = price.s(1)
    frozen = sig.freeze()
    res = sig.apply_async()
    return res, [frozen.id]


def _retry(app, price, plain):
    # Task.retry and celery-tuning's deferrals re-publish the running task's request.
    request = Context(id="retried-1", args=(1,), kwargs={}, retries=0, root_id="retried-1",
                      delivery_info={"exchange": "", "routing_key": "celery"})
    res = price.signature_from_request(request, countdown=0, retries=1).apply_async()
    return res, ["retried-1"]


def _replaced(app, price, plain):
    # Task.replace: the new signature takes the replaced task's id, root and nesting.
    sig = price.s(1)
    sig.freeze("replaced-1")
    sig.set(root_id="replaced-1", replaced_task_nesting=1)
    res = sig.delay()
    return res, ["replaced-1"]


def _send_task(app, price, plain):
    res = app.send_task(price.name, (1,))
    return res, [res.id]


CANVAS: Dict[str, Callable[..., Tuple[Any, List[str]]]] = {
    "group": _group, "chord_header": _chord_header, "chord_body": _chord_body, "chain_first": _chain_first,
    "chain_last": _chain_last, "group_in_chain": _group_in_chain, "chord_in_chain": _chord_in_chain,
    "link": _link, "link_error": _link_error, "callback": _callback, "frozen_signature": _frozen_signature,
    "retry_or_deferral": _retry, "replaced": _replaced, "send_task": _send_task,
}


@pytest.mark.parametrize("form", sorted(CANVAS))
def test_short_circuit_publishes_every_canvas_member(cached_app, published, form):
    """A cached member of a canvas is published: its id is what the chord counter, the chain and
    the group result wait for, and an EagerResult never reaches the result backend."""
    app, price, plain = cached_app
    result, expected = CANVAS[form](app, price, plain)
    missing = [task_id for task_id in expected if task_id not in published]
    assert not missing, f"{form}: answered from the cache without publishing {missing}"
    assert not isinstance(result, EagerResult)


@pytest.mark.parametrize("call", [
    lambda price: price.delay(1),
    lambda price: price.apply_async((1,), countdown=5, queue="celery", priority=3, expires=60),
    lambda price: price.s(1).delay(),
    lambda price: price.s(1).set(queue="celery").apply_async(),
    lambda price: price.apply_async(kwargs={"x": 1}, headers={"trace": "t-1"}, link=None),
], ids=["delay", "apply_async_options", "signature_delay", "signature_set", "explicit_none_link"])
def test_short_circuit_still_answers_plain_calls(cached_app, published, call):
    price = cached_app[1]
    result = call(price)
    assert isinstance(result, EagerResult) and result.get() == 1
    assert published == []


# --- the canvas matrix on a real prefork worker ----------------------------------------------

FORMS = ("chain", "group", "chord", "chunks", "map", "starmap", "link", "link_error", "replace")
#: Celery's map, starmap and chunks call the task directly inside one built-in task: a member has
#: no message of its own to re-publish. A concurrency limit waits for a slot there (max_wait); an
#: open breaker fails fast (CircuitOpen) and so fails the whole map, as documented in
#: docs/breakers.md. Those cells are checked by test_direct_members_fail_fast_on_an_open_breaker.
DIRECT_FAIL_FAST = {("chunks", "breaker"), ("map", "breaker"), ("starmap", "breaker")}


@pytest.fixture(scope="module")
def canvas_worker():
    """A private redis-server and one prefork worker (3 processes) on tests.apps.canvas, for the module."""
    from celery_tuning.testing import RedisServer
    from tests.apps.canvas import build
    from tests.support.apps import worker_env
    from tests.support.workers import WorkerProcess

    server = RedisServer().start()
    worker = WorkerProcess("tests.apps.canvas:app", worker_env(server), pool="prefork", concurrency=3,
                           name="canvas")
    try:
        worker.start()
        app = build(server.db_url(0), server.db_url(0), server.db_url(1))
        yield app, server.client(1), worker
    finally:
        worker.close()
        server.close()


class Cell:
    """One canvas form run by one mode's tasks; ``base`` keeps its arguments apart from other cells'."""

    def __init__(self, app: Any, mode: str, base: int) -> None:
        self.app, self.mode, self.base = app, mode, base
        self.step, self.total, self.boom, self.errback = (
            app.tasks[f"canvas.{mode}.{name}"] for name in ("step", "total", "boom", "errback"))

    def run(self, form: str) -> Tuple[Any, Any, List[Any], List[List[int]]]:
        """Run the form once: (result, expected result, body arguments that must run once each,
        chord bodies expected); a failure's errback has run when it returns."""
        step, b, timeout = self.step, self.base, 15
        xs = [b + i for i in range(5)]
        if form == "chain":
            res = (step.s(b) | step.s() | step.s()).apply_async().get(timeout=timeout)
            return res, b + 3, [b, b + 1, b + 2], []
        if form == "group":
            res = group(step.s(x) for x in xs).apply_async().get(timeout=timeout)
            return res, [x + 1 for x in xs], xs, []
        if form == "chord":
            res = chord((step.s(x) for x in xs), self.total.s()).apply_async().get(timeout=timeout)
            return res, sum(x + 1 for x in xs), [*xs, f"total:{b + 1}"], [[x + 1 for x in xs]]
        if form == "chunks":
            items = [(b + i,) for i in range(6)]
            res = step.chunks(items, 2).group().apply_async().get(timeout=timeout)
            return res, [[b + 1, b + 2], [b + 3, b + 4], [b + 5, b + 6]], [b + i for i in range(6)], []
        if form == "map":
            res = step.map(xs).apply_async().get(timeout=timeout)
            return res, [x + 1 for x in xs], xs, []
        if form == "starmap":
            res = step.starmap([(x,) for x in xs]).apply_async().get(timeout=timeout)
            return res, [x + 1 for x in xs], xs, []
        if form == "link":
            callback = step.s()
            callback_id = callback.freeze().id
            first = step.apply_async((b,), link=callback).get(timeout=timeout)
            second = self.app.AsyncResult(callback_id).get(timeout=timeout)
            return [first, second], [b + 1, b + 2], [b, b + 1], []
        if form == "replace":
            res = self.app.tasks[f"canvas.{self.mode}.replacer"].delay(b).get(timeout=timeout)
            return res, b + 1, [b], []
        assert form == "link_error"
        failed = self.boom.apply_async((b,), link_error=self.errback.s())
        with pytest.raises(ValueError, match=f"boom {b}"):
            failed.get(timeout=timeout)
        self.failed_id = failed.id
        ledger = redis.Redis.from_url(self.app.conf.tuning_redis_url)
        assert _wait_for(lambda: ledger.hexists(f"errbacks:{self.mode}", failed.id)), "errback never ran"
        return None, None, [b], []


def _wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


MATRIX = [(form, mode) for mode in ("cached", "rate", "conc", "breaker") for form in FORMS
          if (form, mode) not in DIRECT_FAIL_FAST]


@pytest.mark.slow
@pytest.mark.parametrize(("form", "mode"), [pytest.param(form, mode, id=f"{mode}-{form}") for form, mode in MATRIX])
def test_canvas_matrix(canvas_worker, form, mode):
    """Every result and callback exactly once, the chord body once with every header result,
    whatever the tasks' policy does to the members (cache hits, deferrals, an open breaker)."""
    import json
    import time

    from celery_tuning.integration.registry import breaker
    from tests.apps.canvas import BREAKER_REFRESH

    app, ledger, worker = canvas_worker
    cell = Cell(app, mode, base=1000 * (MATRIX.index((form, mode)) + 1))
    runs_key, bodies_key, errbacks_key = f"runs:{mode}", f"bodies:{mode}", f"errbacks:{mode}"
    ledger.delete(runs_key, bodies_key, errbacks_key, f"deferred:{mode}")
    if mode == "cached":
        cell.run(form)  # the first run computes and caches every member (stored before it returns)
        ledger.delete(runs_key, bodies_key, errbacks_key)
    if mode == "breaker":
        breaker("canvas-breaker", app).open()
        time.sleep(2 * BREAKER_REFRESH)  # every worker process now sees it open

    try:
        result, expected, once, bodies = cell.run(form)
    except Exception as exc:  # a hang shows up as a timeout: say what the worker did
        raise AssertionError(f"{mode}-{form}: {exc!r}\n{worker.output()[-4000:]}") from exc
    assert result == expected
    runs = {key.decode(): int(n) for key, n in ledger.hgetall(runs_key).items()}
    runs = {key: n for key, n in runs.items() if not key.startswith("errback:")}
    if mode == "cached":
        # Every member and the chord body answered by the cache; only a failure runs again.
        assert runs == ({str(cell.base): 1} if form == "link_error" else {})
    else:
        assert runs == {str(x): 1 for x in once}, "a member ran twice or never"
    if mode != "cached" and form in ("group", "chord"):  # the cell did what it says it tests
        assert int(ledger.get(f"deferred:{mode}") or 0) > 0, "no member was deferred"
    assert [json.loads(raw) for raw in ledger.lrange(bodies_key, 0, -1)] == ([] if mode == "cached" else bodies)
    assert {key.decode(): int(n) for key, n in ledger.hgetall(errbacks_key).items()} == (
        {cell.failed_id: 1} if form == "link_error" else {})


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(form for form, _ in DIRECT_FAIL_FAST))
def test_direct_members_fail_fast_on_an_open_breaker(canvas_worker, form):
    """map/starmap/chunks members are direct calls: an open breaker raises CircuitOpen in the
    member, which fails the built-in task once; no member body runs and nothing is retried."""
    import time

    from celery_tuning import CircuitOpen
    from celery_tuning.integration.registry import breaker
    from tests.apps.canvas import BREAKER_REFRESH

    app, ledger, _ = canvas_worker
    cell = Cell(app, "breaker", base=100_000 + 1000 * FORMS.index(form))
    ledger.delete("runs:breaker")
    breaker("canvas-breaker", app).open()
    time.sleep(2 * BREAKER_REFRESH)
    with pytest.raises(CircuitOpen):
        cell.run(form)
    assert ledger.hgetall("runs:breaker") == {}
