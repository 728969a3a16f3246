"""Differential state machine: random sequences through the memory GCRA store and the Redis one must agree.

One manual clock drives both (the Redis store sends it to the scripts as their "now"). Every
operation a limiter or the CLI performs is a rule: acquire with cost, reserve and per-key buckets;
a stacked decision over several buckets (``gcra_acquire_many.lua``, all or none; on a Cluster only
the buckets of one limiter, which share its slot);
charge (debit after the call, debt included); pause with and without adaptive mode; time passing
(adaptive recovery); the CLI's rate override and reset; and Redis losing everything (FLUSHDB), whose
reference is a memory store that never saw anything. Any difference in a decision, a snapshot or an
override fails, and so does a refused caller that is not admitted after sleeping exactly the wait it
was told.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from celery_tuning.policy.rates import Rate
from celery_tuning.ratelimit import GcraLimiter, decide_all, hash_key
from celery_tuning.storage.gcra import AdaptiveSpec, Bucket, MemoryGcraStore, RedisGcraStore, StackedBucket
from celery_tuning.storage.redis import RedisConnector

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000_000
#: Limiter names, the odd ones included: their keys must stay in one Cluster slot.
NAMES = ["api", "}x"]
KEYS = [None, "tenant-a", "tenant-b"]
SPECS = [None, AdaptiveSpec(), AdaptiveSpec(decrease=0.5, min_factor=0.1, recovery_seconds=1.0),
         AdaptiveSpec(decrease=0.1, min_factor=0.1, recovery_seconds=0.5)]
#: Largest burst any rule sets: a probe asking for more is always refused and changes nothing.
MAX_BURST = 12

names = st.sampled_from(NAMES)
keys = st.sampled_from(KEYS)
specs = st.sampled_from(range(len(SPECS)))
intervals = st.one_of(st.integers(1, 50), st.integers(1, 500_000), st.sampled_from([1000, 100_000, 1_000_000]))
bursts = st.integers(1, MAX_BURST)
reserves = st.sampled_from([-1, 0, 1, 1000, 250_000, 86_400_000_000])
#: µs the clock moves before an operation: often not at all, often a little (adaptive recovery
#: turns any gap into a factor with 17 significant digits), now and then a lot.
steps = st.one_of(st.just(0), st.integers(1, 5_000), st.integers(5_000, 3_000_000))
gaps = st.one_of(steps, st.sampled_from([30_000_000, 120_000_000]))
pauses = st.one_of(st.integers(0, 1_000), st.integers(0, 10_000_000))
#: Tokens charged after a call: a few, many (debt of many intervals), and a runaway (capped at a year).
charges = st.one_of(st.integers(1, 4), st.integers(1, 200), st.sampled_from([10**9, 10**20]))


class GcraStoresAgree(RuleBasedStateMachine):
    """The machine; ``connect`` and ``flush`` are set by the test that runs it (single server or Cluster)."""

    connect: Callable[[], RedisConnector]
    flush: Callable[[], None]
    #: On a Cluster a stack takes the buckets of one limiter only (different limiters: other slots).
    cluster: bool = False

    def __init__(self) -> None:
        super().__init__()
        type(self).flush()
        self.now = T0
        self.memory = MemoryGcraStore(clock=self.clock)
        self.redis = RedisGcraStore(type(self).connect(), clock=self.clock)
        self.config: Dict[str, Tuple[int, int]] = {}
        self.limiters: Dict[Tuple[str, str, int], GcraLimiter] = {}

    def clock(self) -> int:
        return self.now

    @initialize(data=st.data())
    def configure(self, data: Any) -> None:
        for name in NAMES:
            self.config[name] = (data.draw(intervals, label=f"{name} interval"),
                                 data.draw(bursts, label=f"{name} burst"))

    def both(self, call: Callable[[Any], Any]) -> Any:
        expected, got = call(self.memory), call(self.redis)
        assert got == expected, f"memory store says {expected!r}, Redis says {got!r}"
        return expected

    def limiter(self, store: str, name: str, spec: int) -> GcraLimiter:
        lim = self.limiters.get((store, name, spec))
        if lim is None:
            interval, burst = self.config[name]
            lim = GcraLimiter(name, Rate(1_000_000 / interval, 1.0), burst,
                              store=self.memory if store == "memory" else self.redis,
                              adaptive=SPECS[spec], on_redis_error="deny", sleep=_no_sleep)
            assert lim.interval == interval
            self.limiters[(store, name, spec)] = lim
        return lim

    def limiters_agree(self, name: str, spec: int, call: Callable[[GcraLimiter], Any]) -> Any:
        expected = call(self.limiter("memory", name, spec))
        got = call(self.limiter("redis", name, spec))
        assert got == expected, f"memory store says {expected!r}, Redis says {got!r}"
        return expected

    @staticmethod
    def bucket(name: str, key: Optional[str]) -> Bucket:
        return Bucket.for_limiter("tuning", name, None if key is None else hash_key(key))

    @rule(gap=gaps)
    def time_passes(self, gap: int) -> None:
        self.now += gap

    @rule(name=names, key=keys, cost=st.integers(1, 4), reserve=reserves, gap=steps)
    def acquire(self, name: str, key: Optional[str], cost: int, reserve: int, gap: int) -> None:
        self.now += gap
        interval, burst = self.config[name]
        b = self.bucket(name, key)
        self.both(lambda s: tuple(s.acquire(b, interval, burst, cost, reserve)[:2]))

    @rule(name=names, key=keys, cost=st.integers(1, 4), gap=steps,
          paused=st.one_of(st.none(), st.tuples(pauses, st.sampled_from(range(1, len(SPECS))))))
    def sleep_the_reported_wait(self, name: str, key: Optional[str], cost: int, gap: int,
                                paused: Optional[Tuple[int, int]]) -> None:
        """A refused caller that sleeps exactly the wait it was told is admitted; for cost 1 not a µs sooner.

        ``paused``: an adaptive throttle just before, so the wait spans a pause and a recovering
        rate (its first admission must come exactly when the pause ends); other throttles come
        before this rule in random order.
        """
        interval, burst = self.config[name]
        b = self.bucket(name, key)
        if paused is not None:
            self.both(lambda s: s.pause(b, interval, burst, paused[0], SPECS[paused[1]]))
        self.now += gap
        if cost > int(self.memory.get_override(self.bucket(name, None)).get("burst", burst)):
            return  # never admitted, at any wait
        allowed, wait = self.both(lambda s: tuple(s.acquire(b, interval, burst, cost, -1)[:2]))
        if allowed:
            return
        start = self.now
        if cost == 1:
            self.now = start + wait - 1
            assert not self.both(lambda s: s.acquire(b, interval, burst, cost, -1).allowed), "admitted early"
        self.now = start + wait
        assert self.both(lambda s: s.acquire(b, interval, burst, cost, -1).allowed), "refused after the wait"

    @rule(name=names, key=keys, cost=st.integers(1, 4), reserve=st.sampled_from([None, 0.0, 0.001, 0.25, 3600.0]),
          gap=steps)
    def decide(self, name: str, key: Optional[str], cost: int, reserve: Optional[float], gap: int) -> None:
        self.now += gap  # a cost above the burst (a callable cost's big call) waits for a full bucket
        self.limiters_agree(name, 0, lambda lim: lim.decide(cost, reserve=reserve, key=key))

    def stack_of(self, data: Any) -> List[Tuple[str, Optional[str]]]:
        pairs = data.draw(st.lists(st.tuples(names, keys), min_size=1, max_size=4, unique=True), label="stack")
        if type(self).cluster:
            pairs = [(pairs[0][0], key) for key in dict.fromkeys(key for _, key in pairs)]
        return pairs

    @rule(data=st.data(), reserve=reserves, gap=steps)
    def acquire_many(self, data: Any, reserve: int, gap: int) -> None:
        """A stacked ``@rate_limit``: every bucket admits and pays, or none pays (a refusal writes nothing)."""
        self.now += gap
        entries = [StackedBucket(self.bucket(name, key), *self.config[name], data.draw(st.integers(1, 4), label="cost"))
                   for name, key in self.stack_of(data)]
        self.both(lambda s: tuple(s.acquire_many(entries, reserve)))

    @rule(data=st.data(), reserve=st.sampled_from([None, 0.0, 0.001, 0.25, 3600.0]), gap=steps)
    def decide_stack(self, data: Any, reserve: Optional[float], gap: int) -> None:
        """``decide_all`` over limiters: costs of 0 are left out, one part is a plain decide."""
        self.now += gap
        parts = [(name, data.draw(st.integers(0, 4), label="cost"), key) for name, key in self.stack_of(data)]

        def decide(store: str) -> Any:
            decision, lim = decide_all([(self.limiter(store, name, 0), cost, key) for name, cost, key in parts],
                                       reserve=reserve)
            return decision, lim.name

        expected, got = decide("memory"), decide("redis")
        assert got == expected, f"memory store says {expected!r}, Redis says {got!r}"

    @rule(name=names, key=keys, n=charges, gap=steps)
    def charge(self, name: str, key: Optional[str], n: int, gap: int) -> None:
        """``gcra_charge.lua``: debit after the call, never refused; the debt must agree to the µs."""
        self.now += gap
        interval, burst = self.config[name]
        b = self.bucket(name, key)
        self.both(lambda s: s.charge(b, interval, burst, n))

    @rule(name=names, key=keys, n=st.one_of(st.just(0), charges), gap=steps)
    def limiter_charge(self, name: str, key: Optional[str], n: int, gap: int) -> None:
        """``celery_tuning.limiter(name).charge(n, key=...)``: the seconds of debt it reports agree."""
        self.now += gap
        self.limiters_agree(name, 0, lambda lim: lim.charge(n, key=key))

    @rule(name=names, key=keys, pause=pauses, spec=specs, gap=steps)
    def pause(self, name: str, key: Optional[str], pause: int, spec: int, gap: int) -> None:
        self.now += gap
        interval, burst = self.config[name]
        b = self.bucket(name, key)
        self.both(lambda s: s.pause(b, interval, burst, pause, SPECS[spec]))

    @rule(name=names, key=keys, retry_after=st.sampled_from([0.0, 0.001, 0.5, 5.0, 30.0]), spec=specs, gap=steps)
    def throttle(self, name: str, key: Optional[str], retry_after: float, spec: int, gap: int) -> None:
        self.now += gap
        self.limiters_agree(name, spec, lambda lim: lim.throttle(retry_after, key=key))

    @rule(name=names, interval=st.one_of(st.none(), intervals), burst=st.one_of(st.none(), bursts))
    def override(self, name: str, interval: Optional[int], burst: Optional[int]) -> None:
        """``celery tuning limit set NAME RATE [--burst N]``."""
        b = self.bucket(name, None)
        self.both(lambda s: s.set_override(b, interval, burst))

    @rule(name=names)
    def reset(self, name: str) -> None:
        """``celery tuning limit reset NAME``."""
        b = self.bucket(name, None)
        self.both(lambda s: s.reset(b))

    @rule(name=names, key=st.sampled_from(KEYS[1:]))
    def reset_one_key(self, name: str, key: str) -> None:
        """``celery tuning limit reset NAME --key KEY``: that bucket only, the override stays."""
        b = self.bucket(name, key)
        self.both(lambda s: s.reset(b, override=False))

    @rule()
    def redis_loses_everything(self) -> None:
        """FLUSHDB, or a restart without persistence: the reference is a store that never saw anything."""
        type(self).flush()
        self.memory = MemoryGcraStore(clock=self.clock)
        for (store, _, _), lim in self.limiters.items():
            if store == "memory":
                lim.store = self.memory

    @invariant()
    def buckets_agree(self) -> None:
        """Probe every bucket with a cost no burst allows: always refused, changes nothing, shows its TAT."""
        if not self.config:
            return
        for name in NAMES:
            interval, burst = self.config[name]
            for key in KEYS:
                b = self.bucket(name, key)
                self.both(lambda s, b=b, i=interval, n=burst: tuple(s.acquire(b, i, n, MAX_BURST + 1, -1)[:2]))

    @invariant()
    def snapshots_agree(self) -> None:
        """``celery tuning limit show``: rate in force, factor and tokens, as each store sees them."""
        for name in NAMES:
            if name not in self.config:
                return
            interval, burst = self.config[name]
            for key in KEYS:
                b = self.bucket(name, key)
                self.both(lambda s, b=b, i=interval, n=burst: s.snapshot(b, i, n))

    @invariant()
    def overrides_agree(self) -> None:
        for name in NAMES:
            b = self.bucket(name, None)
            self.both(lambda s, b=b: {k: float(v) for k, v in s.get_override(b).items()})


def _no_sleep(seconds: float) -> None:
    raise AssertionError("decide() and throttle() never sleep")


def run(connect: Callable[[], RedisConnector], flush: Callable[[], None], examples: int, cluster: bool = False) -> None:
    GcraStoresAgree.connect = staticmethod(connect)  # type: ignore[assignment]
    GcraStoresAgree.flush = staticmethod(flush)  # type: ignore[assignment]
    GcraStoresAgree.cluster = cluster
    run_state_machine_as_test(GcraStoresAgree, settings=settings(
        max_examples=examples, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_memory_and_redis_agree(redis_clean):
    connector = RedisConnector(redis_clean.db_url(3))
    client = redis_clean.client(3)
    run(lambda: connector, client.flushdb, examples=60)


def test_memory_and_cluster_agree(cluster_clean):
    connector = RedisConnector(cluster_clean.url)
    clients: List[Any] = [node.client() for node in cluster_clean.nodes]

    def flush() -> None:
        for client in clients:
            client.flushall()

    run(lambda: connector, flush, examples=15, cluster=True)
