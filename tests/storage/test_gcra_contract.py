"""One contract for both GCRA stores, plus the Lua-vs-oracle differential test on real Redis."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_tuning.policy.gcra import gcra_acquire
from celery_tuning.storage.gcra import (
    MAX_DEBT_US,
    AdaptiveSpec,
    Bucket,
    GcraSnapshot,
    MemoryGcraStore,
    RedisGcraStore,
)
from celery_tuning.storage.redis import RedisConnector
from tests.support import gcra

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000  # a fixed "now" in µs: both stores get the same clock


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request, redis_clean):
    if request.param == "memory":
        return MemoryGcraStore(clock=lambda: T0)
    if request.param == "cluster":  # hash-tagged keys: every script's keys share a slot
        return RedisGcraStore(RedisConnector(request.getfixturevalue("cluster_clean").url))
    return RedisGcraStore(RedisConnector(redis_clean.db_url(3)))


def bucket(name="api", key=None):
    return Bucket.for_limiter("tuning", name, key)


def test_burst_then_refusal(store):
    b = bucket()
    assert [store.acquire(b, 1000, 3, 1, -1, now=T0).allowed for _ in range(4)] == [True, True, True, False]
    refused = store.acquire(b, 1000, 3, 1, -1, now=T0)
    assert refused.wait_us == 1000
    assert store.acquire(b, 1000, 3, 1, -1, now=T0 + 1000).allowed


def test_reservation(store):
    b = bucket()
    waits = [store.acquire(b, 1000, 1, 1, 10_000, now=T0).wait_us for _ in range(4)]
    assert waits == [0, 1000, 2000, 3000]


def test_buckets_are_independent(store):
    assert store.acquire(bucket(key="a"), 1000, 1, 1, -1, now=T0).allowed
    assert store.acquire(bucket(key="b"), 1000, 1, 1, -1, now=T0).allowed
    assert not store.acquire(bucket(key="a"), 1000, 1, 1, -1, now=T0).allowed


def test_pause(store):
    b = bucket()
    store.pause(b, 1000, 5, 50_000, now=T0)
    r = store.acquire(b, 1000, 5, 1, -1, now=T0 + 49_999)
    assert not r.allowed and r.wait_us == 1
    assert store.acquire(b, 1000, 5, 1, -1, now=T0 + 50_000).allowed


def test_override_and_reset(store):
    b = bucket()
    store.set_override(b, interval=10_000, burst=1)
    assert store.get_override(b) == {"interval": 10_000, "burst": 1}
    assert store.acquire(b, 1000, 5, 1, -1, now=T0).allowed
    second = store.acquire(b, 1000, 5, 1, -1, now=T0)
    assert not second.allowed and second.wait_us == 10_000
    store.reset(b)
    assert store.get_override(b) == {}
    assert store.acquire(b, 1000, 5, 1, -1, now=T0).allowed


def test_adaptive_decrease_and_recovery(store):
    b = bucket()
    spec = AdaptiveSpec(decrease=0.5, min_factor=0.1, recovery_seconds=1.0)
    store.pause(b, 1000, 1, 0, adaptive=spec, now=T0)
    # right after throttling the interval doubles
    assert store.acquire(b, 1000, 1, 1, -1, now=T0 + 1000).allowed
    r = store.acquire(b, 1000, 1, 1, -1, now=T0 + 1000)
    assert not r.allowed and 1990 <= r.wait_us <= 2000  # recovers 0.1 % per ms
    # after the recovery time the configured rate is back
    late = T0 + 2_000_000
    assert store.acquire(b, 1000, 1, 1, -1, now=late).allowed
    r = store.acquire(b, 1000, 1, 1, -1, now=late)
    assert r.wait_us == 1000


def test_idle_bucket_expires_in_redis(redis_clean):
    store = RedisGcraStore(RedisConnector(redis_clean.db_url(3)))
    b = bucket(key="tenant")
    store.acquire(b, 1000, 1, 1, -1)
    ttl = redis_clean.client(3).pttl(b.tat)
    assert 0 < ttl <= 1002


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(interval=gcra.intervals, burst=gcra.bursts, steps=gcra.steps(max_size=60))
def test_lua_matches_the_oracle(redis_clean, interval, burst, steps):
    """Identical sequences through the Lua script and the Python oracle give identical decisions."""
    client = redis_clean.client(3)
    client.flushdb()
    store = RedisGcraStore(RedisConnector(redis_clean.db_url(3)))
    b = bucket("diff")
    state, now = None, T0
    for gap, cost, reserve in steps:
        now += gap
        cost = min(cost, burst)
        expected = gcra_acquire(state, now, interval, burst, cost, reserve)
        got = store.acquire(b, interval, burst, cost, reserve, now=now)
        assert (got.allowed, got.wait_us) == (expected.allowed, expected.wait_us)
        if expected.new_state is not None:
            state = expected.new_state
            assert client.get(b.tat).decode() == f"{state.allow_at} {state.full_at}"


def test_adaptive_throttle_holds_every_worker_for_exactly_the_pause(store):
    """10/s burst 60 adaptive, throttle(5 s): the first admission comes exactly when the pause ends.

    It used to come ~1.7 s late: the pause was kept as (burst - 1) intervals of the halved rate,
    which shrink as the rate recovers.
    """
    b = bucket()
    interval, burst, pause = 100_000, 60, 5_000_000
    store.pause(b, interval, burst, pause, adaptive=AdaptiveSpec(), now=T0)
    end = T0 + pause
    for t in (T0, T0 + 1_000_000, end - 1000):
        r = store.acquire(b, interval, burst, 1, -1, now=t)
        assert not r.allowed and r.wait_us == end - t, "the wait is exactly the rest of the pause"
    assert not store.acquire(b, interval, burst, 1, -1, now=end - 1).allowed
    assert store.acquire(b, interval, burst, 1, -1, now=end).allowed
    after = store.acquire(b, interval, burst, 1, -1, now=end)
    assert not after.allowed, "one token when the pause ends, then the (recovering) rate"


def test_a_cost_above_an_overridden_burst_waits_for_a_full_bucket(store):
    """`limit set --burst 1` under a task of cost 2: the call is admitted once the bucket is full
    (it used to be refused forever with the same short wait); the rest of its cost is debt."""
    b = bucket()
    store.set_override(b, interval=200_000, burst=1)
    assert store.acquire(b, 200_000, 2, 2, -1, now=T0).allowed  # idle: full, admitted
    refused = store.acquire(b, 200_000, 2, 2, -1, now=T0)
    assert not refused.allowed and refused.wait_us == 400_000  # both tokens of the debt
    assert not store.acquire(b, 200_000, 2, 2, -1, now=T0 + 399_999).allowed
    assert store.acquire(b, 200_000, 2, 2, -1, now=T0 + 400_000).allowed


@pytest.mark.parametrize("cost", [1, 3])
@pytest.mark.parametrize("asked", [0, 1_000_000, 4_900_000, 6_000_000])
def test_a_caller_sleeping_the_reported_wait_is_admitted(store, cost, asked):
    """Whenever a recovering limiter refuses, sleeping exactly the wait it reports gets in.

    Before, the waits were short by (burst - 1) x the interval's shrink meanwhile, so a task
    deferred for the reported wait was refused (and deferred) again.
    """
    b = bucket()
    interval, burst = 100_000, 60
    store.pause(b, interval, burst, 5_000_000, adaptive=AdaptiveSpec(), now=T0)
    t = T0 + asked
    while store.acquire(b, interval, burst, 1, -1, now=t).allowed:
        pass  # after the pause: drain what has refilled, so the caller below is refused
    refused = store.acquire(b, interval, burst, cost, -1, now=t)
    assert not refused.allowed and refused.wait_us > 0
    if cost == 1:
        assert not store.acquire(b, interval, burst, cost, -1, now=t + refused.wait_us - 1).allowed
    assert store.acquire(b, interval, burst, cost, -1, now=t + refused.wait_us).allowed


def test_a_reservation_during_a_pause_gets_the_slot_at_its_end(store):
    b = bucket()
    store.pause(b, 100_000, 60, 5_000_000, adaptive=AdaptiveSpec(), now=T0)
    waits = [store.acquire(b, 100_000, 60, 1, 10_000_000, now=T0).wait_us for _ in range(3)]
    assert waits == [5_000_000, 5_200_000, 5_400_000], "spaced at the halved rate from the pause's end"
    r = store.acquire(b, 100_000, 60, 1, -1, now=T0 + 5_000_000)
    assert not r.allowed and r.wait_us == 600_000


def test_throttle_without_adaptive_keeps_a_lowered_rate(store):
    """A plain pause on a limiter an earlier throttle slowed is computed at the slowed rate too."""
    b = bucket()
    store.pause(b, 100_000, 10, 0, adaptive=AdaptiveSpec(decrease=0.5, recovery_seconds=1e6), now=T0)
    store.pause(b, 100_000, 10, 1_000_000, now=T0)
    r = store.acquire(b, 100_000, 10, 1, -1, now=T0)
    assert not r.allowed and r.wait_us == 1_000_000


def test_adaptive_interval_rounds_the_same_in_both_stores(store):
    """interval / factor is floored the way Lua does it (1 µs / 0.1 is 10 µs, not 9)."""
    b = bucket()
    store.pause(b, 1, 1, 0, adaptive=AdaptiveSpec(decrease=0.1, min_factor=0.1), now=T0)
    assert store.acquire(b, 1, 1, 1, -1, now=T0).allowed
    assert store.acquire(b, 1, 1, 1, -1, now=T0).wait_us == 10


def test_adaptive_factor_is_stored_at_full_precision(store):
    b = bucket()
    spec = AdaptiveSpec()
    store.pause(b, 1000, 1, 0, adaptive=spec, now=T0)
    store.pause(b, 1000, 1, 0, adaptive=spec, now=T0 + 1_234_567)
    expected = max(spec.min_factor, (spec.decrease + spec.recover_per_us * 1_234_567) * spec.decrease)
    assert store.get_override(b)["factor"] == expected


def test_a_clock_behind_the_throttle_counts_as_no_time_passed(store):
    """After a failover the new server's clock may trail factor_at: the factor must not sink below its floor."""
    store.pause(bucket(key="slow"), 1000, 1, 0, adaptive=AdaptiveSpec(decrease=0.5, recovery_seconds=1.0), now=T0)
    b = bucket(key="other")  # same limiter, so the same factor; a bucket of its own
    assert store.acquire(b, 1000, 1, 1, -1, now=T0 - 10_000_000).allowed
    r = store.acquire(b, 1000, 1, 1, -1, now=T0 - 10_000_000)
    assert not r.allowed and r.wait_us == 2000


def test_snapshot_shows_the_rate_in_force_and_the_tokens(store):
    b = bucket()
    assert store.snapshot(b, 100_000, 5, now=T0) == GcraSnapshot(100_000, 5, None, 5, False)
    for _ in range(3):
        store.acquire(b, 100_000, 5, 1, -1, now=T0)
    assert store.snapshot(b, 100_000, 5, now=T0 + 150_000).tokens == 3
    store.pause(b, 100_000, 5, 1_000_000, adaptive=AdaptiveSpec(recovery_seconds=1.0), now=T0)
    paused = store.snapshot(b, 100_000, 5, now=T0 + 250_000)
    assert paused == GcraSnapshot(100_000 * 4 // 3, 5, 0.75, 0, False)  # factor 0.5 + 0.25 recovered
    assert store.snapshot(b, 100_000, 5, now=T0 + 1_000_000).tokens == 1, "one token as the pause ends"
    store.set_override(b, interval=None, burst=2)
    assert store.snapshot(b, 100_000, 5, now=T0 + 9_000_000) == GcraSnapshot(100_000, 2, None, 2, True)
    assert store.acquire(b, 100_000, 5, 1, -1, now=T0 + 9_000_000).allowed, "a snapshot changes nothing"


def test_reset_of_one_bucket_keeps_the_override(store):
    shared, keyed = bucket(), bucket(key="tenant")
    store.set_override(shared, interval=10_000, burst=1)
    store.pause(keyed, 1000, 1, 60_000_000, now=T0)
    store.reset(keyed, override=False)
    assert store.acquire(keyed, 1000, 1, 1, -1, now=T0).allowed, "the key's pause is gone"
    assert store.get_override(shared) == {"interval": 10_000, "burst": 1}


def test_a_tat_written_before_allow_at_is_read_as_a_wait(redis_clean):
    """A bucket a previous version wrote (one integer, its TAT) errs towards waiting, never admits early."""
    store = RedisGcraStore(RedisConnector(redis_clean.db_url(3)))
    b = bucket()
    redis_clean.client(3).set(b.tat, T0 + 500_000, px=10_000)
    r = store.acquire(b, 100_000, 3, 1, -1, now=T0)
    assert not r.allowed and r.wait_us == 500_000
    assert store.acquire(b, 100_000, 3, 1, -1, now=T0 + 500_000).allowed
    redis_clean.client(3).set(b.tat, "not a number", px=10_000)
    assert store.acquire(b, 100_000, 3, 1, -1, now=T0).allowed, "a foreign value is an idle bucket"


@pytest.mark.parametrize("name", ["}x", "a{b}c", "{", "", "}", "{}"])
def test_any_limiter_name_keeps_its_keys_in_one_slot(store, name):
    """On a Cluster a name starting with '}' (or empty) used to give an empty tag: CROSSSLOT."""
    shared, keyed = bucket(name), bucket(name, key="tenant")
    store.set_override(shared, interval=2000, burst=None)
    store.pause(keyed, 1000, 1, 0, adaptive=AdaptiveSpec(decrease=0.5, recovery_seconds=1e6), now=T0)
    assert store.acquire(shared, 1000, 1, 1, -1, now=T0).allowed
    assert store.acquire(shared, 1000, 1, 1, -1, now=T0).wait_us == 4000
    assert store.get_override(shared)["interval"] == 2000
    store.reset(shared)
    assert store.get_override(shared) == {}
    assert store.acquire(bucket("other"), 1000, 1, 1, -1, now=T0).allowed, "another limiter is untouched"


def test_charge_debits_without_waiting_and_the_debt_delays_later_acquires(store):
    """`limiter.charge(n)`: never refused, takes the tokens there are, and the rest is debt."""
    b = bucket()
    assert store.charge(b, 1000, 3, 2, now=T0) == 0, "2 of 3 tokens: no debt yet"
    assert store.acquire(b, 1000, 3, 1, -1, now=T0).allowed
    # empty now, next token at T0 + 1000: 5 more intervals of debt on top
    assert store.charge(b, 1000, 3, 5, now=T0) == 6000
    assert store.charge(b, 1000, 3, 1, now=T0 + 1000) == 6000, "debts add up; time pays them"
    refused = store.acquire(b, 1000, 3, 1, -1, now=T0 + 2000)
    assert not refused.allowed and refused.wait_us == 5000
    assert store.acquire(b, 1000, 3, 2, 10_000, now=T0 + 2000).wait_us == 6000, "a reservation queues behind it"
    assert not store.acquire(b, 1000, 3, 1, -1, now=T0 + 8999).allowed
    assert store.acquire(b, 1000, 3, 1, -1, now=T0 + 9000).allowed
    assert store.snapshot(b, 1000, 3, now=T0 + 9000).tokens == 0


def test_charge_uses_the_rate_in_force_and_is_bounded(store):
    b = bucket()
    store.set_override(b, interval=10_000, burst=1)
    assert store.charge(b, 1000, 5, 3, now=T0) == 30_000, "the overridden rate and burst: the 1 token, then 2 owed"
    huge = store.charge(bucket(key="runaway"), 1000, 1, 10**20, now=T0)
    assert huge == MAX_DEBT_US, "a runaway charge moves the next admission at most a year ahead"
    r = store.acquire(bucket(key="runaway"), 1000, 1, 1, -1, now=T0 + 1)
    assert not r.allowed and r.wait_us == MAX_DEBT_US - 1


def test_a_charged_key_lives_until_its_debt_is_paid(redis_clean):
    store = RedisGcraStore(RedisConnector(redis_clean.db_url(3)))
    b = bucket(key="tenant")
    debt = store.charge(b, 1000, 2, 10_000)  # the server's clock: ~10 s of debt
    assert debt == 10_000 * 1000 - 1000
    ttl = redis_clean.client(3).pttl(b.tat)
    assert debt // 1000 + 1000 - 50 <= ttl <= debt // 1000 + 1002, "TTL = debt + one interval + 1 s"


@pytest.mark.parametrize("policy", ["local", "allow", "deny"])
def test_a_charge_with_redis_down_never_raises(fault_redis, caplog, policy):
    """`local` debits the process's fallback bucket; `allow` and `deny` drop it; logged once."""
    from celery_tuning.policy.rates import Rate
    from celery_tuning.ratelimit import GcraLimiter

    lim = GcraLimiter("tokens", Rate(10, 1.0), 2, store=RedisGcraStore(RedisConnector(fault_redis.url)),
                      on_redis_error=policy)
    fault_redis.close()
    with caplog.at_level("WARNING", logger="celery_tuning.ratelimit"):
        debts = [lim.charge(12), lim.charge(1)]
    assert len([r for r in caplog.records if "tuning Redis failed" in r.getMessage()]) == 1
    if policy == "local":
        assert 0.9 < debts[1] <= 1.2, "the fallback bucket holds the debt"
        assert not lim.try_acquire()
    else:
        assert debts == [0.0, 0.0]


# Stacked limits: one decision over several buckets (gcra_acquire_many.lua). A limiter's shared and
# per-key buckets share its hash tag, so these run on the Cluster too.


def stacked(*entries):
    from celery_tuning.storage.gcra import StackedBucket

    return [StackedBucket(*entry) for entry in entries]


def test_a_stack_charges_a_bucket_that_is_full_by_the_calls_time_as_idle_after_a_rate_change(store):
    """Found by the differential machine: a per-key bucket charged at 1 µs per token is full again
    3 + 10 µs later by its stored reckoning; an adaptive throttle then makes the limiter's interval
    10 µs; a stacked call reserved 20 µs ahead must see that bucket as idle at its time (as a call
    decided then would), in both stores. Redis used the bucket as read before and charged it
    8 intervals more than the memory store."""
    shared, tenant = bucket(), bucket(key="tenant-b")
    assert store.acquire(shared, 1, 11, 13, -1, now=T0).allowed
    assert store.acquire(tenant, 1, 11, 13, -1, now=T0).allowed  # allow_at T0+3, full_at T0+13
    store.pause(shared, 1, 11, 0, AdaptiveSpec(decrease=0.1, min_factor=0.1, recovery_seconds=0.5), now=T0)
    decided = store.acquire_many(stacked((shared, 1, 11, 3), (tenant, 1, 11, 2)), 250_000, now=T0)
    assert decided.allowed
    probes = [tuple(store.acquire(b, 1, 11, 13, -1, now=T0)[:2]) for b in (shared, tenant)]
    assert probes == [(False, 133), (False, 43)], probes


def test_a_stack_admits_only_when_every_bucket_admits_and_takes_all_or_none(store):
    loose, tight = bucket(), bucket(key="tenant")
    stack = stacked((loose, 1000, 5, 1), (tight, 10_000, 2, 1))
    assert [tuple(store.acquire_many(stack, -1, now=T0)) for _ in range(2)] == [(True, 0, 0), (True, 0, 0)]
    refused = store.acquire_many(stack, -1, now=T0)
    assert tuple(refused) == (False, 10_000, 1), "the longest wait, and the bucket it is"
    for _ in range(3):
        assert not store.acquire_many(stack, -1, now=T0).allowed
    assert store.snapshot(loose, 1000, 5, now=T0).tokens == 3, "refused calls spent nothing"
    assert store.snapshot(tight, 10_000, 2, now=T0).tokens == 0
    reserved = store.acquire_many(stack, 20_000, now=T0)
    assert tuple(reserved) == (True, 10_000, 1), "a slot in every bucket, the call's at the latest"
    # Every bucket is charged as of the call's time, T0 + 10 ms: the loose one is full again by
    # then and gives one of its 5 (charged at T0 it would let the next call run 10 ms early).
    assert store.snapshot(loose, 1000, 5, now=T0 + 10_000).tokens == 4
    # cost 3 in the loose bucket, 1 in the tight one
    assert not store.acquire(tight, 10_000, 2, 1, -1, now=T0 + 19_999).allowed
    heavy = stacked((loose, 1000, 5, 3), (tight, 10_000, 2, 1))
    assert tuple(store.acquire_many(heavy, -1, now=T0 + 20_000)) == (True, 0, 0)
    assert tuple(store.acquire_many(heavy, -1, now=T0 + 20_000)) == (False, 10_000, 1)


def test_a_stack_reads_each_limiters_override_and_waits_for_the_slowest(store):
    a, b = bucket(key="a"), bucket(key="b")
    store.set_override(a, interval=50_000, burst=1)  # one conf per limiter: both buckets see it
    stack = stacked((a, 1000, 1, 1), (b, 1000, 3, 2))  # b's cost 2 above the burst 1 in force: 1 owed
    assert tuple(store.acquire_many(stack, -1, now=T0)) == (True, 0, 0)
    assert tuple(store.acquire_many(stack, -1, now=T0)) == (False, 100_000, 1)
    assert tuple(store.acquire_many(stack, 100_000, now=T0)) == (True, 100_000, 1)
    # a paid too, as of the call's time (T0 + 100 ms): its next slot is 50 ms after that
    assert tuple(store.acquire_many(stacked((a, 1000, 1, 1)), -1, now=T0)) == (False, 150_000, 0), "a paid too"


def test_a_stack_names_no_bucket_twice(store):
    from celery_tuning import ConfigurationError

    with pytest.raises(ConfigurationError, match="appears twice"):
        store.acquire_many(stacked((bucket(), 1000, 1, 1), (bucket(), 2000, 1, 1)), -1, now=T0)


def test_a_stack_of_different_limiters_is_one_script_except_on_a_cluster(store):
    """Different limiters' keys are in different Cluster slots: refused there, with a clear error."""
    from celery_tuning import ConfigurationError

    stack = stacked((bucket("per-second"), 100_000, 1, 1), (bucket("per-hour"), 1000, 2, 1))
    connector = getattr(store, "connector", None)
    if connector is not None and connector.target.kind == "cluster":
        with pytest.raises(ConfigurationError, match="must share a slot"):
            store.acquire_many(stack, -1, now=T0)
        return
    assert store.acquire_many(stack, -1, now=T0).allowed
    assert tuple(store.acquire_many(stack, -1, now=T0)) == (False, 100_000, 0)
    assert store.snapshot(bucket("per-hour"), 1000, 2, now=T0).tokens == 1


def test_a_stacked_task_is_refused_on_a_cluster_when_it_is_bound(cluster_clean):
    from celery import Celery

    import celery_tuning
    from celery_tuning import ConfigurationError, TunedTask, rate_limit

    app = Celery("stack-cluster", set_as_current=False, task_cls="celery_tuning:TunedTask")
    app.conf.update(tuning_redis_url=cluster_clean.url, tuning_rate_limits={"hourly": "5000/h"})
    celery_tuning.install(app)

    @app.task(base=TunedTask, name="stacked_on_cluster", shared=False)
    @rate_limit("10/s")
    @rate_limit("hourly")
    def f():
        pass

    with pytest.raises(ConfigurationError, match="stacked @rate_limit .* not supported on Redis Cluster"):
        f.run  # noqa: B018 - binding happens on first access


#: 2-4 buckets, each (interval µs, burst).
stacks = st.lists(st.tuples(gcra.intervals, gcra.bursts), min_size=2, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stack=stacks, steps=gcra.steps(max_size=30))
def test_the_stack_script_matches_the_oracle_bucket_by_bucket(redis_clean, stack, steps):
    """Each bucket of gcra_acquire_many.lua is gcra_acquire; all admit and are written, or none is."""
    client = redis_clean.client(3)
    client.flushdb()
    store = RedisGcraStore(RedisConnector(redis_clean.db_url(3)))
    buckets = [bucket(f"s{i}") for i in range(len(stack))]
    states = [None] * len(stack)
    now = T0
    for gap, cost, reserve in steps:
        now += gap  # a cost above a bucket's burst waits for it to be full
        results = [gcra_acquire(state, now, interval, burst, cost, reserve)
                   for state, (interval, burst) in zip(states, stack)]
        waits = [r.wait_us for r in results]
        expected = (all(r.allowed for r in results), max(waits), waits.index(max(waits)))
        before = [client.get(b.tat) for b in buckets]
        got = store.acquire_many(stacked(*[(b, interval, burst, cost) for b, (interval, burst) in zip(buckets, stack)]),
                                 reserve, now=now)
        assert tuple(got) == expected
        after = [client.get(b.tat) for b in buckets]
        if expected[0]:  # every bucket charged as of the call's time, now + the longest wait
            states = [gcra_acquire(state, now + expected[1], interval, burst, cost, 0).new_state
                      for state, (interval, burst) in zip(states, stack)]
            assert [raw.decode() for raw in after] == [f"{s.allow_at} {s.full_at}" for s in states]
        else:
            assert after == before, "a refused stack writes no bucket"


# Tiers: a limiter's per_key gives listed keys a rate and burst of their own; the stores see only
# the interval and burst each bucket is decided with.


def test_two_keys_with_different_tiers_admit_at_their_own_rates(store):
    from celery_tuning.policy.rates import Rate
    from celery_tuning.ratelimit import GcraLimiter

    now = [T0]
    store.clock = lambda: now[0]  # one manual clock for the memory and the Redis stores
    lim = GcraLimiter("openai", Rate(20, 1.0), 2, store=store,
                      per_key={"enterprise": {"rate": "100/s", "burst": 5}, 7: "1/s"})
    admitted = {k: sum(lim.try_acquire(key=k) for _ in range(10)) for k in ("enterprise", "free", 7)}
    assert admitted == {"enterprise": 5, "free": 2, 7: 1}, "each key's burst (7 matched as '7')"
    assert not lim.try_acquire(key="enterprise")
    now[0] += 10_000  # 10 ms: one enterprise token (100/s), none for the default tier (20/s)
    assert (lim.try_acquire(key="enterprise"), lim.try_acquire(key="free")) == (True, False)
    assert lim.decide(key="free").wait == pytest.approx(0.04), "20/s: 50 ms after the last"
    assert lim.snapshot(key="enterprise").burst == 5 and lim.snapshot(key="free").burst == 2
    assert lim.tier("free", tier="60/m").burst == 1
    # charge() debits at the key's tier: the next token, then 3 owed (10 ms each at 100/s, 50 at 20/s)
    assert lim.charge(3, key="enterprise") == pytest.approx(0.01 + 0.03)
    assert lim.charge(3, key="free") == pytest.approx(0.04 + 0.15)
    # a run-time override of the limiter wins for every key, tiers included
    now[0] += 10_000_000
    lim.override(Rate(10, 1.0), burst=1)
    assert [lim.try_acquire(key=k) for k in ("enterprise", "enterprise", "free")] == [True, False, True]
    lim.reset()
    now[0] += 1_000_000
    assert sum(lim.try_acquire(key="enterprise") for _ in range(9)) == 5, "back to the tier's burst"


def test_a_stack_decides_each_part_at_its_keys_tier(store):
    from celery_tuning.policy.rates import Rate
    from celery_tuning.ratelimit import GcraLimiter, decide_all

    now = [T0]
    store.clock = lambda: now[0]
    lim = GcraLimiter("api", Rate(1, 1.0), 1, store=store, per_key={"big": {"rate": "10/s", "burst": 3}})
    parts = [(lim, 1, None), (lim, 1, "big")]
    assert decide_all(parts).decision.allowed
    assert not decide_all(parts).decision.allowed, "the shared bucket (1/s, burst 1) refuses"
    assert decide_all([(lim, 1, "small"), (lim, 1, "big")]).decision.allowed
    explicit = [(lim, 1, "other"), (lim, 1, "vip", {"rate": "1/s"})]  # a tier given per call wins
    assert decide_all(explicit).decision.allowed
    refused = decide_all(explicit)
    assert not refused.decision.allowed and refused.decision.wait == pytest.approx(1.0), "burst 1 at 1/s"


@pytest.mark.parametrize("cost", [10**13, 10**16, 10**19])
def test_a_huge_cost_is_at_most_a_year_of_debt_and_every_store_agrees(store, cost):
    """Past ~230 years of debt the scripts' floats lost precision, and from 1e16 the script failed:
    reported as an outage, admitted by the local fallback, the debt never reached Redis."""
    from celery_tuning.policy.rates import Rate
    from celery_tuning.ratelimit import GcraLimiter, decide_all
    from celery_tuning.storage.gcra import MAX_DEBT_US

    now = [T0]
    store.clock = lambda: now[0]
    lim = GcraLimiter("huge", Rate(100, 1.0), 5, store=store)
    first = lim.decide(cost)
    assert first.allowed and first.source == ("redis" if isinstance(store, RedisGcraStore) else first.source)
    after = lim.decide(1)
    assert not after.allowed and after.source == first.source
    assert after.wait == pytest.approx(MAX_DEBT_US / 1e6, rel=1e-6), "a year of debt, not more, not lost"
    assert not decide_all([(lim, cost, "k"), (lim, 1, None)]).decision.allowed, "the stack: refused, no error"
