"""``@debounce`` without a broker or Redis: argument and setting checks, the publish side on the memory
store (collapse, ids, events), the key digest, and the counter the events feed."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, List

import pytest
from celery import Celery

import celery_tuning
from celery_tuning import ConfigurationError, TunedTask, debounce, events
from celery_tuning.integration.runtime import runtime_for
from celery_tuning.integration.steps.debounce import debounce_store, key_digest
from celery_tuning.policy.debounce import DEFAULT_KEY, DebouncePolicy, due_us


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"delay": 0}, "@debounce(delay=0)"),
        ({"delay": -1}, "@debounce(delay=-1)"),
        ({"delay": "1"}, "@debounce(delay='1')"),
        ({"delay": 1, "max_wait": 0.5}, "@debounce(max_wait=0.5): expected a number of seconds >= delay"),
        ({"delay": 1, "max_wait": -1}, "@debounce(max_wait=-1)"),
        ({"delay": 1, "key": "account"}, "@debounce(key='account')"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, fragment):
    with pytest.raises(ConfigurationError) as info:
        debounce(**kwargs)
    assert fragment in str(info.value)


def test_the_policy_is_attached_and_the_function_kept():
    def f(x):
        return x

    key = (lambda x: x)  # noqa: E731
    assert debounce(0.5, key=key, max_wait=2)(f) is f
    assert celery_tuning.policy.attach.policies_of(f)["debounce"] == DebouncePolicy(0.5, key, 2.0)


def test_due_is_delay_after_the_last_call_bounded_by_max_wait_after_the_first():
    assert due_us(10, 0, 5, None) == 15
    assert due_us(10, 0, 5, 12) == 12
    assert due_us(10, 8, 5, 12) == 15


def test_the_default_key_is_the_task_alone_and_a_key_function_is_hashed():
    policy = DebouncePolicy(1.0)
    assert key_digest(policy, (1,), {"a": 2}) == key_digest(policy, None, None) == DEFAULT_KEY
    keyed = DebouncePolicy(1.0, key=lambda account, **kw: account)
    a = key_digest(keyed, ("acme",), {"i": 1})
    assert a == key_digest(keyed, ("acme",), {"i": 2}) != key_digest(keyed, ("other",), {})
    assert len(a) == 24 and "acme" not in a


def _app(**conf: Any) -> Celery:
    app = Celery("debounce_unit", set_as_current=False, broker="memory://", backend="cache+memory://")
    app.conf.update(tuning_redis_url="memory://", tuning_park_mover=False, **conf)
    celery_tuning.install(app)
    return app


def test_calls_collapse_into_one_pending_run_and_every_caller_gets_its_id():
    app = _app()

    @app.task(base=TunedTask, shared=False)
    @debounce(60)
    def refresh(x):
        return x

    seen: List[str] = []
    events.DEBOUNCED.subscribe(seen.append)
    try:
        results = [refresh.delay(i) for i in range(5)]
        again = refresh.apply_async((8,), task_id=results[0].id)  # the pending run's own id: collapses
    finally:
        events.DEBOUNCED.unsubscribe(seen.append)
    assert len({r.id for r in results} | {again.id}) == 1
    assert seen == [refresh.name] * 5  # four collapsed calls and the one that gave the pending run's id
    store = debounce_store(runtime_for(app))
    entry = store.entry(refresh.name, DEFAULT_KEY)
    assert entry is not None and entry.pending_id == results[0].id and entry.in_flight_id is None


def test_a_call_whose_own_id_is_waited_for_is_published_at_once_not_collapsed():
    """A caller that will wait on its own id (explicit task_id, a frozen signature, a canvas member,
    a link) gets that id published: it is never answered with another run's id."""
    app = _app()

    @app.task(base=TunedTask, shared=False)
    @debounce(60)
    def refresh(x):
        return x

    @app.task(shared=False)
    def after(x):
        return x

    store = debounce_store(runtime_for(app))
    pending = refresh.delay(0).id
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("celery")
        published = [
            refresh.apply_async((1,), task_id="mine").id,
            refresh.apply_async((2,), link=after.s()).id,
            refresh.apply_async((3,), link_error=after.s()).id,
            refresh.apply_async((4,), group_id="g", group_index=0).id,
            refresh.apply_async((5,), chain=[]).id,   # a chain's last member
        ]
        frozen = refresh.s(6)
        frozen_id = frozen.freeze().id
        published.append(frozen.delay().id)
        sent = [queue.get(timeout=1) for _ in published]
        ids = [m.headers["id"] for m in sent]
        for m in sent:
            m.ack()
        queue.close()
    assert published[0] == "mine" and published[-1] == frozen_id
    assert pending not in published and ids == published
    entry = store.entry(refresh.name, DEFAULT_KEY)
    assert entry is not None and entry.pending_id == pending  # untouched by the calls published at once


def test_debounce_and_dedupe_on_one_task_are_refused_naming_both():
    app = _app()
    with pytest.raises(ConfigurationError, match=r"@debounce and @dedupe on one task"):
        @app.task(base=TunedTask, shared=False)
        @debounce(1)
        @celery_tuning.dedupe()
        def both(x):
            return x

        both.run  # noqa: B018


def test_key_values_are_told_apart_by_their_canonical_json_and_odd_ones_refused():
    keyed = DebouncePolicy(1.0, key=lambda v: v)
    assert key_digest(keyed, (1,), {}) != key_digest(keyed, ("1",), {})
    assert key_digest(keyed, ({"a": 1, "b": 2},), {}) == key_digest(keyed, ({"b": 2, "a": 1},), {})
    assert key_digest(keyed, ((1, "a"),), {}) == key_digest(keyed, ([1, "a"],), {})
    with pytest.raises(TypeError, match=r"@debounce\(key=\.\.\.\).*canonical JSON"):
        key_digest(keyed, (object(),), {})


def test_a_pickle_serializer_is_refused_when_bound_and_when_called():
    app = _app()
    with pytest.raises(ConfigurationError, match=r"task '.*pickled'.*@debounce: the task's serializer is 'pickle'"):
        @app.task(base=TunedTask, shared=False, serializer="pickle")
        @debounce(1)
        def pickled(x):
            return x

        pickled.run  # noqa: B018  (binding builds the chain)

    @app.task(base=TunedTask, shared=False)
    @debounce(1)
    def plain(x):
        return x

    with pytest.raises(ConfigurationError, match=r"apply_async\(serializer='pickle'\)"):
        plain.apply_async((1,), serializer="pickle")


def test_countdown_deferrals_are_refused_the_mover_publishes_debounced_runs():
    app = _app(tuning_defer_via="countdown")
    with pytest.raises(ConfigurationError, match="@debounce needs tuning_defer_via='park'"):
        @app.task(base=TunedTask, shared=False)
        @debounce(1)
        def refresh(x):
            return x

        refresh.run  # noqa: B018


COUNTER = r"""
from prometheus_client import REGISTRY
from celery_tuning import events
from celery_tuning.integration import metrics as m
m.connect_metric_receivers()
events.debounced("tasks.refresh")
events.debounced("tasks.refresh")
print(REGISTRY.get_sample_value("celery_tuning_debounced_total", {"task": "tasks.refresh"}))
"""


def test_collapsed_calls_feed_the_debounced_counter():
    out = subprocess.run([sys.executable, "-c", COUNTER], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["2.0"]
