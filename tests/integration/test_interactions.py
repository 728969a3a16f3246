"""The interaction table, cell by cell: every outcome through every step around it, on a real Redis.

Each row of ``celery_tuning.integration.interactions.OUTCOMES`` is produced by a task that has
every step (and once more by the producer paired with each outer step alone), run as a worker
runs it: through Celery's tracer (``build_tracer(eager=False)``), with its signals, the result
backend and the broker on the tests' redis-server. What each outer step did is then read back
from Redis itself (cache entries and locks, the breaker's failure count, the bucket's arrival
time, lease removals) and from the SLA timing signal, and compared with the row.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional

import pytest
from celery.app.trace import build_tracer
from celery.exceptions import Ignore, Reject

from celery_tuning import (
    ConcurrencyLimited,
    Throttled,
    cache_result,
    circuit_breaker,
    concurrency_limit,
    rate_limit,
    signals,
    sla,
)
from celery_tuning.integration import interactions as ix
from celery_tuning.integration.registry import breaker_for, concurrency_limiter_for, limiter_for
from celery_tuning.integration.runtime import runtime_for
from celery_tuning.integration.slots import HEADER_SLOT
from tests.support.apps import make_app

pytestmark = pytest.mark.integration

BODY_VALUE, FALLBACK_VALUE = "computed", "degraded"
RL, CB, CC = "ix-rl", "ix-cb", "ix-cc"
RL_KEY, CB_KEY, CC_KEY = f"tuning:rl:{{{RL}}}", f"tuning:cb:{{{CB}}}", f"tuning:cc:{{{CC}}}"
DEFERRED = "runs again later, same id, no retry spent"


@dataclass
class Recipe:
    """How a task produces one outcome: its body, its step options, and state set up beforehand."""

    body: Callable[[Any], Any] = lambda task: BODY_VALUE
    rate_limit: Dict[str, Any] = field(default_factory=dict)
    breaker: Dict[str, Any] = field(default_factory=dict)
    concurrency: Dict[str, Any] = field(default_factory=dict)
    open_breaker: bool = False
    drain_limiter: bool = False
    take_slot: bool = False


def _raise(exc: BaseException) -> Callable[[Any], Any]:
    def body(task: Any) -> Any:
        raise exc

    return body


def _retry(task: Any) -> Any:
    raise task.retry(countdown=600, max_retries=5)


RECIPES: Dict[str, Recipe] = {
    "value": Recipe(),
    "exception": Recipe(body=_raise(ValueError("the service broke"))),
    "fallback": Recipe(breaker={"fallback": lambda x: FALLBACK_VALUE}, open_breaker=True),
    "CircuitOpen": Recipe(breaker={"on_open": "fail"}, open_breaker=True),
    "breaker deferral": Recipe(breaker={"on_open": "retry"}, open_breaker=True),
    "ConcurrencyLimited": Recipe(concurrency={"max_deferrals": 0}, take_slot=True),
    "concurrency deferral": Recipe(take_slot=True),
    "RateLimited": Recipe(rate_limit={"on_limit": "raise"}, drain_limiter=True),
    "rate-limit deferral": Recipe(rate_limit={"on_limit": "defer"}, drain_limiter=True),
    "Throttled": Recipe(body=_raise(Throttled(retry_after=2.0))),
    "Retry": Recipe(body=_retry),
    "Ignore": Recipe(body=_raise(Ignore())),
    "Reject": Recipe(body=_raise(Reject("not for us", requeue=False))),
}

#: What the caller sees, as the table words it, from what the tracer and the broker show.
_EXCEPTIONS = {"ValueError": "the exception", "CircuitOpen": "`CircuitOpen`",
               "ConcurrencyLimited": "`ConcurrencyLimited`", "RateLimited": "`RateLimited`"}


def stacks(outcome: ix.Outcome) -> List[FrozenSet[str]]:
    """Every step at once, then the producer with each step around it alone (every pair)."""
    producer = set() if outcome.producer == "body" else {outcome.producer}
    outer = ix.STEPS[:ix.STEPS.index(outcome.producer)] if outcome.producer != "body" else ix.STEPS
    return [frozenset(ix.STEPS)] + [frozenset(producer | {step}) for step in outer]


CELLS = [pytest.param(outcome, stack, id=f"{outcome.name}-{'+'.join(s for s in ix.STEPS if s in stack)}")
         for outcome in ix.OUTCOMES for stack in stacks(outcome)]
_names = itertools.count()


def test_every_row_has_a_recipe_and_the_doc_is_current():
    assert sorted(RECIPES) == sorted(o.name for o in ix.OUTCOMES)
    from tests.support.workers import ROOT

    page = (ROOT / "docs" / "architecture.md").read_text()
    assert ix.render_interactions_markdown() in page, "run: python docs/generate_interactions.py"


def define(app: Any, recipe: Recipe, stack: FrozenSet[str]) -> Any:
    name = f"ix.task{next(_names)}"

    def work(self: Any, x: int) -> Any:
        return recipe.body(self)

    fun: Any = work
    if "rate_limit" in stack:
        fun = rate_limit(RL, **recipe.rate_limit)(fun)
    if "concurrency" in stack:
        fun = concurrency_limit(CC, **recipe.concurrency)(fun)
    if "breaker" in stack:
        fun = circuit_breaker(CB, **recipe.breaker)(fun)
    if "cache" in stack:
        fun = cache_result(ttl=300, l1_ttl=60)(fun)
    if "sla" in stack:
        fun = sla(warning=300)(fun)
    app.task(bind=True, shared=False, name=name, max_retries=5)(fun)
    return app.tasks[name]


@dataclass
class Seen:
    """What one run left behind."""

    sees: str
    sla: Optional[str]
    cache: str
    breaker: str
    lease: str
    token: str


def run_cell(redis: Any, outcome: ix.Outcome, stack: FrozenSet[str]) -> Seen:
    # Deferrals read back as the re-published message on the broker: pinned to countdown (parked
    # deferrals go through the same steps; tests/integration/test_parking.py covers them).
    app = make_app(redis, "interactions", tuning_defer_via="countdown",
                   tuning_rate_limits={RL: {"rate": "1/m", "burst": 1}},
                   tuning_circuit_breakers={CB: {"fail_max": 5, "reset_timeout": 60}},
                   tuning_concurrency_limits={CC: 1}, tuning_timing=True)
    recipe = RECIPES[outcome.name]
    runtime = runtime_for(app)
    task = define(app, recipe, stack)
    tuning, broker = redis.client(1), redis.client(0)

    breaker = breaker_for(runtime, CB)
    if recipe.open_breaker:
        breaker.open()
    else:  # one failure on record tells success (reset to 0), failure (2) and neither (1) apart
        breaker.record_failure(RuntimeError("seed"), False)
    if recipe.drain_limiter:
        assert limiter_for(runtime, RL).try_acquire()
    held = None
    if recipe.take_slot:  # given back below: the process's renewer would keep it alive into later tests
        held = concurrency_limiter_for(runtime, CC).acquire()
        assert held.granted

    def zrems() -> int:
        return int(tuning.info("commandstats").get("cmdstat_zrem", {}).get("calls", 0))

    tat_before, zrem_before, held_before = tuning.get(RL_KEY), zrems(), tuning.zcard(CC_KEY)
    timed: Dict[str, str] = {}
    finished: Dict[str, Any] = {}

    def on_timed(sender: Any = None, task_id: Any = None, state: Any = None, **_: Any) -> None:
        timed[task_id] = state

    signals.task_timed.connect(on_timed, weak=False)
    try:
        tracer = build_tracer(task.name, task, app=app, eager=False)
        task_id = f"cell-{next(_names)}"
        request = {"id": task_id, "task": task.name, "delivery_info": {"routing_key": "celery", "exchange": ""},
                   "hostname": "ix@host", "headers": None}
        retval, info = tracer(task_id, (7,), {}, request)[:2]
        finished["retval"], finished["state"] = retval, (info.state if info is not None else "SUCCESS")
    finally:
        signals.task_timed.disconnect(on_timed)
    if "cache" in stack:
        task.cache.flush()

    republished = [json.loads(raw)["headers"] for raw in broker.lrange("celery", 0, -1)]
    mine = [h for h in republished if h.get("id") == task_id]
    deferred = [h for h in mine if h.get("tuning_deferrals")]

    state, value = finished["state"], finished["retval"]
    if deferred:
        sees = DEFERRED
    elif state == "SUCCESS":
        sees = {BODY_VALUE: "the body's value", FALLBACK_VALUE: "the fallback's value"}.get(value, repr(value))
    elif state == "FAILURE":
        exc = getattr(value, "exception", value)
        sees = _EXCEPTIONS.get(type(exc).__name__, repr(exc))
    else:
        sees = {"RETRY": "Celery's retry", "IGNORED": "nothing: the attempt is ignored",
                "REJECTED": "the message is rejected"}.get(state, state)

    values = [k for k in tuning.keys("tuning:cache:*") if not k.endswith((b":lock", b":gen"))]
    assert tuning.keys("tuning:cache:*:lock") == [], "a single-flight lock outlived the call"
    if "cache" in stack:
        found, _ = task.cache.get(7)
        assert found == bool(values), "L1 and L2 disagree"
    cache = ix.STORED if values else ix.NOT_STORED

    failures = int(tuning.hget(CB_KEY, "failures") or 0)
    breaker_seen = ix.NONE if recipe.open_breaker else {0: ix.SUCCESS, 1: ix.NOT_COUNTED}.get(failures, ix.FAILURE)

    held_after = tuning.zcard(CC_KEY)
    assert held_after == held_before, "a concurrency lease outlived the call"
    lease = ix.NONE if recipe.take_slot else (ix.FREED if zrems() > zrem_before else ix.NOT_TAKEN)
    if held is not None:
        concurrency_limiter_for(runtime, CC).release(held)

    tat_after = tuning.get(RL_KEY)
    if tat_after == tat_before:
        token = ix.NOT_SPENT
    else:
        assert int(tat_after.split()[0]) > int((tat_before or b"0").split()[0])  # allow_at moved on
        token = ix.RESERVED if any(isinstance(h.get(HEADER_SLOT), dict) for h in deferred) else ix.SPENT
    return Seen(sees, timed.get(task_id), cache, breaker_seen, lease, token)


@pytest.mark.parametrize(("outcome", "stack"), CELLS)
def test_cell(redis_clean, outcome, stack):
    seen = run_cell(redis_clean, outcome, stack)
    expected = {"sees": outcome.sees}
    got = {"sees": seen.sees}
    for step, attr in (("sla", "sla"), ("cache", "cache"), ("breaker", "breaker"),
                       ("concurrency", "lease"), ("rate_limit", "token")):
        if step in stack and getattr(outcome, attr) != ix.NONE:
            expected[attr] = getattr(outcome, attr)
            got[attr] = getattr(seen, attr)
    assert got == expected


def test_apply_refused_by_the_concurrency_limit_never_opens_the_breaker(redis_clean):
    """``apply()`` raises ConcurrencyLimited at once; two of them used to open a breaker of fail_max=2."""
    app = make_app(redis_clean, "ix-eager", tuning_circuit_breakers={CB: {"fail_max": 2, "reset_timeout": 60}},
                   tuning_concurrency_limits={CC: 1}, tuning_rate_limits={RL: {"rate": "1/m", "burst": 1}})

    @app.task(shared=False, name="ix.eager")
    @circuit_breaker(CB, on_open="fail")
    @concurrency_limit(CC, max_wait=0)
    @rate_limit(RL)
    def eager(x):
        return x

    runtime = runtime_for(app)
    held = concurrency_limiter_for(runtime, CC).acquire()
    assert held.granted
    for _ in range(3):
        with pytest.raises(ConcurrencyLimited):
            eager.apply((1,), throw=True)
    concurrency_limiter_for(runtime, CC).release(held)  # the process's renewer would keep it alive
    breaker = breaker_for(runtime, CB)
    assert breaker.refresh().state == "closed"
    assert int(redis_clean.client(1).hget(CB_KEY, "failures") or 0) == 0
    assert redis_clean.client(1).get(RL_KEY) is None, "a refused call spent a rate-limit token"


def test_a_fallback_is_not_served_once_the_breaker_closes(redis_clean):
    """Defect #3 as a user meets it: open → fallback; closed again → the real result, not the fallback."""
    app = make_app(redis_clean, "ix-fallback", tuning_circuit_breakers={CB: {"fail_max": 5, "reset_timeout": 60}})
    runs = []

    @app.task(shared=False, name="ix.quote")
    @cache_result(ttl=300, l1_ttl=60)
    @circuit_breaker(CB, fallback=lambda symbol: "stale")
    def quote(symbol):
        runs.append(symbol)
        return f"{symbol}=42"

    breaker = breaker_for(runtime_for(app), CB)
    breaker.open()
    assert quote.apply(("ACME",)).get() == "stale"
    assert quote.cache.get("ACME") == (False, None)
    breaker.close()
    assert quote.apply(("ACME",)).get() == "ACME=42"
    assert quote.apply(("ACME",)).get() == "ACME=42"
    assert runs == ["ACME"]  # the real value is cached as usual


def test_a_trial_refused_by_a_limit_frees_the_trial_for_the_next_caller(redis_clean):
    """A half-open trial that ends in ConcurrencyLimited settles nothing and leaves the trial to others."""
    app = make_app(redis_clean, "ix-trial", tuning_circuit_breakers={CB: {"fail_max": 1, "reset_timeout": 60}},
                   tuning_concurrency_limits={CC: 1})

    @app.task(shared=False, name="ix.trial")
    @circuit_breaker(CB, on_open="fail")
    @concurrency_limit(CC, max_wait=0)
    def trial(x):
        return x

    runtime = runtime_for(app)
    breaker = breaker_for(runtime, CB)
    breaker.half_open()
    slots = concurrency_limiter_for(runtime, CC)
    lease = slots.acquire()
    with pytest.raises(ConcurrencyLimited):
        trial.apply((1,), throw=True)
    assert breaker.refresh().state == "half-open"
    slots.release(lease)
    assert trial.apply((2,), throw=True).get() == 2  # would be CircuitOpen if the trial were still held
    assert breaker.refresh().state == "closed"


def test_another_limiters_throttle_keeps_the_task_on_its_own_key(redis_clean):
    """``Throttled(name=other)`` in a per-key task pauses the other limiter's bucket; the task's own
    decision and reserved slot stay on its key (it used to decide on an unkeyed bucket nobody uses)."""
    from celery_tuning.ratelimit import hash_key

    app = make_app(redis_clean, "ix-keyed", tuning_defer_via="countdown",  # reads the broker's message
                   tuning_rate_limits={"per": {"rate": "1/s", "burst": 1}, "api": {"rate": "50/s", "burst": 5}})

    @app.task(bind=True, shared=False, name="ix.keyed")
    @rate_limit("per", key=lambda tenant: tenant, on_limit="defer")
    def keyed(self, tenant):
        raise Throttled(retry_after=1.0, name="api")

    tracer = build_tracer(keyed.name, keyed, app=app, eager=False)
    request = {"id": "keyed-1", "task": keyed.name, "delivery_info": {"routing_key": "celery", "exchange": ""},
               "hostname": "ix@host", "headers": None}
    tracer("keyed-1", ("acme",), {}, request)
    tuning, broker = redis_clean.client(1), redis_clean.client(0)
    assert tuning.exists("tuning:rl:{per}") == 0, "the task decided on the limiter's unkeyed bucket"
    assert tuning.exists("tuning:rl:{api}") == 1, "the named limiter was not paused"
    headers = [json.loads(raw)["headers"] for raw in broker.lrange("celery", 0, -1)]
    slots = [h[HEADER_SLOT] for h in headers if h.get("id") == "keyed-1" and isinstance(h.get(HEADER_SLOT), dict)]
    assert slots and slots[0]["key"] == hash_key("acme"), slots


@pytest.mark.parametrize("where", ["same", "cluster"])
def test_a_per_key_function_runs_once_per_miss_whether_or_not_the_decision_rides_the_lookup(
        redis_clean, cluster_clean, where):
    # On a Cluster the cache's miss script cannot take the limiter's decision; the limiter's key
    # function must then run once (in the rate-limit step), not once more for a discarded offer.
    url = cluster_clean.url if where == "cluster" else redis_clean.db_url(1)
    app = make_app(redis_clean, f"keyfn-{where}", tuning_url=url)
    calls = []

    def tenant_of(tenant, n):
        calls.append(tenant)
        return tenant

    @app.task(shared=False)
    @cache_result(ttl=60)
    @rate_limit("100/s", burst=10, key=tenant_of)
    def keyed(tenant, n):
        return n

    assert [keyed.apply(("a", i)).get() for i in range(5)] == list(range(5))
    assert len(calls) == 5
