"""Queue labels stay bounded: a routing key becomes one of the app's queues or ``other``."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from celery_tuning.integration.receivers import OTHER_QUEUE, _routes, _topic_match, queue_label


def topic_app() -> Celery:
    app = Celery("labels", broker="memory://", set_as_current=False)
    events = Exchange("events", type="topic")
    app.conf.task_queues = [
        Queue("celery"),
        Queue("orders", events, routing_key="orders.#"),
        Queue("eu-audit", events, routing_key="*.eu.*"),
        Queue("direct-q", Exchange("d", type="direct"), routing_key="billing"),
    ]
    return app


def test_topic_routing_keys_collapse_onto_their_queues():
    app = topic_app()
    labels = {queue_label(app, {"exchange": "events", "routing_key": f"orders.eu.{n}"}) for n in range(5000)}
    assert labels == {"orders"}
    assert queue_label(app, {"routing_key": "orders"}) == "orders"  # '#' matches zero words
    assert queue_label(app, {"routing_key": "users.eu.42"}) == "eu-audit"
    assert queue_label(app, {"routing_key": "billing"}) == "direct-q"
    assert queue_label(app, {"routing_key": "celery"}) == "celery"


def test_unknown_keys_share_one_label_and_the_memo_stays_bounded():
    app = topic_app()
    labels = {queue_label(app, {"routing_key": f"users.us.{n}.x"}) for n in range(10_000)}
    assert labels == {OTHER_QUEUE}
    assert len(_routes) <= 4096


def test_without_a_routing_key_the_declared_queue_then_the_default():
    app = topic_app()
    assert queue_label(app, {}, "orders") == "orders"
    assert queue_label(app, None) == "celery"


def test_a_queue_added_at_run_time_is_labelled_from_then_on():
    app = topic_app()
    assert queue_label(app, {"routing_key": "late"}) == OTHER_QUEUE
    app.amqp.queues.add(Queue("late"))
    assert queue_label(app, {"routing_key": "late"}) == "late"


def test_topic_matching():
    def match(pattern: str, key: str) -> bool:
        return _topic_match(pattern.split("."), key.split("."))

    assert match("a.*.c", "a.b.c") and not match("a.*.c", "a.b.b.c")
    assert match("a.#", "a") and match("a.#", "a.b.c") and match("#", "x.y")
    assert match("#.c", "a.b.c") and not match("#.c", "a.b")
    assert not match("a.b", "a.b.c")


def test_a_broadcast_queue_is_no_wildcard_for_other_exchanges_and_keeps_a_stable_label():
    """kombu's Broadcast is a fanout queue named bcast.<uuid>: it matched every routing key (the
    label then changed with every worker start, and per-queue SLAs were skipped)."""
    from kombu.common import Broadcast

    app = topic_app()
    app.conf.task_queues = [Broadcast("announce"), *app.conf.task_queues]
    assert queue_label(app, {"exchange": "events", "routing_key": "orders.eu.7"}) == "orders"
    assert queue_label(app, {"exchange": "events", "routing_key": "nothing.here"}) == OTHER_QUEUE
    assert queue_label(app, {"exchange": "announce", "routing_key": ""}) == "announce"


def test_the_queue_this_worker_consumes_wins_over_an_overlapping_binding():
    app = Celery("overlap", broker="memory://", set_as_current=False)
    events = Exchange("events", type="topic")
    app.conf.task_queues = [Queue("orders_all", events, routing_key="orders.#"),
                            Queue("orders_eu", events, routing_key="orders.eu.*")]
    info = {"exchange": "events", "routing_key": "orders.eu.7"}
    assert queue_label(app, info) == "orders_all"  # no selection: the first binding that matches
    app.amqp.queues.select(["orders_eu"])  # what `celery worker -Q orders_eu` does
    assert queue_label(app, info) == "orders_eu"


def test_the_queue_the_worker_consumed_from_wins_over_the_routing_key():
    """On AMQP the worker's main process names the queue from the message's consumer tag: two
    queues bound to the same key on one exchange each get their own label (matching the key gave
    both the first)."""
    from celery_tuning.integration.receivers import CONSUMED_QUEUE

    app = Celery("consumed", broker="memory://", set_as_current=False)
    direct = Exchange("tx", type="direct")
    app.conf.task_queues = [Queue("qx", direct, routing_key="rk.x"), Queue("qy", direct, routing_key="rk.x")]
    info = {"exchange": "tx", "routing_key": "rk.x"}
    assert queue_label(app, info) == "qx"
    assert queue_label(app, {**info, CONSUMED_QUEUE: "qy"}) == "qy"
    assert queue_label(app, {**info, CONSUMED_QUEUE: "qx"}) == "qx"


def test_a_routing_key_that_names_a_queue_is_that_queue_only_on_the_default_exchange():
    """qy on exchange ey with key 'qa' (another queue's name): a message sent to ey with key qa is
    qy's, not qa's (the name shortcut took it for qa: one cap for both, qy's SLA never checked)."""
    app = Celery("alias", broker="memory://", set_as_current=False)
    app.conf.task_queues = [Queue("qa"), Queue("qy", Exchange("ey", type="direct"), routing_key="qa")]
    assert queue_label(app, {"exchange": "ey", "routing_key": "qa"}) == "qy"
    assert queue_label(app, {"exchange": "", "routing_key": "qa"}) == "qa"
    assert queue_label(app, {"exchange": "", "routing_key": "qy"}) == "qy"  # by name on the default exchange
