"""Cluster-wide concurrency limits: leases in Redis, renewed while running, freed by a dead worker's TTL."""

import json
import os
import signal
import time

import pytest

from celery_tuning import ConcurrencyLimited, ConfigurationError, TunedTask, concurrency_limit
from tests.support.apps import make_app, run_producer, worker_env
from tests.support.workers import WorkerProcess, running_workers

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_at_most_n_run_at_once_across_prefork_workers(redis_clean):
    with running_workers("tests.apps.limited:app", worker_env(redis_clean), concurrency=4, prefix="cc"):
        out = run_producer(
            "import json, time\nfrom tests.apps.limited import render\n"
            "start = time.time()\nrs = [render.delay(i) for i in range(10)]\n"
            "values = [r.get(timeout=90) for r in rs]\n"
            "print(json.dumps({'elapsed': time.time() - start, 'values': values}))\n", redis_clean)
    data = json.loads(out.splitlines()[-1])
    assert [v["i"] for v in data["values"]] == list(range(10))
    assert all(v["retries"] == 0 for v in data["values"])
    seen = [int(x) for x in redis_clean.client(1).lrange("inflight_seen", 0, -1)]
    assert len(seen) == 10 and max(seen) <= 2, seen
    runs = redis_clean.client(1).hgetall("render_runs")
    assert len(runs) == 10 and set(runs.values()) == {b"1"}
    assert data["elapsed"] >= 10 * 0.4 / 2 * 0.95


@pytest.mark.slow
def test_a_killed_worker_gives_its_slot_back_within_the_lease_ttl(redis_clean):
    env = {**worker_env(redis_clean), "TEST_LEASE_TTL": "2"}
    doomed = WorkerProcess("tests.apps.limited:app", env, pool="prefork", concurrency=1, name="doomed")
    survivor = WorkerProcess("tests.apps.limited:app", env, pool="prefork", concurrency=1, name="survivor")
    client = redis_clean.client(1)
    try:
        doomed.start()
        run_producer("from tests.apps.limited import hold\nhold.delay(60, 'first')\n", redis_clean)
        deadline = time.time() + 20
        while not client.get("started:first"):
            assert time.time() < deadline, doomed.output()[-2000:]
            time.sleep(0.05)
        os.killpg(doomed.proc.pid, signal.SIGKILL)  # the lease is never released
        killed_at = time.time()
        survivor.start()
        out = run_producer("from tests.apps.limited import hold\nprint(hold.delay(0, 'second').get(timeout=60))\n",
                           redis_clean)
        assert out == "second"
        started = float(client.get("started:second"))
        assert started - killed_at < 2 + 8, "capacity did not come back after the lease TTL"
    finally:
        doomed.close()
        survivor.close()


def test_bind_and_eager_errors(redis_clean):
    app = make_app(redis_clean, "ccbind", tuning_concurrency_limits={"solo": 1})

    @app.task(base=TunedTask, shared=False, name="cc_missing")
    @concurrency_limit("render")
    def missing():
        pass

    with pytest.raises(ConfigurationError, match=r"task 'cc_missing': @concurrency_limit\('render'\): no such"):
        missing.run  # noqa: B018

    @app.task(base=TunedTask, shared=False)
    @concurrency_limit("solo")
    def nested():
        return inner.apply().get()

    @app.task(base=TunedTask, shared=False)
    @concurrency_limit("solo", max_wait=0.3)
    def inner():
        return "ran"

    assert inner.apply().get() == "ran"  # the slot is released after each run
    started = time.monotonic()
    with pytest.raises(ConcurrencyLimited, match="concurrency limit 'solo' reached"):
        nested.apply().get()  # holds the only slot: inner waits max_wait for it, then raises
    assert time.monotonic() - started >= 0.3


def test_a_call_with_no_message_waits_for_a_slot(redis_clean):
    """apply(), direct calls and map/starmap/chunks members have nothing to defer: they wait for a
    slot (bounded by max_wait) instead of failing at once while a slot is about to free up."""
    import threading

    from celery_tuning.integration.registry import concurrency_limiter_for
    from celery_tuning.integration.runtime import runtime_for

    app = make_app(redis_clean, "ccwait", tuning_concurrency_limits={"one": 1})

    @app.task(base=TunedTask, shared=False)
    @concurrency_limit("one", max_wait=10)
    def render(x):
        return x * 2

    limiter = concurrency_limiter_for(runtime_for(app), "one")
    held = limiter.acquire()
    assert held.granted
    threading.Timer(0.3, limiter.release, (held,)).start()
    started = time.monotonic()
    assert render.apply((21,)).get() == 42
    assert render(5) == 10  # a direct call, as celery.map runs its members
    assert 0.3 <= time.monotonic() - started < 5


def test_redis_down_caps_per_process_and_recovers(fault_redis):
    """docs/faq.md: with the tuning Redis down, a cap applies per process (on_redis_error='local'),
    bounded by the socket timeout; when Redis is back empty, the holders still running are put back."""
    from celery_tuning.concurrency import ConcurrencyLimiter
    from celery_tuning.storage.redis import RedisConnector

    # ttl=60: the renewer thread stays out of the way (every 20 s); the test renews by hand
    limiter = ConcurrencyLimiter("outage", 1, RedisConnector(fault_redis.db_url(0)), ttl=60)
    unlimited = ConcurrencyLimiter("outage", 1, RedisConnector(fault_redis.db_url(0)), ttl=5, on_redis_error="allow")
    held = limiter.acquire()
    assert held.granted and held.id is not None and held.source == "redis"
    assert not limiter.acquire().granted  # the cap holds while Redis answers
    fault_redis.stop()
    start = time.monotonic()
    refused = limiter.acquire()  # this process already runs one holder: its local cap is full
    assert (refused.granted, refused.source) == (False, "local")
    assert time.monotonic() - start < 3
    assert unlimited.acquire() == (None, 0.0, "allow")  # ran unlimited, said so, did not raise
    limiter.release(held)  # never raises either
    local = limiter.acquire()
    assert local.granted and local.id is not None and local.source == "local"
    assert not limiter.acquire().granted
    fault_redis.restart()  # empty: the lease taken during the outage is still running
    assert limiter.renew() == 1  # put back where every process sees it
    other = ConcurrencyLimiter("outage", 1, RedisConnector(fault_redis.db_url(0)), ttl=5)
    assert not other.acquire().granted
    limiter.release(local)
    again = other.acquire()
    assert again.granted and again.source == "redis"
    other.release(again)


def test_a_lease_released_during_its_renewal_stays_released(redis_clean):
    """A renewal re-creates missing leases; one released while the renewal is on its way must not
    come back and hold a slot for a whole TTL."""
    from celery_tuning.concurrency import ConcurrencyLimiter
    from celery_tuning.storage.lease import RedisLeaseStore
    from celery_tuning.storage.redis import RedisConnector

    class ReleasedMidway(RedisLeaseStore):
        def renew(self, key, lease_ids, ttl_us, now=None):
            limiter.release(lease)  # the task ends between the renewer's snapshot and its script
            return super().renew(key, lease_ids, ttl_us, now)

    limiter = ConcurrencyLimiter("midway", 1, ReleasedMidway(RedisConnector(redis_clean.db_url(3))), ttl=60)
    lease = limiter.acquire()
    assert limiter.renew() == 1  # re-created by the renewal ...
    assert limiter.held() == 0  # ... and taken out again
    limiter.release(limiter.acquire())
    assert limiter.held() == 0



def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_renewal_puts_back_leases_redis_lost(redis_clean):
    """Defect #8: after FLUSHDB (or a restart without persistence) the running holder's lease returns."""
    from celery_tuning.concurrency import ConcurrencyLimiter
    from celery_tuning.storage.redis import RedisConnector

    connector = RedisConnector(redis_clean.db_url(3))
    here = ConcurrencyLimiter("lost", 1, connector, ttl=0.6)  # renewed every 0.2 s
    elsewhere = ConcurrencyLimiter("lost", 1, connector, ttl=0.6)
    lease = here.acquire()
    assert lease.granted
    redis_clean.client(3).flushdb()
    assert _wait_for(lambda: redis_clean.client(3).exists(here.key)), "the running holder's lease never came back"
    assert not elsewhere.acquire().granted  # the cap holds again
    here.release(lease)
    again = elsewhere.acquire()
    assert again.granted
    elsewhere.release(again)


def test_a_re_created_lease_counts_even_past_the_cap(redis_clean):
    """Between the loss and the next renewal another caller may take the emptied slot; the re-created
    lease still counts, so nobody else gets in until enough holders end."""
    from celery_tuning.concurrency import ConcurrencyLimiter
    from celery_tuning.storage.redis import RedisConnector

    connector = RedisConnector(redis_clean.db_url(3))
    first = ConcurrencyLimiter("over", 1, connector, ttl=60)  # renewed by hand below, not by its thread
    other = ConcurrencyLimiter("over", 1, connector, ttl=60)
    held = first.acquire()
    redis_clean.client(3).flushdb()
    late = other.acquire()  # admitted into the emptied set: two run at once for a while
    assert late.granted
    assert first.renew() == 1
    assert first.held() == 2
    other.release(late)
    assert not other.acquire().granted  # the first holder still runs
    first.release(held)
    last = other.acquire()
    assert last.granted
    other.release(last)


def test_a_short_lease_does_not_cut_the_set_expiry_of_a_long_one(redis_clean):
    from celery_tuning.concurrency import ConcurrencyLimiter
    from celery_tuning.storage.redis import RedisConnector

    connector = RedisConnector(redis_clean.db_url(3))
    long = ConcurrencyLimiter("mixed", 2, connector, ttl=60)
    short = ConcurrencyLimiter("mixed", 2, connector, ttl=1)
    leases = [(long, long.acquire()), (short, short.acquire())]
    assert all(lease.granted for _, lease in leases)
    assert redis_clean.client(3).pttl(long.key) > 59_000  # the key outlives every live lease
    for limiter, lease in leases:
        limiter.release(lease)


def test_a_forked_child_neither_renews_its_parents_leases_nor_inherits_a_held_lock(redis_clean):
    from celery_tuning.concurrency import ConcurrencyLimiter
    from celery_tuning.storage.redis import RedisConnector
    from tests.support.fork import true_in_child

    limiter = ConcurrencyLimiter("forked", 2, RedisConnector(redis_clean.db_url(3)), ttl=60)
    lease = limiter.acquire()
    client = redis_clean.client(3)

    def child() -> bool:
        signal.alarm(5)  # a lock inherited locked would hang here: fail instead
        client.flushdb()  # the parent's lease is gone; a child renewing it would put it back
        mine = limiter.acquire()
        renewed = limiter.renew()
        limiter.release(mine)
        return renewed == 0 and not client.exists(limiter.key)

    try:
        with limiter._lock:  # as if the parent's renewer thread held it at fork()
            assert true_in_child(child)
    finally:
        limiter.release(lease)


@pytest.mark.parametrize("woken", [True, False])
def test_a_woken_waiter_refused_again_parks_without_spending_its_budget(redis_clean, woken):
    """Under a backlog the mover wakes waiters before the last one woken has taken its slot; each
    refused one parked again and spent a deferral, and with max_deferrals=2 a review saw 12 of 150
    FIFO waiters fail with ConcurrencyLimited. Waking is the mover's guess: it does not count."""
    from celery.app.trace import build_tracer

    from celery_tuning.integration.deferral import HEADER_DEFERRALS, HEADER_PARK
    from celery_tuning.integration.registry import concurrency_limiter_for
    from celery_tuning.integration.runtime import runtime_for
    from celery_tuning.storage.park import RedisParkStore, Spot
    from celery_tuning.storage.redis import get_connector

    app = make_app(redis_clean, f"woken-{woken}", tuning_concurrency_limits={"one": 1})

    @app.task(bind=True, shared=False, name=f"woken.task{woken}")
    @concurrency_limit("one", max_deferrals=2)
    def task(self, x):
        return x

    limiter = concurrency_limiter_for(runtime_for(app), "one")
    held = limiter.acquire()  # the slot the waiter was woken for went to another call
    assert held.granted
    try:
        headers = {HEADER_DEFERRALS: 2}  # its whole budget spent waiting already
        if woken:
            headers[HEADER_PARK] = {"id": "w-1:0:2", "pub": 1, "r": "concurrency", "n": "one"}
        request = {"id": "w-1", "task": task.name, "delivery_info": {"routing_key": "celery", "exchange": ""},
                   "hostname": "t@host", "headers": headers, **headers}
        info = build_tracer(task.name, task, app=app, eager=False)("w-1", (1,), {}, request)[1]
    finally:
        limiter.release(held)
    parked = RedisParkStore(get_connector(redis_clean.db_url(1))).snapshot(Spot("concurrency", "one"))
    if woken:
        assert info.state == "IGNORED" and parked.waiting + parked.due == 1, "a woken waiter spent its budget"
    else:
        assert info.state == "FAILURE" and isinstance(info.retval, ConcurrencyLimited)
        assert parked.waiting + parked.due == 0


def _spans(client, name):
    return [tuple(float(x) for x in raw.split()[1:]) for raw in client.lrange(name, 0, -1)]


def _most_at_once(spans):
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
def test_per_key_caps_hold_per_tenant_while_tenants_run_side_by_side(redis_clean):
    """Issue #18: per tenant never above its cap (1, and 2 for 'big' through per_key), different
    tenants at once, each task once; named and inline limits; tenants reach Redis only hashed."""
    with running_workers("tests.apps.tenants:app", worker_env(redis_clean), count=2, concurrency=3, prefix="tn"):
        out = run_producer(
            "import json\nfrom tests.apps.tenants import sync, inline_sync\n"
            "rs = [task.delay(tenant, i) for i in range(6) for tenant in ('small', 'big')\n"
            "      for task in (sync, inline_sync)]\n"
            "print(json.dumps(sorted(r.get(timeout=90) for r in rs)))\n", redis_clean)
    assert json.loads(out.splitlines()[-1]) == sorted(list(range(6)) * 4)
    client = redis_clean.client(1)
    runs = client.hgetall("runs")
    assert len(runs) == 24 and set(runs.values()) == {b"1"}  # each task once
    for kind in ("named", "inline"):
        small, big = _spans(client, f"spans:{kind}:small"), _spans(client, f"spans:{kind}:big")
        assert len(small) == len(big) == 6
        assert _most_at_once(small) == 1, (kind, small)
        assert _most_at_once(big) == 2, (kind, big)  # its own cap, reached
        # side by side: a small tenant's run overlaps a big tenant's
        assert any(s0 < b1 and b0 < s1 for s0, s1 in small for b0, b1 in big), kind
    keys = [k.decode() for k in client.keys("tuning:*")]
    assert any(":k:" in k for k in keys) and not any("small" in k or "big" in k for k in keys), keys  # hashed
    per_key = [k for k in keys if k.startswith("tuning:cc:{") and ":k:" in k]
    assert all(client.pttl(k) > 0 or not client.exists(k) for k in per_key)  # idle keys expire


@pytest.mark.slow
def test_a_tenant_at_its_cap_holds_no_worker_process_another_tenant_needs(redis_clean):
    """Review finding: a woken waiter of a tenant at its cap held on in its worker as that key's
    standby, and kept the worker's other process from another tenant's tasks until the running one
    ended. A per-key waiter has no standby: with 'small' at its cap (1) holding one of two processes
    and its backlog parked, 'other' tenant's tasks run in the second one and all end before
    'small''s running task does (an order, not a time)."""
    with running_workers("tests.apps.tenants:app", worker_env(redis_clean), count=1, concurrency=2, prefix="tc"):
        out = run_producer(
            "import json, time\n"
            "from tests.apps.tenants import app, ledger, sync\n"
            "from celery_tuning.integration.runtime import runtime_for\n"
            "from celery_tuning.storage.keys import key_digest, keyed_spot_name\n"
            "from celery_tuning.storage.park import Spot\n"
            "store = runtime_for(app).registry.park_store()\n"
            "spot = Spot('concurrency', keyed_spot_name('sync', key_digest('small')))\n"
            "first = sync.delay('small', 0, seconds=3.0)\n"
            "deadline = time.time() + 30\n"
            "while not ledger.llen('starts:named:small'):\n"
            "    assert time.time() < deadline, 'small 0 never started'\n"
            "    time.sleep(0.02)\n"
            "backlog = [sync.delay('small', i, seconds=3.0) for i in (1, 2)]\n"
            "while True:  # its backlog settled: parked, or (before the fix) one held on as a standby\n"
            "    snap = store.snapshot(spot)\n"
            "    if snap.waiting + snap.standbys == 2 and snap.due + snap.claimed == 0:\n"
            "        break\n"
            "    assert time.time() < deadline, snap\n"
            "    time.sleep(0.02)\n"
            "time.sleep(0.3)  # a woken waiter on its way would be holding on by now\n"
            "others = [sync.delay('other', i, seconds=0.05) for i in range(3)]\n"
            "print(json.dumps({'others': [r.get(timeout=60) for r in others], 'first': first.get(timeout=60)}))\n",
            redis_clean)
    assert json.loads(out.splitlines()[-1]) == {"others": [0, 1, 2], "first": 0}
    client = redis_clean.client(1)
    [(first_start, first_end)] = [span for raw, span in zip(client.lrange("spans:named:small", 0, -1),
                                                             _spans(client, "spans:named:small"))
                                  if raw.split()[0] == b"0"]
    others = _spans(client, "spans:named:other")
    assert len(others) == 3
    assert max(end for _, end in others) < first_end, (others, first_start, first_end)
