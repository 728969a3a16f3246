"""The two-level result cache against a real redis-server and real workers."""

import os
import pickle
import threading
import time

import pytest
from celery.contrib.testing.worker import start_worker
from celery.result import EagerResult

import celery_tuning
from celery_tuning import CircuitOpen, RateLimited, TunedTask, cache_result, circuit_breaker, rate_limit
from tests.support.apps import make_app, run_producer, worker_env
from tests.support.workers import WorkerProcess, running_workers

pytestmark = pytest.mark.integration








@pytest.mark.slow
def test_single_flight_across_two_workers_then_l2_for_a_fresh_worker(redis_clean):
    """20 identical calls to 2 thread-pool workers (c=8) run the body once; a new worker reads L2."""
    with running_workers("tests.apps.cached:app", worker_env(redis_clean), pool="threads", concurrency=8, prefix="c"):
        out = run_producer(
            "import json\nfrom tests.apps.cached import embed\n"
            "rs = [embed.delay('hello', model='small') if i % 2 else embed.delay('hello') for i in range(20)]\n"
            "print(json.dumps([r.get(timeout=60) for r in rs]))\n", redis_clean)
        import json

        values = json.loads(out)
        assert len(values) == 20 and all(v == {"text": "hello", "model": "small", "vector": [5, 1.5, -2]}
                                          for v in values)
        assert int(redis_clean.client(1).get("body_runs:hello")) == 1
    fresh = WorkerProcess("tests.apps.cached:app", worker_env(redis_clean), pool="solo", name="fresh")
    try:
        fresh.start()
        out = run_producer("from tests.apps.cached import embed\nprint(embed.delay('hello').get(timeout=30)['text'])",
                       redis_clean)
        assert out == "hello"
        assert int(redis_clean.client(1).get("body_runs:hello")) == 1, "served from L2, body not run"
    finally:
        fresh.close()


def test_hits_misses_invalidation_and_clear(redis_clean):
    app = make_app(redis_clean, "cachehits")
    runs = []
    events = []

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60, l1_ttl=0)  # no L1: every hit below comes from Redis
    def square(x, power=2):
        runs.append(x)
        return x**power

    def on_event(sender=None, event=None, **_):
        events.append(event)

    celery_tuning.signals.cache_event.connect(on_event)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            assert square.delay(3).get(timeout=10) == 9
            assert square.delay(3, power=2).get(timeout=10) == 9
            assert square.delay(x=3).get(timeout=10) == 9
            assert runs == [3]
            square.cache.invalidate(3)
            assert square.delay(3).get(timeout=10) == 9
            assert runs == [3, 3]
            square.delay(4).get(timeout=10)
            square.cache.clear()
            assert square.cache.get(4) == (False, None)
            square.delay(4).get(timeout=10)
            assert runs == [3, 3, 4, 4]
    finally:
        celery_tuning.signals.cache_event.disconnect(on_event)
    assert "hit_l2" in events and "miss" in events and "store" in events and "invalidate" in events


def test_failures_big_and_unserializable_results_are_not_cached(redis_clean):
    app = make_app(redis_clean, "cacheskip")
    runs = []

    @app.task(base=TunedTask, shared=False)
    @cache_result(max_size=100)
    def flaky(kind):
        runs.append(kind)
        if kind == "fail" and runs.count("fail") == 1:
            raise RuntimeError("transient")
        if kind == "big":
            return "x" * 1000
        if kind == "weird":
            return {1, 2}  # a set: JSON cannot hold it
        return kind

    assert flaky.apply(("weird",)).get() == {1, 2}  # the result itself is still returned
    assert flaky.apply(("weird",)).get() == {1, 2}
    assert flaky.apply(("big",)).get() == "x" * 1000
    assert flaky.apply(("big",)).get() == "x" * 1000
    with pytest.raises(RuntimeError):
        flaky.apply(("fail",)).get()
    assert flaky.apply(("fail",)).get() == "fail"
    assert flaky.apply(("fail",)).get() == "fail"
    assert runs == ["weird", "weird", "big", "big", "fail", "fail"]


def test_foreign_and_pickle_values_in_redis_are_misses_and_never_unpickled(redis_clean, tmp_path):
    app = make_app(redis_clean, "cachecorrupt")
    runs = []

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60, l1_ttl=0)
    def lookup(key):
        runs.append(key)
        return {"key": key}

    assert lookup.apply(("a",)).get() == {"key": "a"}
    assert lookup.cache.flush()  # the store is written in the background
    client = redis_clean.client(1)
    [value_key] = [k for k in client.keys("tuning:cache:*") if not k.endswith((b":lock", b":gen"))]
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for payload in (b"garbage", pickle.dumps(Evil()), b"ct2j:123:{\"trunc"):
        client.set(value_key, payload, px=60_000)
        assert lookup.apply(("a",)).get() == {"key": "a"}
        assert lookup.cache.flush()
    assert not marker.exists(), "a pickle payload from Redis was unpickled"
    assert runs == ["a"] * 4
    assert client.get(value_key).startswith(b"ct2j:"), "the foreign value was overwritten"


def test_invalidation_reaches_another_process_l1(redis_clean):
    app = make_app(redis_clean, "cacheinval")

    @app.task(base=TunedTask, shared=False, name="tests.inval.double")
    @cache_result(ttl=600, l1_ttl=600)
    def double(x):
        return x * 2 + len(os.environ.get("INVAL_BONUS", ""))

    assert double.apply((5,)).get() == 10  # now in this process's L1 and in Redis
    assert double.cache.get(5) == (True, 10)
    double._get_current_object().cache._step.cache._listen()
    listener_ready = time.monotonic() + 5
    from celery_tuning.storage.cache import listener_for

    step_cache = double.cache._step.cache
    listener = listener_for(step_cache.store.connector, step_cache.keys.channel)
    while not listener.subscribed.is_set() and time.monotonic() < listener_ready:
        time.sleep(0.01)
    code = (
        "import os\nfrom celery import Celery\nimport celery_tuning\nfrom celery_tuning import cache_result\n"
        f"app = Celery('other', broker={redis_clean.db_url(0)!r}, task_cls='celery_tuning:TunedTask')\n"
        f"app.conf.tuning_redis_url = {redis_clean.db_url(1)!r}\n"
        "celery_tuning.install(app)\n"
        "@app.task(name='tests.inval.double')\n@cache_result(ttl=600, l1_ttl=600)\n"
        "def double(x): return x * 2\n"
        "double.cache.invalidate(5)\nprint('ok')\n"
    )
    sent = time.monotonic()
    assert run_producer(code, redis_clean) == "ok"
    deadline = time.monotonic() + 1.0
    while double.cache.get(5)[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert double.cache.get(5) == (False, None), "L1 entry survived another process's invalidation"
    assert time.monotonic() - sent < 10


def test_followers_wait_for_the_leader_and_survive_a_dead_one(redis_clean):
    app = make_app(redis_clean, "cacheflight")
    runs = []

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60, l1_ttl=0, lock_timeout=1.0)
    def slow(x):
        runs.append(x)
        time.sleep(0.3)
        return x + 1

    # Celery marks an app finalized before it binds its tasks: threads racing to the first apply()
    # can get an unbound task (request_stack None). Workers finalize before any task runs.
    app.finalize()
    results = []
    threads = [threading.Thread(target=lambda: results.append(slow.apply((1,)).get())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2] * 6 and runs == [1]
    # a leader that died: its lock sits there without a value; followers take over after the lock TTL
    step_cache = slow.cache._step.cache
    gen = step_cache._current_generation()
    digest = step_cache.digest((7,), {})
    redis_clean.client(1).set(step_cache.keys.lock(gen, digest), "dead-leader", px=1000)
    start = time.monotonic()
    assert slow.apply((7,)).get() == 8
    assert 0.9 <= time.monotonic() - start < 3.0


def _leader_in_child(task, args):
    """Fork a process that calls ``task`` (and so leads its computation); its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            task.apply(args)
            task.cache.flush()  # what a prefork child's worker_process_shutdown does before os._exit
        finally:
            os._exit(0)
    return pid


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _counting_app(redis_clean, name, lease_ttl, lock_timeout, first_run_takes):
    """An app whose cached task counts its runs in Redis; the first run takes ``first_run_takes`` s."""
    import redis

    app = make_app(redis_clean, name, tuning_concurrency_lease_ttl=lease_ttl)
    runs_url = redis_clean.db_url(2)

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60, l1_ttl=0, lock_timeout=lock_timeout, wait_timeout=5)
    def crunch(x):
        if redis.Redis.from_url(runs_url).incr(f"runs:{x}") == 1:
            time.sleep(first_run_takes)
        return x * 2

    return crunch, redis_clean.client(2)


def test_a_sigkilled_leader_holds_followers_for_the_lock_lease_not_lock_timeout(redis_clean):
    """The leader is a real process killed mid-compute: a follower takes over once the lock's
    lease (tuning_concurrency_lease_ttl, 1 s) runs out, not after lock_timeout (60 s)."""
    import signal

    crunch, runs = _counting_app(redis_clean, "cachedeadleader", lease_ttl=1.0, lock_timeout=60, first_run_takes=60)
    pid = _leader_in_child(crunch, (1,))
    try:
        _wait_for(lambda: runs.get("runs:1") == b"1")
        time.sleep(0.5)  # a renewal or two went out
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pid = 0
        start = time.monotonic()
        assert crunch.apply((1,)).get() == 2
        waited = time.monotonic() - start
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert runs.get("runs:1") == b"2", "the follower computed it after the leader died"
    assert 0.3 <= waited < 1.0 + 0.2 + 0.6, f"the follower waited {waited:.2f}s for a dead leader"


def test_a_live_leader_slower_than_the_lease_keeps_its_lock(redis_clean):
    """The leader's process renews the lock while the body runs: a follower arriving after the
    lease (0.5 s) would have run out waits for the leader's value instead of computing it again."""
    crunch, runs = _counting_app(redis_clean, "cacheslowleader", lease_ttl=0.5, lock_timeout=60, first_run_takes=2.5)
    pid = _leader_in_child(crunch, (3,))
    try:
        _wait_for(lambda: runs.get("runs:3") == b"1")
        tuning = redis_clean.client(1)
        [lock] = list(tuning.scan_iter(match="*:lock"))
        assert 0 < tuning.pttl(lock) <= 500, "the lock lives one lease, not lock_timeout"
        time.sleep(1.0)  # two leases: only renewals keep it now
        assert tuning.pttl(lock) > 0
        assert crunch.apply((3,)).get() == 6
    finally:
        os.waitpid(pid, 0)
    assert runs.get("runs:3") == b"1", "a second computation ran while the leader was alive"


def test_redis_down_serves_l1_and_tasks_still_run(fault_redis, redis_clean):
    app = make_app(redis_clean, "cachedown", tuning_url=fault_redis.db_url(1), tuning_redis_connect_timeout=0.2,
                   tuning_redis_socket_timeout=0.2)
    runs = []

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60, l1_ttl=60)
    def f(x):
        runs.append(x)
        return x

    fault_redis.stop()
    try:
        assert f.apply((1,)).get() == 1
        assert f.apply((1,)).get() == 1  # from L1
        assert f.apply((2,)).get() == 2
    finally:
        fault_redis.start()
    assert runs == [1, 2]


def test_short_circuit_answers_without_publishing(redis_clean):
    app = make_app(redis_clean, "shortcircuit")

    @app.task(base=TunedTask, shared=False)
    @cache_result(short_circuit=True)
    def price(sku):
        return {"sku": sku, "price": 10}

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        first = price.delay("A1")
        assert not isinstance(first, EagerResult)
        assert first.get(timeout=10) == {"sku": "A1", "price": 10}
        second = price.delay("A1")
        assert isinstance(second, EagerResult) and second.get() == {"sku": "A1", "price": 10}


def _calls(client, command):
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_cached_rate_limited_miss_takes_its_token_in_the_lookup_round_trip(redis_clean, fault_redis):
    """On a worker: a miss elects the leader and takes the token in one EVALSHA; hits take none.

    The tuning Redis is its own server here, so its command counts are ours alone.
    """
    app = make_app(redis_clean, "cachelimit", tuning_url=fault_redis.db_url(1))
    runs = []

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60, l1_ttl=0)  # no L1: every repeat below is answered by Redis
    @rate_limit("1/h", burst=4, on_limit="raise")  # four tokens in all
    def fetch(x):
        runs.append(x)
        return x * 10

    tuning = fault_redis.client(1)
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        assert fetch.delay(0).get(timeout=10) == 0  # the first read of a cache is a plain GET
        assert fetch.delay(1).get(timeout=10) == 10  # reads miss: the lookup script comes first now
        assert fetch.cache.flush()
        evalsha, get = _calls(tuning, "evalsha"), _calls(tuning, "get")
        assert fetch.delay(2).get(timeout=10) == 20
        assert fetch.cache.flush()  # the store is written in the background (in this process)
        # Two scripts and no plain GET; commandstats also counts the GETs scripts make inside
        # (value, bucket, lock: three), so a plain GET of the value would make it four.
        assert (_calls(tuning, "evalsha") - evalsha, _calls(tuning, "get") - get) == (2, 3), \
            "a miss is the lookup with its limiter decision, then the store"
        for _ in range(3):  # hits: no token taken, so the four tokens are still enough below
            assert [fetch.delay(x).get(timeout=10) for x in (0, 1, 2)] == [0, 10, 20]
        assert fetch.delay(3).get(timeout=10) == 30
        with pytest.raises(RateLimited):
            fetch.delay(4).get(timeout=10)  # the fifth distinct call: the tokens are gone
    assert runs == [0, 1, 2, 3]
    assert not list(tuning.scan_iter(match="*:lock")), "the refused leader released its lock"


def test_no_token_for_a_call_an_open_breaker_stops(redis_clean):
    app = make_app(redis_clean, "cachebreaker")

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60)
    @circuit_breaker("cb-guarded", fail_max=1, reset_timeout=60)
    @rate_limit("1/h", burst=2, on_limit="raise")  # two tokens in all
    def guarded(x):
        return x

    assert guarded.apply((1,)).get() == 1  # closed: the first token
    breaker = guarded._tuning_steps[1].breaker
    breaker.open()
    with pytest.raises(CircuitOpen):
        guarded.apply((2,)).get()  # stopped by the breaker: must not take a token
    breaker.close()
    assert guarded.apply((3,)).get() == 3  # so the second token is still there
    with pytest.raises(RateLimited):
        guarded.apply((4,)).get()


def test_reads_follow_the_hit_miss_trend(fault_redis):
    """Mostly hits: a hit is one plain GET. Mostly misses: the lookup script alone (one round trip)."""
    app = make_app(fault_redis, "cachetrend")

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60, l1_ttl=0)
    def double(x):
        return 2 * x

    tuning = fault_redis.client(1)
    for x in range(3):
        double.apply((x,)).get()
    for _ in range(10):  # hits only: the trend turns to "hits"
        double.apply((0,)).get()

    def per_call(x):
        assert double.cache.flush()  # earlier calls' stores are not counted here
        evalsha, get = _calls(tuning, "evalsha"), _calls(tuning, "get")
        double.apply((x,)).get()
        assert double.cache.flush()  # the store of a miss is written in the background
        return _calls(tuning, "evalsha") - evalsha, _calls(tuning, "get") - get

    assert per_call(1) == (0, 1), "a hit while hits prevail: one GET, no script"
    assert per_call(100) == (2, 3), "the first miss: GET, then lookup (1 GET inside) and store (1 GET inside)"
    for x in range(101, 110):  # the trend is bounded at 8 either way: this many misses turn it
        double.apply((x,)).get()
    assert per_call(200) == (2, 2), "while misses prevail: lookup and store only, no plain GET"
    assert per_call(2) == (1, 1), "a hit then comes back from the lookup script itself"


def test_per_key_limiter_decision_in_the_lookup_goes_to_that_key(fault_redis):
    """The decision taken in the cache's lookup spends the caller's own bucket, not a shared one."""
    app = make_app(fault_redis, "cachekeyed")

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60, l1_ttl=0)
    @rate_limit("1/h", burst=2, key=lambda tenant, doc: tenant, on_limit="raise")  # two per tenant
    def render(tenant, doc):
        return f"{tenant}:{doc}"

    tuning = fault_redis.client(1)
    for doc in ("w0", "w1"):  # misses (and two of tenant "warm"'s tokens): reads go to the script first
        render.apply(("warm", doc)).get()
    assert render.cache.flush()
    before = _calls(tuning, "evalsha")
    assert render.apply(("a", "1")).get() == "a:1"
    assert render.cache.flush()
    assert _calls(tuning, "evalsha") - before == 2, "lookup with the decision, then the store"
    assert render.apply(("a", "2")).get() == "a:2"
    assert render.apply(("b", "1")).get() == "b:1"  # b's bucket is untouched by a's calls
    with pytest.raises(RateLimited):
        render.apply(("a", "3")).get()
    assert render.apply(("b", "2")).get() == "b:2"
    assert render.apply(("a", "1")).get() == "a:1"  # a hit: needs no token


@pytest.mark.slow
def test_a_prefork_child_writes_its_queued_store_before_it_exits(redis_clean, fault_redis):
    """Each child runs one task and exits while its deferred store is still on the wire (200 ms
    added to every tuning Redis reply): the worker_process_shutdown flush must land it."""
    from celery_tuning.testing.proxy import LatencyProxy

    proxy = LatencyProxy(fault_redis.port, 0.2).start()
    env = {**worker_env(redis_clean), "TEST_TUNING_URL": f"redis://127.0.0.1:{proxy.port}/1"}
    try:
        with running_workers("tests.apps.cached:app", env, count=1, pool="prefork", concurrency=1,
                             extra=["--max-tasks-per-child=1"], prefix="exit"):
            out = run_producer("from tests.apps.cached import embed\nprint(embed.delay('bye').get(timeout=60)['text'])",
                               redis_clean, env=env)
            assert out == "bye"
            tuning = fault_redis.client(1)
            deadline = time.monotonic() + 10
            values = []
            while time.monotonic() < deadline and not values:
                values = [k for k in tuning.scan_iter(match="tuning:cache:*")
                          if not k.endswith((b":lock", b":gen"))]
                time.sleep(0.05)
            assert len(values) == 1, "the exiting child's store never reached Redis"
            assert not list(tuning.scan_iter(match="*:lock")), "and it released the single-flight lock"
    finally:
        proxy.close()
