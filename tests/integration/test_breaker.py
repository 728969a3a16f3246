"""Shared circuit breakers against a real redis-server, real processes and real workers."""

import os
import subprocess
import sys
import threading
import time

import pybreaker
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

import celery_tuning
from celery_tuning import CircuitOpen, ConfigurationError, TunedTask, circuit_breaker
from celery_tuning.integration.registry import breaker_for
from celery_tuning.integration.runtime import runtime_for
from tests.support.apps import make_app
from tests.support.workers import ROOT

pytestmark = pytest.mark.integration




class Down(Exception):
    pass


def run_py(code, redis_server, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TEST_TUNING_URL": redis_server.db_url(1)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                         cwd=str(ROOT), env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


PROCESS_PRELUDE = (
    "import os, time\n"
    "from celery import Celery\n"
    "from celery_tuning.integration.registry import breaker_for\n"
    "from celery_tuning.integration.runtime import runtime_for\n"
    "app = Celery('p', set_as_current=False)\n"
    "app.conf.update(tuning_redis_url=os.environ['TEST_TUNING_URL'],"
    " tuning_circuit_breakers={'pay': {'fail_max': 3, 'reset_timeout': 2}})\n"
    "b = breaker_for(runtime_for(app), 'pay')\n"
)


def test_process_a_trips_process_b_fails_fast_then_a_trial_closes_it(redis_clean):
    # A reset timeout of 4 s: process B starts inside it even on a loaded host (Python and Celery's
    # imports took over a second there).
    prelude = PROCESS_PRELUDE.replace("'reset_timeout': 2", "'reset_timeout': 4")
    assert prelude != PROCESS_PRELUDE
    out = run_py(prelude + (
        "def down(): raise ConnectionError('payments down')\n"
        "errors = []\n"
        "for _ in range(3):\n"
        "    try: b.call(down)\n"
        "    except Exception as e: errors.append(type(e).__name__)\n"
        "print(','.join(errors), b.current_state)\n"
    ), redis_clean)
    assert out == "ConnectionError,ConnectionError,CircuitOpen open"
    time.sleep(0.5)
    out = run_py(prelude + (
        "ran = []\n"
        "try: b.call(lambda: ran.append(1))\n"
        "except Exception as e: print(type(e).__name__, isinstance(e, __import__('pybreaker').CircuitBreakerError))\n"
        "print(len(ran))\n"
        "time.sleep(b.remaining() + 0.05)\n"
        "print(b.call(lambda: 'trial ok'), b.current_state)\n"
    ), redis_clean)
    assert out.splitlines() == ["CircuitOpen True", "0", "trial ok closed"]


def test_open_state_reaches_another_process_within_a_second(redis_clean):
    app = make_app(redis_clean, "watcher", tuning_circuit_breakers={"pay": {"fail_max": 3, "reset_timeout": 30}})
    watcher = breaker_for(runtime_for(app), "pay")
    assert watcher.current_state == "closed"
    proc = subprocess.Popen([sys.executable, "-c", PROCESS_PRELUDE + "b.open()\nprint(time.time())\n"],
                            stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TEST_TUNING_URL": redis_clean.db_url(1)})
    opened_at = float(proc.communicate(timeout=60)[0].strip())
    while True:
        try:
            watcher.call(lambda: None)
        except CircuitOpen:
            seen = time.time()
            break
        assert time.time() - opened_at < 3, "open state never arrived"
        time.sleep(0.01)
    assert seen - opened_at <= 1.0, seen - opened_at


def test_closed_breaker_calls_run_concurrently_without_round_trips(redis_clean):
    app = make_app(redis_clean, "threads", tuning_circuit_breakers={"api": {"fail_max": 5}})
    b = celery_tuning.breaker("api", app=app)
    b.refresh()
    before = redis_clean.client(1).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    threads = [threading.Thread(target=b.call, args=(time.sleep, 0.1)) for _ in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert elapsed < 0.3, elapsed  # pybreaker's lock would serialize them: 0.8 s
    after = redis_clean.client(1).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert after - before <= 1


def test_half_open_race_runs_exactly_one_trial(redis_clean):
    """Two processes x 4 threads race when the reset timeout ends: one trial call runs."""
    app = make_app(redis_clean, "race", tuning_circuit_breakers={"pay": {"fail_max": 3, "reset_timeout": 2}})
    b = breaker_for(runtime_for(app), "pay")
    b.open()
    start_at = time.time() + 2.5
    code = PROCESS_PRELUDE + (
        "import threading, redis\n"
        "r = redis.Redis.from_url(os.environ['TEST_TUNING_URL'])\n"
        f"start_at = {start_at!r}\n"
        "def trial():\n"
        "    r.incr('trial_runs'); time.sleep(0.5); return 'ok'\n"
        "def worker():\n"
        "    while time.time() < start_at: time.sleep(0.001)\n"
        "    try: b.call(trial)\n"
        "    except Exception: pass\n"
        "ts = [threading.Thread(target=worker) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TEST_TUNING_URL": redis_clean.db_url(1)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=str(ROOT), env=env) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert int(redis_clean.client(1).get("trial_runs")) == 1
    assert b.refresh().state == "closed"


def _shared(redis_server, name="alt", **options):
    """A breaker with its own connector and listener, as a separate process would have."""
    from celery_tuning.circuit import SharedBreaker
    from celery_tuning.storage.breaker import RedisBreakerStore
    from celery_tuning.storage.redis import RedisConnector

    return SharedBreaker(name, store=RedisBreakerStore(RedisConnector(redis_server.db_url(1))), **options)


def _heard(b, seen, timeout=5.0):
    """Wait until ``b``'s process has heard of a failure recorded after ``seen`` was read."""
    deadline = time.monotonic() + timeout
    while b.store.failure_epoch(b.params) == seen and time.monotonic() < deadline:
        time.sleep(0.005)


def test_alternating_failures_and_successes_across_processes_never_open_it(redis_clean):
    """Defect #10: a success elsewhere resets the shared count even when that process's view is stale."""
    failing = _shared(redis_clean, fail_max=3, refresh_interval=60)
    healthy = _shared(redis_clean, fail_max=3, refresh_interval=60)
    healthy.refresh()  # its view: closed, no failures, trusted for a minute
    for _ in range(6):
        seen = healthy.store.failure_epoch(healthy.params)
        failing.record_failure(ValueError("down"), None)
        _heard(healthy, seen)
        healthy.record_success(None)
    assert failing.refresh().state == "closed"
    assert failing.refresh().failures == 0
    for _ in range(3):  # consecutive failures still open it
        failing.record_failure(ValueError("down"), None)
    assert failing.refresh().state == "open"


def test_successes_in_the_steady_closed_state_cost_no_round_trip(redis_clean):
    b = _shared(redis_clean, fail_max=3, refresh_interval=60)
    other = _shared(redis_clean, fail_max=3, refresh_interval=60)
    b.refresh()
    calls = redis_clean.client(1).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)

    def evalsha_calls():
        return redis_clean.client(1).info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) - calls

    for _ in range(100):
        b.call(lambda: None)
    assert evalsha_calls() == 0
    seen = b.store.failure_epoch(b.params)
    other.record_failure(ValueError("down"), None)  # elsewhere: one failure
    _heard(b, seen)
    for _ in range(100):
        b.call(lambda: None)
    assert evalsha_calls() == 2  # the failure, then one success that resets it
    assert other.refresh().failures == 0


def test_a_trial_whose_lease_ran_out_cannot_settle_the_next_holders_trial(redis_clean):
    """Defect #4: the late caller's verdict neither closes the breaker nor frees the new lease."""
    options = dict(fail_max=1, reset_timeout=0.1, success_threshold=2, trial_timeout=0.3, refresh_interval=0)
    late, current, third = (_shared(redis_clean, "owned", **options) for _ in range(3))
    late.open()
    time.sleep(0.15)
    late_trial = late.admit()
    assert late_trial
    time.sleep(0.35)  # its lease runs out while its call is still going
    current_trial = current.admit()
    assert current_trial
    late.record_success(late_trial)
    late.record_success(late_trial)  # twice: success_threshold=2 would close it
    assert current.refresh().state == "half-open"
    with pytest.raises(CircuitOpen):  # the current holder's lease still stands
        third.admit()
    current.record_success(current_trial)
    next_trial = third.admit()  # one good trial of two: the next one runs now
    assert next_trial
    third.record_success(next_trial)
    assert current.refresh().state == "closed"


def test_control_flow_and_excluded_exceptions_are_not_failures(redis_clean):
    from celery.exceptions import Ignore, Reject, Retry

    app = make_app(redis_clean, "neutral", tuning_circuit_breakers={
        "api": {"fail_max": 1, "exclude": [KeyError, "tests.integration.test_breaker.Down"]}})
    b = celery_tuning.breaker("api", app=app)
    # Our own refusals too: a nested breaker's CircuitOpen or a concurrency limit's refusal says
    # nothing about this breaker's service.
    for exc in (Retry(), Ignore(), Reject("x"), celery_tuning.RateLimited(1.0), celery_tuning.Throttled(1.0),
                celery_tuning.ConcurrencyLimited("slots", 1.0), CircuitOpen("inner", 1.0), KeyError("x"), Down()):
        with pytest.raises(type(exc)):
            b.call(_raiser(exc))
    assert b.refresh().state == "closed"
    with pytest.raises(CircuitOpen):  # fail_max=1: the first real failure trips it
        with b:
            raise ValueError("boom")
    assert b.current_state == "open"


def _raiser(exc):
    def f():
        raise exc

    return f


def test_pybreaker_listeners_and_signal_see_transitions(redis_clean):
    seen, signalled = [], []

    class Listener(pybreaker.CircuitBreakerListener):
        def state_change(self, cb, old_state, new_state):
            seen.append((old_state.name, new_state.name))

    def on_signal(sender=None, **kw):
        signalled.append((sender, kw["old"], kw["new"]))

    app = make_app(redis_clean, "listen", tuning_circuit_breakers={"api": {"fail_max": 1, "reset_timeout": 0.2}})
    b = celery_tuning.breaker("api", app=app)
    b.add_listener(Listener())
    celery_tuning.signals.circuit_state_changed.connect(on_signal)
    try:
        with pytest.raises(CircuitOpen):
            b.call(_raiser(ValueError()))
        time.sleep(0.25)
        b.call(lambda: None)
    finally:
        celery_tuning.signals.circuit_state_changed.disconnect(on_signal)
    assert seen == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]
    assert signalled == [("api", "closed", "open"), ("api", "open", "half-open"), ("api", "half-open", "closed")]


def test_tasks_wait_out_an_open_breaker_without_using_retries(redis_clean):
    app = make_app(redis_clean, "deferred", tuning_circuit_breakers={"pay": {"fail_max": 2, "reset_timeout": 1.5}})
    healthy = threading.Event()
    body_runs = []

    @app.task(base=TunedTask, bind=True, max_retries=0, shared=False)
    @circuit_breaker("pay")
    def charge(self, n):
        body_runs.append((n, time.monotonic(), healthy.is_set()))
        if not healthy.is_set():
            raise ConnectionError("payments down")
        return n

    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=10):
        for n in range(2):  # two failures open it
            with pytest.raises(ConnectionError):
                charge.delay(n).get(timeout=10)
        opened = time.monotonic()
        results = [charge.delay(n) for n in range(10, 16)]
        time.sleep(0.5)
        healthy.set()
        assert [r.get(timeout=30) for r in results] == list(range(10, 16))
        # the tasks turned away by the one trial (60 s lease) come back within a second or so
        assert time.monotonic() - opened < 5.0
    late = [run for run in body_runs if run[0] >= 10]
    assert len(late) == 6, late  # each ran once, only after the breaker let them
    assert all(t - opened >= 1.4 for _, t, _ in late)


def test_on_open_fail_and_fallback(redis_clean):
    app = make_app(redis_clean, "failfast", tuning_circuit_breakers={"pay": {"fail_max": 1, "reset_timeout": 60}})

    @app.task(base=TunedTask, shared=False)
    @circuit_breaker("pay", on_open="fail")
    def strict():
        return "ran"

    @app.task(base=TunedTask, shared=False)
    @circuit_breaker("pay", fallback=lambda: "cached answer")
    def lenient():
        return "ran"

    celery_tuning.breaker("pay", app=app).open()
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        failing = strict.delay()
        with pytest.raises(pybreaker.CircuitBreakerError):
            failing.get(timeout=10)
        assert lenient.delay().get(timeout=10) == "cached answer"


def test_bind_time_errors_name_the_breaker(redis_clean):
    app = make_app(redis_clean, "badbreaker", tuning_circuit_breakers={"pay": {}})

    @app.task(base=TunedTask, name="needs_breaker", shared=False)
    @circuit_breaker("payments")
    def f():
        pass

    with pytest.raises(ConfigurationError, match=r"task 'needs_breaker': @circuit_breaker\('payments'\): no such"):
        f.run  # noqa: B018


def test_redis_outage_follows_the_policy(fault_redis):
    app = Celery("cb-outage", set_as_current=False)
    app.conf.update(tuning_redis_url=fault_redis.db_url(1), tuning_redis_connect_timeout=0.2,
                    tuning_redis_socket_timeout=0.2, tuning_breaker_refresh_interval=0.0,
                    tuning_circuit_breakers={"x": {"fail_max": 2, "reset_timeout": 30}})
    b = breaker_for(runtime_for(app), "x")
    assert b.call(lambda: 1) == 1
    fault_redis.stop()
    try:
        assert b.call(lambda: 2) == 2  # local state: closed, the call runs
        for _ in range(2):
            with pytest.raises((ValueError, CircuitOpen)):
                b.call(_raiser(ValueError()))
        with pytest.raises(CircuitOpen):  # the local breaker opened
            b.call(lambda: 3)
    finally:
        fault_redis.start()
    assert b.refresh().state == "closed"  # shared state was never touched
