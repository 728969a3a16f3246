"""The events sink: order, isolation, and the public Celery signals fed from it with the same arguments."""

from celery_tuning import events, signals


def test_subscribers_run_in_order_once_and_first_goes_first():
    topic = events.Topic("t")
    seen = []
    a = topic.subscribe(lambda *args: seen.append(("a", args)))
    topic.subscribe(a)  # twice: still once
    topic.subscribe(lambda *args: seen.append(("first", args)), first=True)
    for subscriber in topic.subscribers:
        subscriber(1)
    assert seen == [("first", (1,)), ("a", (1,))]
    topic.unsubscribe(a)
    assert len(topic.subscribers) == 1


def test_a_failing_subscriber_is_skipped_and_the_others_run():
    seen = []

    def boom(name, event, seconds):
        raise RuntimeError("boom")

    def good(name, event, seconds):
        seen.append((name, event, seconds))

    events.LIMITER.subscribe(boom, first=True)
    events.LIMITER.subscribe(good)
    try:
        events.limiter_event("api", "acquired", 0.0)  # does not raise
    finally:
        events.LIMITER.unsubscribe(boom)
        events.LIMITER.unsubscribe(good)
    assert seen == [("api", "acquired", 0.0)]


class Task:
    name = "t"


def test_the_public_signals_fire_with_the_same_arguments_as_before():
    got = {}

    def keep(name):
        def receiver(sender=None, signal=None, **kwargs):
            got[name] = (sender, kwargs)
        return receiver

    receivers = {name: keep(name) for name in signals.__all__}
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver, weak=False)
    task = Task()
    try:
        events.limiter_event("api", "waited", 0.5)
        events.cache_event("t", "hit_l1")
        events.breaker_transition("pay", "closed", "open", "failures")
        events.task_timed(task, "id", "q", 0.1, 0.2, 0.3, "SUCCESS", False, 0.01)
        events.sla_checked(task, "q")
        events.sla_breached(task, "id", "q", "warning", "total", 2.0, 1.0)
        events.task_deferred(task, "id", "rate_limit", 1.5, 2)
    finally:
        for name, receiver in receivers.items():
            getattr(signals, name).disconnect(receiver)
    assert got == {
        "limiter_event": ("api", {"event": "waited", "seconds": 0.5}),
        "cache_event": ("t", {"event": "hit_l1"}),
        "circuit_state_changed": ("pay", {"old": "closed", "new": "open", "reason": "failures"}),
        "task_timed": (task, {"task_id": "id", "queue": "q", "wait": 0.1, "run": 0.2, "total": 0.3,
                              "state": "SUCCESS", "clamped": False, "cpu": 0.01}),
        "sla_checked": (task, {"queue": "q"}),
        "sla_breached": (task, {"task_id": "id", "queue": "q", "level": "warning", "kind": "total",
                                "measured": 2.0, "threshold": 1.0}),
        "task_deferred": (task, {"task_id": "id", "reason": "rate_limit", "countdown": 1.5, "deferrals": 2}),
    }
