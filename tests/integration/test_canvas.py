"""Celery canvases and celery-tuning: short_circuit only answers plain calls; every canvas form on a real worker."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
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
