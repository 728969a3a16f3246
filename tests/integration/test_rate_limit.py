"""Distributed rate limits against a real redis-server and real workers."""

import json
import multiprocessing
import random
import threading
import time

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

import celery_tuning
from celery_tuning import ConfigurationError, RateLimited, TunedTask, rate_limit
from celery_tuning.integration.registry import limiter_for
from celery_tuning.integration.runtime import runtime_for
from tests.support.apps import make_app, run_producer, worker_env
from tests.support.hammer import hammer
from tests.support.workers import running_workers

pytestmark = pytest.mark.integration



@pytest.mark.slow
def test_four_processes_share_one_bucket(redis_clean):
    """4 processes sharing 50/s burst 5 for 6 s admit 305 +- 2 %, no 1 s window over 55."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 2.0  # spawn start-up happens before the clock starts
    procs = [ctx.Process(target=hammer, args=(redis_clean.db_url(1), 6.0, queue, start_at)) for _ in range(4)]
    for p in procs:
        p.start()
    times = sorted(t for _ in procs for t in queue.get(timeout=60))
    for p in procs:
        p.join(timeout=10)
    assert 305 * 0.98 <= len(times) <= 305 * 1.02, len(times)
    worst, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] > 1.0:
            j += 1
        worst = max(worst, i - j + 1)
    assert worst <= 55, worst




@pytest.mark.slow
def test_two_prefork_workers_respect_a_shared_limit_without_using_retries(redis_clean):
    """40 tasks at 10/s burst 2 across 2 prefork workers x 2: >= 3.4 s, each exactly once, max_retries=0.

    Pinned to countdown deferrals: the pacing window below holds ETA messages run on their slot
    (parked tasks come back through the queue; tests/integration/test_parking.py paces those)."""
    env = {**worker_env(redis_clean), "TEST_DEFER_VIA": "countdown"}
    with running_workers("tests.apps.limited:app", env, concurrency=2, prefix="w"):
        code = (
            "import time, json\n"
            "from tests.apps.limited import limited\n"
            "start = time.time()\n"
            "results = [limited.delay(i) for i in range(40)]\n"
            "values = [r.get(timeout=60) for r in results]\n"
            "print(json.dumps({'elapsed': time.time() - start, 'values': values,"
            " 'ids': [r.id for r in results], 'states': [r.state for r in results]}))\n"
        )
        data = json.loads(run_producer(code, redis_clean).splitlines()[-1])
    assert data["elapsed"] >= 3.4, data["elapsed"]
    assert [v["i"] for v in data["values"]] == list(range(40))
    assert all(v["retries"] == 0 for v in data["values"])
    assert any(v["deferrals"] > 0 for v in data["values"]), "expected some tasks to be deferred"
    assert set(data["states"]) == {"SUCCESS"}
    runs = redis_clean.client(1).hgetall("runs")
    assert len(runs) == 40 and set(runs.values()) == {b"1"}, runs
    times = sorted(float(t) for t in redis_clean.client(1).lrange("run_times", 0, -1))
    # the bucket admits 2 at once then one per 100 ms: 40 runs span at least 3.7 s (- jitter)
    assert times[-1] - times[0] >= 3.6
    # deferred tasks come back on their reserved slots, not as a herd (a herd puts ~38 in one second):
    # the documented bound for calls back late (a loaded machine runs ETA messages late) is
    # burst + rate x (t + tuning_rate_limit_slot_grace) over any t seconds: 2 + 10 x (1 + 1) for t = 1
    worst, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] > 1.0:
            j += 1
        worst = max(worst, i - j + 1)
    assert worst <= 22, worst


@pytest.mark.slow
def test_throttled_pauses_the_limiter_for_every_worker(redis_clean):
    with running_workers("tests.apps.limited:app", worker_env(redis_clean), concurrency=2, prefix="t"):
        code = (
            "import time, json\n"
            "from tests.apps.limited import flaky_api\n"
            "start = time.time()\n"
            "rs = [flaky_api.delay(i) for i in range(6)]\n"
            "print(json.dumps({'start': start, 'values': [r.get(timeout=60) for r in rs]}))\n"
        )
        data = json.loads(run_producer(code, redis_clean).splitlines()[-1])
    assert data["values"] == list(range(6))
    ok_times = sorted(float(t) for t in redis_clean.client(1).lrange("api_ok_times", 0, -1))
    assert len(ok_times) == 6
    # every first call was throttled with retry_after=1 s: nothing succeeds before the pause ends
    assert ok_times[0] - data["start"] >= 0.95
    calls = redis_clean.client(1).hgetall("api_calls")
    assert set(calls.values()) == {b"2"}, calls


def test_per_key_limits_isolate_tenants(redis_clean):
    app = make_app(redis_clean, "perkey")
    done = {}

    @app.task(base=TunedTask, bind=True)
    @rate_limit("5/s", key=lambda tenant, i: tenant)
    def work(self, tenant, i):
        done.setdefault(tenant, []).append(time.time())
        return i

    with start_worker(app, pool="threads", concurrency=6, perform_ping_check=False, shutdown_timeout=10):
        start = time.time()
        flood = [work.delay("noisy", i) for i in range(12)]
        time.sleep(0.1)
        quiet = work.delay("quiet", 0)
        quiet.get(timeout=10)
        quiet_latency = time.time() - start
        [r.get(timeout=20) for r in flood]
        noisy_span = max(done["noisy"]) - min(done["noisy"])
    assert quiet_latency < 1.0, quiet_latency
    assert noisy_span >= 11 * 0.2 * 0.9, noisy_span
    keys = [k.decode() for k in redis_clean.client(1).keys("tuning:rl:*")]
    assert all("noisy" not in k and "quiet" not in k for k in keys), "raw keys must not reach Redis"


def test_on_limit_raise_and_eager_wait(redis_clean):
    app = make_app(redis_clean, "raising")

    @app.task(base=TunedTask)
    @rate_limit("1/m", on_limit="raise")
    def once_a_minute():
        return "ran"

    @app.task(base=TunedTask)
    @rate_limit("20/s")
    def quick():
        return time.monotonic()

    assert once_a_minute.apply().get() == "ran"
    with pytest.raises(RateLimited) as info:
        once_a_minute.apply().get()
    assert 55 < info.value.retry_after <= 60
    # eager: no broker to defer through, so the caller waits its turn
    stamps = [quick.apply().get() for _ in range(4)]
    assert stamps[-1] - stamps[0] >= 3 * 0.05 * 0.9


def test_unknown_named_limiter_is_a_bind_time_error(redis_clean):
    app = make_app(redis_clean, "unknown", tuning_rate_limits={"openai": "20/s"})

    @app.task(base=TunedTask, name="uses_missing", shared=False)  # shared tasks bind to every later app
    @rate_limit("opneai")
    def f():
        pass

    with pytest.raises(ConfigurationError, match=r"task 'uses_missing': @rate_limit\('opneai'\): no such limiter"):
        f.run  # noqa: B018 - binding happens on first access


def test_visibility_timeout_warning(redis_clean):
    # Only countdown deferrals are broker messages held past their visibility timeout.
    app = make_app(redis_clean, "vis", broker_transport_options={"visibility_timeout": 60},
                   tuning_defer_via="countdown")

    @app.task(base=TunedTask, name="long_defer", shared=False)
    @rate_limit("1/h", max_defer=120)
    def f():
        pass

    with pytest.warns(UserWarning, match="visibility_timeout"):
        f.run  # noqa: B018


def test_no_visibility_timeout_warning_when_deferrals_park(redis_clean):
    import warnings

    app = make_app(redis_clean, "vis-park", broker_transport_options={"visibility_timeout": 60})

    @app.task(base=TunedTask, name="long_park", shared=False)
    @rate_limit("1/h", max_defer=120)
    def f():
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f.run  # noqa: B018


def test_limiter_around_single_calls(redis_clean):
    app = make_app(redis_clean, "single", tuning_rate_limits={"openai": {"rate": "10/s", "burst": 2}})
    lim = celery_tuning.limiter("openai", app=app)
    assert lim is celery_tuning.limiter("openai", app=app)
    assert lim.try_acquire() and lim.try_acquire()
    assert not lim.try_acquire()
    waited = lim.acquire(timeout=1)
    assert 0.05 < waited <= 0.1
    lim.throttle(5)
    with pytest.raises(RateLimited):
        lim.acquire(timeout=1)
    with pytest.raises(ConfigurationError, match="no such limiter .nope. in tuning_rate_limits"):
        celery_tuning.limiter("nope", app=app)


def test_charges_of_random_sizes_hold_the_total_within_2_percent(redis_clean):
    """Issue #18 (1,000 units/min, scaled to 1,000 units/s for 3 s): 4 threads each acquire a random
    cost, then charge a random size without waiting. Every unit acquired or charged fits
    burst + rate x (time until the debt is paid) within +-2 %, the charged ones included."""
    app = make_app(redis_clean, "charges", tuning_rate_limits={"tokens": {"rate": "1000/s", "burst": 20}})
    lim = celery_tuning.limiter("tokens", app=app)
    clock = {"deadline": 0.0}
    barrier = threading.Barrier(5)
    acquired, charged = [], []

    def spend(seed):
        rnd, got, owed = random.Random(seed), 0, 0
        barrier.wait()
        while time.monotonic() < clock["deadline"]:
            cost = rnd.randint(1, 10)
            lim.acquire(cost=cost)  # waits for its slot, and behind every charge before it
            got += cost
            n = rnd.randint(1, 40)  # "tokens used", known after the call
            lim.charge(n)
            owed += n
        acquired.append(got)
        charged.append(owed)

    threads = [threading.Thread(target=spend, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    start = time.monotonic()
    clock["deadline"] = start + 3.0
    barrier.wait()
    for t in threads:
        t.join(timeout=30)
    paid_at = time.monotonic() + lim.decide(1, reserve=86_400.0).wait  # one more unit, once the debt is paid
    units = sum(acquired) + sum(charged) + 1
    expected = 20 + 1000 * (paid_at - start)
    assert 0.98 * expected <= units <= 1.02 * expected, (units, expected)
    assert sum(charged) > 2 * sum(acquired), "most units were charged after the fact, and still held"


def test_redis_restart_and_outage_follow_the_policy(fault_redis):
    events = []
    app = Celery("outage", set_as_current=False)
    app.conf.update(tuning_redis_url=fault_redis.db_url(1), tuning_rate_limits={"x": {"rate": "100/s", "burst": 5}},
                    tuning_redis_socket_timeout=0.2, tuning_redis_connect_timeout=0.2)
    lim = limiter_for(runtime_for(app), "x")
    lim.observer = lambda event, name, seconds: events.append(event)
    assert sum(lim.try_acquire() for _ in range(10)) == 5
    fault_redis.restart()  # empty: scripts gone (NOSCRIPT), bucket gone
    assert sum(lim.try_acquire() for _ in range(10)) == 5
    fault_redis.stop()
    start = time.monotonic()
    local = sum(lim.try_acquire() for _ in range(10))  # in-process bucket at the same rate
    assert local == 5
    assert "fallback" in events
    assert time.monotonic() - start < 5
    fault_redis.start()
    time.sleep(0.1)
    assert lim.decide().source == "redis"


def test_allow_and_deny_policies(fault_redis):
    for policy, expect in (("allow", True), ("deny", False)):
        app = Celery(f"p-{policy}", set_as_current=False)
        app.conf.update(tuning_redis_url=fault_redis.db_url(1), tuning_rate_limits={"x": "1/m"},
                        tuning_rate_limit_on_redis_error=policy, tuning_redis_connect_timeout=0.2)
        lim = limiter_for(runtime_for(app), "x")
        fault_redis.stop()
        try:
            decisions = [lim.decide() for _ in range(3)]
        finally:
            fault_redis.start()
        assert [d.allowed for d in decisions] == [expect] * 3
        assert {d.source for d in decisions} == {policy}


def test_tasks_survive_tuning_redis_outage(redis_clean, fault_redis):
    """Broker on one redis-server, tuning state on another that restarts, then stops for 2 s."""
    app = make_app(redis_clean, "outage_tasks", tuning_url=fault_redis.db_url(1),
                   tuning_redis_socket_timeout=0.2, tuning_redis_connect_timeout=0.2)
    ran = []

    @app.task(base=TunedTask, bind=True, max_retries=0, shared=False)
    @rate_limit("40/s", burst=2)
    def step(self, i):
        ran.append((i, self.request.id))
        return i

    events = []

    def on_event(sender=None, event=None, **_):
        events.append(event)

    celery_tuning.signals.limiter_event.connect(on_event)
    try:
        with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=10):
            first = [step.delay(i) for i in range(20)]
            time.sleep(0.2)
            fault_redis.restart()  # scripts and buckets gone
            second = [step.delay(i) for i in range(20, 40)]
            time.sleep(0.2)
            fault_redis.stop()
            third = [step.delay(i) for i in range(40, 60)]
            time.sleep(2.0)
            fault_redis.start()
            fourth = [step.delay(i) for i in range(60, 80)]
            values = [r.get(timeout=30) for r in first + second + third + fourth]
    finally:
        celery_tuning.signals.limiter_event.disconnect(on_event)
    assert values == list(range(80))
    ids = [task_id for _, task_id in ran]
    assert len(ids) == len(set(ids)) == 80, "every task ran exactly once"
    assert "fallback" in events and "acquired" in events


def test_deferral_budget_is_separate_and_capped(redis_clean):
    app = make_app(redis_clean, "budget")
    deferred = []

    def on_deferred(sender=None, **kw):
        deferred.append(kw["deferrals"])

    @app.task(base=TunedTask, bind=True, max_retries=5, shared=False)
    @rate_limit("1/m", on_limit="defer", max_deferrals=0)
    def scarce(self):
        return self.request.retries

    celery_tuning.signals.task_deferred.connect(on_deferred)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            assert scarce.delay().get(timeout=10) == 0
            second = scarce.delay()
            with pytest.raises(RateLimited, match="gave up after 0 deferrals"):
                second.get(timeout=10)
    finally:
        celery_tuning.signals.task_deferred.disconnect(on_deferred)
    assert deferred == []


def test_adaptive_limiter_slows_down_on_throttling_and_recovers(redis_clean):
    app = make_app(redis_clean, "adaptive", tuning_rate_limits={"llm": {"rate": "10/s", "adaptive": True}})
    lim = celery_tuning.limiter("llm", app=app)
    assert lim.adaptive is not None
    assert lim.try_acquire()
    first_gap = lim.decide().wait
    assert 0.09 <= first_gap <= 0.1
    lim.throttle(0.0)  # an HTTP 429 with no Retry-After: halve the shared rate
    time.sleep(0.25)
    assert lim.try_acquire()
    slowed_gap = lim.decide().wait
    assert 0.18 <= slowed_gap <= 0.2, slowed_gap


def test_calls_back_later_than_the_grace_keep_their_slot_but_take_turns_at_the_rate(redis_clean):
    """A deferred task that queued behind a backlog past its slot (later than
    ``tuning_rate_limit_slot_grace``) still runs in it, but the late ones take turns at the
    limiter's rate: every task deferred behind the same backlog comes back late together, and
    running each at once ran them back to back, 6x the rate in issue #17's burst benchmark."""
    from celery.app.trace import build_tracer

    from celery_tuning import signals
    from celery_tuning.integration.deferral import HEADER_DEFERRALS
    from celery_tuning.integration.slots import HEADER_SLOT

    app = make_app(redis_clean, "grace", tuning_defer_via="countdown",  # would defer through the broker
                   tuning_rate_limits={"late": {"rate": "10/s", "burst": 1}}, tuning_rate_limit_slot_grace=1.0)
    ran = []

    @app.task(bind=True, shared=False, name="grace.task")
    @rate_limit("late", on_limit="defer", max_wait=0.0)
    def task(self, x):
        ran.append((x, time.monotonic()))
        return x

    assert limiter_for(runtime_for(app), "late").try_acquire()  # spent: only a slot admits now
    events = []

    def on_event(sender=None, event=None, seconds=None, **_):
        events.append((sender, event))

    def deliver(n, late):
        slot = {"limiter": "late", "key": None, "at": time.time() - late, "id": f"late-{n}"}
        request = {"id": f"late-{n}", "task": task.name, "delivery_info": {"routing_key": "celery", "exchange": ""},
                   "hostname": "t@host", "headers": {HEADER_SLOT: slot, HEADER_DEFERRALS: 1}, HEADER_DEFERRALS: 1}
        build_tracer(task.name, task, app=app, eager=False)(f"late-{n}", (n,), {}, request)

    signals.limiter_event.connect(on_event, weak=False)
    try:
        deliver(0, 0.5)  # within the grace: runs in its slot at once
        assert [x for x, _ in ran] == [0] and events == []
        for n in range(1, 7):  # six back from one backlog, 5 s late: one every 0.1 s
            deliver(n, 5.0)
    finally:
        signals.limiter_event.disconnect(on_event)
    assert [x for x, _ in ran] == list(range(7)), "a call holding a slot did not run"
    assert redis_clean.client(0).llen("celery") == 0, "a call holding a slot was deferred again"
    assert events.count(("late", "slot_expired")) == 6
    late = [t for x, t in ran if x]
    assert late[-1] - late[0] >= 0.4, f"late calls ran back to back: {late}"  # 5 turns of 0.1 s


@pytest.mark.parametrize("defer_via", ["countdown", "park"])
def test_a_deferred_attempt_leaves_no_reference_cycle_behind(redis_clean, defer_via):
    """Every deferral ends its attempt with Ignore, and Celery's tracer frame and the exception's
    traceback then hold each other: ~2,400 objects (~80 KiB) per deferral until a full collection,
    which grew a deferring worker's pool children from 44 to ~160 MB. Nothing may be left for the
    cycle collector."""
    import gc

    from celery.app.trace import build_tracer

    app = make_app(redis_clean, f"cycle-{defer_via}", tuning_defer_via=defer_via,
                   tuning_rate_limits={"spent": {"rate": "1/m", "burst": 1}})

    @app.task(bind=True, shared=False, name=f"cycle.{defer_via}")
    @rate_limit("spent", on_limit="defer")
    def task(self, x):
        return x

    assert limiter_for(runtime_for(app), "spent").try_acquire()
    tracer = build_tracer(task.name, task, app=app, eager=False)

    def attempt(n):
        request = {"id": f"cycle-{n}", "task": task.name, "delivery_info": {"routing_key": "celery", "exchange": ""},
                   "hostname": "t@host", "headers": None}
        info = tracer(f"cycle-{n}", (n,), {}, request)[1]
        assert info.state == "IGNORED"  # deferred

    attempt(0)  # first use: imports, scripts, connections
    gc.collect()
    gc.disable()
    try:
        for n in range(1, 11):
            attempt(n)
        left = gc.collect()
    finally:
        gc.enable()
    # Each left ~3,400 (34,000 for ten); the bound leaves room for what other threads of a busy
    # test process drop meanwhile (a few hundred).
    assert left < 3000, f"{left} objects were left for the cycle collector by 10 deferrals"


def test_late_calls_beyond_what_the_rate_lets_through_in_the_grace_are_deferred_to_their_turn(redis_clean):
    """Sleeping at most the grace and then running let late calls through at processes / grace
    (a review saw 14/s against a 2/s limit with 16 processes): a turn further away is deferred to,
    holding it as its slot."""
    from celery.app.trace import build_tracer

    from celery_tuning.integration.deferral import HEADER_DEFERRALS
    from celery_tuning.integration.slots import HEADER_SLOT

    app = make_app(redis_clean, "grace-defer", tuning_defer_via="countdown",  # reads the broker's message
                   tuning_rate_limits={"slow": {"rate": "1/s", "burst": 1}}, tuning_rate_limit_slot_grace=1.0)
    ran = []

    @app.task(bind=True, shared=False, name="grace.slow")
    @rate_limit("slow", on_limit="defer", max_wait=0.0)
    def task(self, x):
        ran.append(x)
        return x

    import threading

    tracer = build_tracer(task.name, task, app=app, eager=False)

    def deliver(n):
        slot = {"limiter": "slow", "key": None, "at": time.time() - 5.0, "id": f"slow-{n}"}
        request = {"id": f"slow-{n}", "task": task.name, "delivery_info": {"routing_key": "celery", "exchange": ""},
                   "hostname": "t@host", "headers": {HEADER_SLOT: slot, HEADER_DEFERRALS: 1}, HEADER_DEFERRALS: 1}
        tracer(f"slow-{n}", (n,), {}, request)

    # four processes' worth, back from one backlog 5 s late at once: turns now, +1 s, +2 s, +3 s
    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ran) == 2, f"late calls ran beyond their turns: {ran}"
    again = [json.loads(raw)["headers"] for raw in redis_clean.client(0).lrange("celery", 0, -1)]
    assert len(again) == 2 and {h["id"] for h in again} == {f"slow-{n}" for n in range(4)} - {f"slow-{n}" for n in ran}
    turns = sorted(h[HEADER_SLOT]["at"] - time.time() for h in again)
    assert 0.0 < turns[0] < turns[1] and turns[1] - turns[0] >= 0.9, turns  # one turn per second


def test_a_deferral_reaches_celery_without_the_pipelines_frames(redis_clean):
    """Celery builds two ExceptionInfo for every Ignore and each formats the whole traceback: with
    the nine frames of the pipeline that was three quarters of a parked attempt's CPU."""
    import traceback

    from celery.exceptions import Ignore

    app = make_app(redis_clean, "frames", tuning_rate_limits={"spent": {"rate": "1/m", "burst": 1}})

    @app.task(bind=True, shared=False, name="frames.task")
    @rate_limit("spent", on_limit="defer")
    def task(self, x):
        return x

    assert limiter_for(runtime_for(app), "spent").try_acquire()
    task.push_request(id="frames-1", delivery_info={"routing_key": "celery", "exchange": ""}, hostname="t@host",
                      headers=None, is_eager=False, called_directly=False)
    try:
        with pytest.raises(Ignore) as caught:
            task.run(7)
    finally:
        task.pop_request()
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(caught.value.__traceback__)]
    assert len(frames) <= 2, frames  # this test's frame and the task's run
    assert caught.value.__suppress_context__


def test_stacked_limits_admit_only_what_the_tightest_allows_and_refused_calls_spend_no_bucket(redis_clean):
    """Stacked 50/s burst 5 + 900/m burst 3 (30 per 2 s), 4 threads hammering for 2 s through Redis:
    3 + 15/s x 2 s admitted (the 30th slot falls on the end), and the looser bucket is all but full
    afterwards, though the calls refused (several hundred) would have emptied it many times over."""
    app = make_app(redis_clean, "stacked", tuning_rate_limits={"tight": {"rate": "900/m", "burst": 3}})

    @app.task(base=TunedTask, name="stacked.hammered", shared=False)
    @rate_limit("50/s", burst=5, on_limit="raise")
    @rate_limit("tight", on_limit="raise")
    def hammered():
        return True

    counts = {"admitted": 0, "refused": 0}
    lock = threading.Lock()
    hammered.apply().get()  # bind and warm up outside the window
    time.sleep(1.0)  # both buckets full again
    start = time.monotonic()
    stamps = []

    def hammer_it():
        while True:
            at = time.monotonic()
            if at >= start + 2.0:
                return
            try:
                hammered.apply().get()
                outcome = "admitted"
            except RateLimited:
                outcome = "refused"
            with lock:
                counts[outcome] += 1
                stamps.append(at)

    threads = [threading.Thread(target=hammer_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # From the first call, not from `start`: threads that start late on a loaded machine leave the
    # bucket full meanwhile, and a full bucket holds no more than its burst.
    span = max(stamps) - min(stamps)
    loose = limiter_for(runtime_for(app), "stacked.hammered").snapshot()
    most = 3 + 15 * span  # burst + rate x t
    # The upper bound is the property; the lower one only shows the tight bucket was not starved.
    # It is looser because `span` is read on this clock before each call while the script reads
    # Redis's clock inside it: a first call delayed 100 ms on a loaded CI host shortens the window
    # the script saw by one or two slots (CI admitted 31 of a computed 32.9).
    assert most - 3 <= counts["admitted"] <= most + 0.5, (counts, span)
    assert counts["admitted"] + counts["refused"] > 5 + 50 * span, "the looser bucket alone would have run dry"
    # Refused calls come every few ms, faster than the looser bucket refills (one token per 20 ms):
    # had they spent it, it would be empty. Admitted calls did spend it, and the last one or two may
    # have come within 20-40 ms of the snapshot on a loaded host (a run saw 3 of 5).
    assert loose.tokens >= 2, f"refused calls spent the looser bucket: {loose.tokens} of 5 tokens left"
