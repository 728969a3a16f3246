"""Parking on the worker side against the reference MemoryParkStore: payloads, the guard, the mover."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
from celery import Celery
from celery.app.task import Context
from celery.exceptions import Ignore

from celery_tuning import events
from celery_tuning.integration.deferral import (
    HEADER_DEFERRALS,
    HEADER_PARK,
    decode_payload,
    encode_payload,
    guard,
)
from celery_tuning.integration.mover import Mover, parked_snapshot
from celery_tuning.integration.runtime import runtime_for
from celery_tuning.storage.park import MemoryParkStore, Spot

SPOT = Spot("rate_limit", "api")


@pytest.fixture()
def app() -> Any:
    app = Celery("parking-unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(tuning_redis_url="redis://127.0.0.1:1/0", tuning_concurrency_limits={"solo": 1},
                    tuning_rate_limits={"api": "10/s"})

    @app.task(bind=True, name="unit.work", shared=False)
    def work(self: Any, x: int, y: int = 0) -> int:
        return x + y

    return app


@pytest.fixture()
def store(app: Any) -> MemoryParkStore:
    store = MemoryParkStore()
    runtime_for(app).registry.use_park_store(store)
    return store


def _request(task_id: str = "t-1", headers: Any = None, **extra: Any) -> Context:
    return Context(id=task_id, args=(1,), kwargs={"y": 2}, headers=headers or {}, retries=0,
                   delivery_info={"exchange": "", "routing_key": "work-q", "priority": 3},
                   root_id="root-1", parent_id="parent-1", group_id=None, chord=None, chain=None,
                   link=None, link_error=None, **extra)


def _queued(app: Any, queue: str) -> List[Any]:
    out = []
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue)
        while True:
            try:
                message = q.get(block=False)
            except q.Empty:
                break
            out.append(message)
            message.ack()
        q.close()
    return out


def test_the_payload_keeps_the_call_and_its_routing(app):
    task = app.tasks["unit.work"]
    headers = {HEADER_DEFERRALS: 2, "tuning_rl_slot": {"limiter": "api", "at": 1.0}}
    text = encode_payload(task, _request(headers=headers), headers, "rate_limit", "api")
    assert "pickle" not in text
    data = decode_payload(text)
    assert data["task"] == "unit.work" and list(data["args"]) == [1] and data["kwargs"] == {"y": 2}
    options = data["options"]
    assert options["task_id"] == "t-1" and options["root_id"] == "root-1" and options["parent_id"] == "parent-1"
    assert options["queue"] == "work-q" and options["priority"] == 3
    assert options["headers"] == headers
    assert not {"v", "reason", "name", "parked_at"} & set(data)


def test_a_call_that_is_not_json_cannot_be_parked(app):
    task = app.tasks["unit.work"]
    request = _request()
    request.args = (object(),)
    with pytest.raises(TypeError):
        encode_payload(task, request, {}, "rate_limit", "api")


def test_the_guard_drops_a_stale_duplicate_and_runs_the_current_copy(app, store):
    task = app.tasks["unit.work"]
    store.park(SPOT, "t-1:1", "{}", 0)
    first = store.claim(SPOT, 10, 1)[0]          # a mover claims (pub 1), publishes, dies
    store.clock = lambda: MemoryParkStore().clock() + 10  # its claim expires
    second = store.claim(SPOT, 10, 1_000_000)[0]  # the next mover publishes it again (pub 2)
    assert (first.pub, second.pub) == (1, 2)
    stale = {HEADER_PARK: {"id": "t-1:1", "pub": 1, "r": SPOT.reason, "n": SPOT.name}}
    current = {HEADER_PARK: {"id": "t-1:1", "pub": 2, "r": SPOT.reason, "n": SPOT.name}}
    with pytest.raises(Ignore):
        guard(task, _request(headers=stale))
    guard(task, _request(headers=current))       # runs
    guard(task, _request(headers=current))       # the same copy redelivered by the broker: runs
    guard(task, _request())                      # not parked: nothing to check


def test_the_mover_publishes_due_entries_with_their_ticket_and_acks_them(app, store):
    task = app.tasks["unit.work"]
    unparked: List[Any] = []

    def seen(reason: str, name: str) -> None:
        unparked.append((reason, name))

    events.TASK_UNPARKED.subscribe(seen)
    try:
        for i in range(3):
            headers: Dict[str, Any] = {HEADER_DEFERRALS: 1}
            request = _request(task_id=f"t-{i}", headers=headers)
            store.park(SPOT, f"t-{i}:1", encode_payload(task, request, headers, "rate_limit", "api"), 0)
        store.park(SPOT, "later:1", encode_payload(task, _request("later"), {}, "rate_limit", "api"), 60_000_000)
        mover = Mover(app, store)
        done = mover.run_once()
    finally:
        events.TASK_UNPARKED.unsubscribe(seen)
    assert done.published == 3 and unparked == [("rate_limit", "api")] * 3
    assert 0 < done.sleep <= mover.busy_sleep  # something is still parked
    messages = _queued(app, "work-q")
    assert sorted(m.headers["id"] for m in messages) == ["t-0", "t-1", "t-2"]
    for m in messages:
        assert m.headers[HEADER_PARK]["pub"] == 1 and m.headers[HEADER_PARK]["r"] == "rate_limit"
        assert m.headers[HEADER_DEFERRALS] == 1
    [row] = parked_snapshot(store)
    assert (row.reason, row.name, row.due, row.claimed, row.parked) == ("rate_limit", "api", 1, 0, 1)
    assert 59 < row.next_due_in <= 60


def test_the_mover_wakes_concurrency_waiters_in_fifo_order(app, store):
    task = app.tasks["unit.work"]
    spot = Spot("concurrency", "solo")
    for i, seq in ((0, 30), (1, 10), (2, 20)):
        store.park(spot, f"w{i}:1", encode_payload(task, _request(f"w{i}"), {}, "concurrency", "solo"), None, seq)
    # The limit's tasks can stand by (acks_late, no time limit: noted when they are bound).
    runtime_for(app).registry.note_standby("solo", True)
    mover = Mover(app, store)
    # A cap of 1, no lease held: the first waiter, and the next one to hold on as the standby.
    assert mover.run_once().published == 2
    assert [m.headers["id"] for m in _queued(app, "work-q")] == ["w1", "w2"]
    assert mover.run_once().published == 0           # both on their way: they fill cap + 1
    assert store.redeem(spot, "w1:1", 1)             # w1 arrived (and ended: no lease in this store)
    assert mover.run_once().published == 1
    assert [m.headers["id"] for m in _queued(app, "work-q")] == ["w0"]


def test_without_standby_the_mover_wakes_one_waiter_per_free_slot(app):
    app.conf.tuning_concurrency_standby = 0
    store = MemoryParkStore()
    runtime_for(app).registry.use_park_store(store)
    task = app.tasks["unit.work"]
    spot = Spot("concurrency", "solo")
    for i in range(2):
        store.park(spot, f"w{i}:1", encode_payload(task, _request(f"w{i}"), {}, "concurrency", "solo"), None, i)
    mover = Mover(app, store)
    assert mover.run_once().published == 1
    assert mover.run_once().published == 0           # w0 is on its way
    assert [m.headers["id"] for m in _queued(app, "work-q")] == ["w0"]


def test_an_idle_mover_sleeps_longer(app, store):
    assert Mover(app, store).run_once() == (0, 0.1)


def test_a_mover_counts_what_is_parked_for_the_gauge_only_while_someone_listens(app, store):
    store.park(SPOT, "t-9:0:1", "{}", 60_000_000)
    store.park(SPOT, "t-10:0:1", "{}", 60_000_000)
    counts: List[Any] = []

    def seen(reason: str, name: str, parked: int) -> None:
        counts.append((reason, name, parked))

    mover = Mover(app, store)
    mover.run_once()
    assert counts == []
    events.PARKED_COUNT.subscribe(seen)
    try:
        mover._counted_at = -1e9
        mover.run_once()
    finally:
        events.PARKED_COUNT.unsubscribe(seen)
    assert counts == [("rate_limit", "api", 2)]


def test_a_mover_leaves_the_spots_of_other_apps_alone(app, store):
    # Another app on the same tuning Redis may publish through another broker: its entries are its
    # own movers' to publish.
    store.park(Spot("rate_limit", "someone-elses"), "x:0:1", "{}", 0)
    store.park(SPOT, "t-11:0:1", encode_payload(app.tasks["unit.work"], _request("t-11"), {}, "rate_limit", "api"), 0)
    mover = Mover(app, store)
    assert mover.spots() == [SPOT]
    assert mover.run_once().published == 1
    assert store.snapshot(Spot("rate_limit", "someone-elses")).due == 1
    assert len(_queued(app, "work-q")) == 1  # (and leaves the in-memory broker's queue empty)


class _DownStore(MemoryParkStore):
    def park(self, *args: Any, **kwargs: Any) -> bool:
        from celery_tuning.errors import StorageError

        raise StorageError("tuning Redis down")


@pytest.mark.parametrize(("why", "arg", "serializer"), [
    ("storage", 1, "json"),
    ("serializer", (1, {2: "b"}), "pickle"),  # would come back as [1, {"2": "b"}]: not parked at all
])
def test_deferral_falls_back_to_a_countdown_logged_once(app, why, arg, serializer, caplog):
    from celery_tuning.integration.deferral import ParkRequest, defer

    store = _DownStore() if why == "storage" else MemoryParkStore()
    app.conf.task_serializer = serializer
    app.conf.accept_content = ["json", "pickle"]
    runtime_for(app).registry.use_park_store(store)
    task = app.tasks["unit.work"]
    fallbacks: List[Any] = []

    def seen(reason: str, what: str) -> None:
        fallbacks.append((reason, what))

    events.PARK_FALLBACK.subscribe(seen)
    caplog.set_level("WARNING", logger="celery_tuning.parking")
    try:
        for i in range(2):
            request = _request(f"fb-{why}-{i}")
            request.args = (arg,)
            task.push_request(**vars(request))
            try:
                with pytest.raises(Ignore, match="deferred by celery-tuning"):
                    defer(task, 5.0, reason="rate_limit", max_deferrals=3, on_exhausted=RuntimeError,
                          park=ParkRequest(SPOT, 5.0))
            finally:
                task.pop_request()
    finally:
        events.PARK_FALLBACK.unsubscribe(seen)
    assert fallbacks == [("rate_limit", why)] * 2
    assert len([r for r in caplog.records if "countdown" in r.getMessage()]) == 1
    assert store.snapshot(SPOT).due == 0
    messages = _queued(app, "work-q")  # deferred with a countdown instead
    assert len(messages) == 2 and all(m.headers["eta"] for m in messages)


def _call(args: Any = (), kwargs: Any = None, **more: Any) -> Context:
    return Context(id="t", args=args, kwargs=kwargs or {}, **more)


@pytest.mark.parametrize("value", [
    [1, "a", {"k": [True, None, 2.5]}],
    __import__("datetime").datetime(2026, 12, 1, 12, 0),
    __import__("uuid").UUID(int=7),
    __import__("decimal").Decimal("1.5"),
])
def test_arguments_a_json_message_can_hold_park_as_they_are(value: Any) -> None:
    from celery_tuning.integration.deferral import _survives_json

    assert _survives_json(_call([value], {"k": value}))


@pytest.mark.parametrize("value", [
    (7, (8,)),                                   # tuples
    {2: "b"},                                    # int keys
    __import__("enum").IntEnum("E", "A").A,      # an enum that is an int
    __import__("collections").OrderedDict(a=1),  # a dict subclass
    __import__("collections").defaultdict(int, a=1),
    __import__("datetime").datetime(2026, 12, 1, tzinfo=__import__("zoneinfo").ZoneInfo("Europe/Paris")),
    {1, 2},
])
def test_arguments_json_would_change_are_not_parked(value: Any) -> None:
    """A call sent with serializer="pickle": parked (as JSON) it came back with other types."""
    from celery_tuning.integration.deferral import _survives_json

    assert not _survives_json(_call([value]))
    assert not _survives_json(_call([], {"v": value}))


def test_the_chain_and_links_of_a_call_are_checked_too() -> None:
    """A chain's later step lost its tuples when the first step was deferred (review)."""
    from celery_tuning.integration.deferral import _survives_json

    step = {"task": "echo", "args": [(7, (8,))], "kwargs": {}, "options": {}}
    assert not _survives_json(_call(["x"], chain=[step]))
    assert not _survives_json(_call(["x"], callbacks=[step]))
    assert not _survives_json(_call(["x"], errbacks=[step]))
    assert _survives_json(_call(["x"], chain=[{**step, "args": [[7, [8]]]}]))


def test_only_an_acks_late_task_without_a_time_limit_may_stand_by():
    """The standby is a running attempt: without acks_late a worker dying while it waits loses a
    task that never ran; under a time limit the wait counts against the limit (review of #17)."""
    from types import SimpleNamespace

    from celery import Celery

    from celery_tuning.integration.steps.concurrency import _may_stand_by

    app = Celery("standby_rules", broker="memory://", set_as_current=False)

    def task(**options):
        return SimpleNamespace(_app=app, acks_late=options.get("acks_late", False),
                               time_limit=options.get("time_limit"), soft_time_limit=options.get("soft_time_limit"))

    free = SimpleNamespace(timelimit=(None, None))
    assert _may_stand_by(task(acks_late=True), free)
    assert not _may_stand_by(task(), free)  # acked early: a crash while waiting would lose it
    assert not _may_stand_by(task(acks_late=True, soft_time_limit=3), free)
    assert not _may_stand_by(task(acks_late=True, time_limit=4), free)
    assert not _may_stand_by(task(acks_late=True), SimpleNamespace(timelimit=(4, None)))  # per call
    app.conf.task_soft_time_limit = 30
    assert not _may_stand_by(task(acks_late=True), free)


def test_a_redelivered_copy_whose_attempt_parked_again_is_dropped(app, store):
    """acks_late: a mover-published copy parks again (its next deferral) and its worker dies before
    acking; the broker redelivers the same publication. Its re-parked entry owns the run (review
    of #17: both ran)."""
    task = app.tasks["unit.work"]
    store.park(SPOT, "t-1:0:1", "{}", 0)
    [entry] = store.claim(SPOT, 10, 1_000_000)
    assert store.ack(SPOT, entry.park_id, entry.pub)
    headers = {HEADER_PARK: {"id": "t-1:0:1", "pub": entry.pub, "r": SPOT.reason, "n": SPOT.name},
               "tuning_deferrals": 1}

    def delivery(redelivered: bool) -> Context:
        request = _request(headers=dict(headers))
        request.delivery_info = {"exchange": "", "routing_key": "work-q", "redelivered": redelivered}
        return request

    guard(task, delivery(False), [SPOT])          # the first delivery runs
    guard(task, delivery(True), [SPOT])           # redelivered, nothing parked again: runs
    store.park(SPOT, "t-1:0:2", "{}", 0)          # that attempt parked the call again, then died
    with pytest.raises(Ignore, match="redelivered original"):
        guard(task, delivery(True), [SPOT])


def test_a_new_call_reusing_the_task_id_of_one_that_ran_parks_under_its_own_id(app, store):
    """apply_async(task_id='report-2026-12-02') sent again after the first one parked and ran: its
    deferral must not be taken for a redelivery of the first (review of #17: it was dropped)."""
    from celery_tuning.integration.deferral import ParkRequest, defer

    task = app.tasks["unit.work"]
    store.park(SPOT, "report:0:1", "{}", 0)
    [entry] = store.claim(SPOT, 10, 1_000_000)
    assert store.ack(SPOT, entry.park_id, entry.pub) and store.redeem(SPOT, entry.park_id, entry.pub)  # it ran
    for redelivered, parked in ((False, 1), (True, 1)):  # a redelivery of a call that ran is dropped
        request = _request("report")
        request.delivery_info = {"exchange": "", "routing_key": "work-q", "redelivered": redelivered}
        task.push_request(**vars(request))
        try:
            with pytest.raises(Ignore):
                defer(task, 5.0, reason="rate_limit", max_deferrals=3, on_exhausted=RuntimeError,
                      park=ParkRequest(SPOT, 5.0))
        finally:
            task.pop_request()
        assert store.snapshot(SPOT).due == parked


def test_a_redelivered_original_of_a_per_key_limit_is_checked_at_its_keys_spot(app, store):
    """A per-key concurrency limit parks at the spot of the call's key, which its arguments decide:
    the redelivery guard asks the step for that spot (it had none to check before)."""
    from celery_tuning import TunedTask, concurrency_limit
    from celery_tuning.integration.pipeline import CallContext, _guarded

    @app.task(bind=True, name="unit.per_tenant", shared=False, base=TunedTask)
    @concurrency_limit("solo", key=lambda tenant: tenant)
    def per_tenant(self: Any, tenant: str) -> str:
        return tenant

    task = app.tasks["unit.per_tenant"]
    steps = type(task)._tuning_steps
    [step] = [s for s in steps if s.kind == "concurrency"]
    assert step.park_spot() is None  # the arguments decide it
    where = step.park_spot_for(CallContext(task, ("acme",), {}))
    assert where is not None and where.name.startswith("solo:k:") and where != step.park_spot_for(
        CallContext(task, ("other",), {}))
    store.park(where, "t-1:0:1", "{}", None)  # this attempt parked at acme's spot, then its worker died
    request = _request()
    request.delivery_info = {"exchange": "", "routing_key": "work-q", "redelivered": True}
    request.args = ("acme",)
    task.push_request(**vars(request))
    try:
        with pytest.raises(Ignore, match="redelivered original"):
            _guarded(lambda ctx: "ran", steps)(CallContext(task, ("acme",), {}))
        assert _guarded(lambda ctx: "ran", steps)(CallContext(task, ("other",), {})) == "ran"
    finally:
        task.pop_request()


def test_per_key_spots_are_counted_under_their_limit_and_promoted_to_their_cap_alone(app, store):
    """Review findings: parked gauges and counters name the limit, never a caller key's spot; a
    per-key limit whose keys drained counts 0 (its spots left the index); a key's waiters are
    promoted to its cap, with no standby slot over it."""
    from celery_tuning.storage.keys import key_digest, keyed_spot_name

    task = app.tasks["unit.work"]
    app.conf.tuning_concurrency_standby = 10.0  # standbys on: a limit's own spot promotes cap + 1
    counted: List[Any] = []
    unparked: List[Any] = []

    def count(reason: str, name: str, parked: int) -> None:
        counted.append((reason, name, parked))

    def seen(reason: str, name: str) -> None:
        unparked.append((reason, name))

    tenants = {t: Spot("concurrency", keyed_spot_name("solo", key_digest(t))) for t in ("a", "b", "c")}
    for tenant, where in sorted(tenants.items()):
        for i in range(2 if tenant == "a" else 1):
            request = _request(task_id=f"{tenant}-{i}")
            store.park(where, f"{tenant}-{i}:0:1", encode_payload(task, request, {}, where.reason, where.name), None)
    events.PARKED_COUNT.subscribe(count)
    events.TASK_UNPARKED.subscribe(seen)
    try:
        mover = Mover(app, store)
        mover.count()
        assert counted == [("concurrency", "solo", 4)]
        done = mover.run_once()
        assert done.published == 3  # a's second waiter stays: cap 1, no standby slot over it
        assert unparked == [("concurrency", "solo")] * 3
        assert store.spots() == [tenants["a"]]
        for tenant in "bc":
            assert store.redeem(tenants[tenant], f"{tenant}-0:0:1", 1)
        store.purge(tenants["a"])
        assert store.spots() == []
        counted.clear()
        mover.count()
        assert counted == [("concurrency", "solo", 0)]  # not its last count
    finally:
        events.PARKED_COUNT.unsubscribe(count)
        events.TASK_UNPARKED.unsubscribe(seen)
    assert sorted(m.headers["id"] for m in _queued(app, "work-q")) == ["a-0", "b-0", "c-0"]
