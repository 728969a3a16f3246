import pytest

from celery_tuning import ConfigurationError, cache_result, circuit_breaker, rate_limit, sla
from celery_tuning.conf import BreakerSpec, load_config
from celery_tuning.policy.attach import POLICY_ATTR, SlaPolicy, policies_of


def test_sla_attaches_policy_and_keeps_function():
    def f(x):
        return x

    assert sla(warning=1, critical=2)(f) is f
    assert getattr(f, POLICY_ATTR)["sla"] == SlaPolicy(1.0, 2.0, "total")
    assert policies_of(staticmethod(f))["sla"].critical == 2.0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"warning": -1}, "@sla(warning=-1)"),
        ({"critical": 0}, "@sla(critical=0)"),
        ({"warning": "5"}, "@sla(warning='5')"),
        ({}, "give warning=seconds"),
        ({"warning": 5, "critical": 1}, "must not exceed"),
        ({"warning": 1, "on": "queue"}, "@sla(on='queue')"),
    ],
)
def test_sla_rejects_nonsense(kwargs, fragment):
    with pytest.raises(ConfigurationError) as info:
        sla(**kwargs)
    assert fragment in str(info.value)


def test_sla_twice_is_an_error():
    def f():
        pass

    sla(warning=1)(f)
    with pytest.raises(TypeError, match="applied twice"):
        sla(warning=2)(f)


def test_decorator_above_app_task_is_an_error():
    class FakeTask:
        def apply_async(self):
            pass

    with pytest.raises(TypeError, match="below @app.task"):
        sla(warning=1)(FakeTask())


def test_rate_limit_named_and_inline():
    def f(tenant_id):
        pass

    rate_limit("openai")(f)
    named = policies_of(f)["rate_limit"]
    assert (named.name, named.rate, named.on_limit, named.max_wait) == ("openai", None, "auto", 1.0)

    def g(tenant_id):
        pass

    rate_limit("10/s", burst=3, key=lambda tenant_id, **_: tenant_id, on_limit="raise")(g)
    inline = policies_of(g)["rate_limit"]
    assert inline.name is None and inline.rate.amount == 10 and inline.burst == 3
    assert inline.key(tenant_id="t1") == "t1"


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        (("20/x",), {}, "@rate_limit('20/x')"),
        (("0/s",), {}, "more than zero"),
        (("",), {}, "expected a limiter name"),
        (("openai",), {"burst": 3}, "takes its burst from tuning_rate_limits['openai']"),
        (("10/s",), {"burst": 0}, "@rate_limit(burst=0)"),
        (("10/s",), {"on_limit": "drop"}, "@rate_limit(on_limit='drop'): expected one of 'auto', 'defer'"),
        (("10/s",), {"max_wait": -1}, "@rate_limit(max_wait=-1)"),
        (("10/s",), {"max_defer": 0}, "@rate_limit(max_defer=0)"),
        (("10/s",), {"cost": 2}, "must not exceed burst (1)"),
        (("10/s",), {"cost": "3"}, "@rate_limit(cost='3'): expected an integer >= 1"),
        (("10/s",), {"key": "tenant"}, "@rate_limit(key='tenant')"),
        (("10/s",), {"max_deferrals": -1}, "@rate_limit(max_deferrals=-1)"),
    ],
)
def test_rate_limit_rejects_nonsense(args, kwargs, fragment):
    with pytest.raises(ConfigurationError) as info:
        rate_limit(*args, **kwargs)
    assert fragment in str(info.value)


def test_errors_survive_pickling_and_celery_result_serialization():
    import pickle

    from celery import Celery

    from celery_tuning import RateLimited, Throttled

    app = Celery("ser", set_as_current=False, backend="cache+memory://")
    for exc in (RateLimited(2.5, "api"), Throttled(30, "api")):
        again = pickle.loads(pickle.dumps(exc))
        assert (type(again), again.retry_after, again.name, str(again)) == (type(exc), exc.retry_after, "api", str(exc))
        rebuilt = app.backend.exception_to_python(app.backend.prepare_exception(exc, "json"))
        assert type(rebuilt) is type(exc) and rebuilt.retry_after == exc.retry_after


def test_circuit_breaker_policy():
    def f():
        pass

    circuit_breaker("payments", on_open="fail")(f)
    policy = policies_of(f)["breaker"]
    assert (policy.name, policy.on_open, policy.options) == ("payments", "fail", None)

    def g():
        pass

    circuit_breaker("inline", fail_max=2, reset_timeout=5, exclude=[KeyError])(g)
    assert policies_of(g)["breaker"].options == BreakerSpec(fail_max=2, reset_timeout=5.0, exclude=(KeyError,))


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        (("",), {}, "expected a breaker name"),
        (("p",), {"on_open": "ignore"}, "@circuit_breaker(on_open='ignore')"),
        (("p",), {"fallback": "x"}, "@circuit_breaker(fallback='x')"),
        (("p",), {"fail_max": 0}, "@circuit_breaker('p').fail_max"),
        (("p",), {"reset_timeout": -1}, "@circuit_breaker('p').reset_timeout"),
        (("p",), {"exclude": ["no.such.Error"]}, "cannot import 'no.such.Error'"),
        (("p",), {"failmax": 3}, "unknown option(s) ['failmax']"),
    ],
)
def test_circuit_breaker_rejects_nonsense(args, kwargs, fragment):
    with pytest.raises(ConfigurationError) as info:
        circuit_breaker(*args, **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"ttl": 0}, "@cache_result(ttl=0)"),
        ({"l1_ttl": -1}, "@cache_result(l1_ttl=-1)"),
        ({"key": "k"}, "@cache_result(key='k')"),
        ({"version": -1}, "@cache_result(version=-1)"),
        ({"vary_on": "text"}, "@cache_result(vary_on='text')"),
        ({"max_size": 0}, "@cache_result(max_size=0)"),
        ({"serializer": "pickle"}, "@cache_result(serializer='pickle'): expected 'json' or 'msgpack'"),
        ({"lock_timeout": 0}, "@cache_result(lock_timeout=0)"),
    ],
)
def test_cache_result_rejects_nonsense(kwargs, fragment):
    with pytest.raises(ConfigurationError) as info:
        cache_result(**kwargs)
    assert fragment in str(info.value)


def test_cache_result_vary_on_must_name_arguments():
    with pytest.raises(ConfigurationError, match=r"f\(\) has no argument\(s\) \['nope'\]"):
        @cache_result(vary_on=["nope"])
        def f(text):
            pass


def test_concurrency_limit_policy_and_errors():
    from celery_tuning import concurrency_limit

    def f():
        pass

    concurrency_limit("pdf-render", max_deferrals=5)(f)
    assert policies_of(f)["concurrency"].name == "pdf-render"
    with pytest.raises(ConfigurationError, match="expected a name from tuning_concurrency_limits"):
        concurrency_limit("")


def tenant_of(tenant_id, **kw):
    return tenant_id


def test_concurrency_limit_inline_and_per_key():
    from celery_tuning import concurrency_limit

    def f(tenant_id):
        pass

    concurrency_limit(limit=2, key=tenant_of, per_key={"acme": 10, 5: 3})(f)
    policy = policies_of(f)["concurrency"]
    assert (policy.name, policy.limit, policy.key, policy.per_key) == (None, 2, tenant_of, {"acme": 10, "5": 3})

    def g(tenant_id):
        pass

    concurrency_limit("sync", key=tenant_of)(g)
    assert (policies_of(g)["concurrency"].name, policies_of(g)["concurrency"].key) == ("sync", tenant_of)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({}, "@concurrency_limit(): expected a name from tuning_concurrency_limits or an inline limit=N"),
        ({"name": "sync", "limit": 2}, "not both"),
        ({"limit": 0}, "@concurrency_limit(limit=0): expected an integer >= 1"),
        ({"limit": True}, "@concurrency_limit(limit=True)"),
        ({"limit": 2, "key": "tenant"}, "@concurrency_limit(key='tenant'): expected a callable"),
        ({"limit": 2, "per_key": {"a": 1}}, "@concurrency_limit(per_key=...): needs key="),
        ({"name": "sync", "key": tenant_of, "per_key": {"a": 1}}, "tuning_concurrency_limits['sync']['per_key']"),
        ({"limit": 2, "key": tenant_of, "per_key": {"a": 0}}, "@concurrency_limit(per_key=...)['a']: 0 is not valid"),
        ({"limit": 2, "key": tenant_of, "per_key": [1]}, "@concurrency_limit(per_key=[1]): expected a dict"),
    ],
)
def test_concurrency_limit_rejects_nonsense(kwargs, fragment):
    from celery_tuning import concurrency_limit

    with pytest.raises(ConfigurationError) as info:
        concurrency_limit(**kwargs)
    assert fragment in str(info.value)
    with pytest.raises(ConfigurationError, match=r"@concurrency_limit\(max_deferrals=-2\)"):
        concurrency_limit("x", max_deferrals=-2)


def test_throttled_takes_a_retry_after_header_and_names_what_cannot_be_a_pause():
    from celery_tuning import ConfigurationError, Throttled

    assert Throttled("120").retry_after == 120.0  # Retry-After headers arrive as text
    for bad in (-1, float("inf"), float("nan"), "soon", None):
        with pytest.raises(ConfigurationError, match=r"Throttled\(retry_after="):
            Throttled(bad)


def test_decorator_and_setting_share_one_validator():
    """@circuit_breaker(**options) and tuning_circuit_breakers, @sla and tuning_sla: same checks, each
    error naming its own source."""
    with pytest.raises(ConfigurationError) as by_decorator:
        circuit_breaker("p", fail_max=0)
    with pytest.raises(ConfigurationError) as by_setting:
        load_config({"tuning_circuit_breakers": {"p": {"fail_max": 0}}}, environ={})
    assert str(by_decorator.value).replace("@circuit_breaker('p')", "X") == \
        str(by_setting.value).replace("tuning_circuit_breakers['p']", "X")
    with pytest.raises(ConfigurationError, match=r"^@sla\(warning=5, critical=1\): warning \(5.0\) must not exceed"):
        sla(warning=5, critical=1)
    with pytest.raises(ConfigurationError, match=r"^tuning_sla\['q'\]: warning \(5.0\) must not exceed"):
        load_config({"tuning_sla": {"q": {"warning": 5, "critical": 1}}}, environ={})
    spec = load_config({"tuning_circuit_breakers": {"p": {"fail_max": 2, "exclude": [KeyError]}}},
                       environ={}).circuit_breakers["p"]

    def f():
        pass

    circuit_breaker("p", fail_max=2, exclude=[KeyError])(f)
    assert policies_of(f)["breaker"].options == spec


@pytest.mark.parametrize(
    ("decorator", "kwargs", "fragment"),
    [
        (rate_limit, {"limit": "10/s", "burst": 2.0}, "@rate_limit(burst=2.0): expected an integer >= 1"),
        (rate_limit, {"limit": "10/s", "max_wait": "1"}, "@rate_limit(max_wait='1'): expected a number of seconds"),
        (cache_result, {"version": True}, "@cache_result(version=True)"),
        (sla, {"critical": "5"}, "@sla(critical='5'): expected a number of seconds > 0"),
    ],
)
def test_decorator_arguments_keep_their_python_types(decorator, kwargs, fragment):
    """Settings may be text (environment, settings files); decorator arguments are Python values."""
    with pytest.raises(ConfigurationError) as info:
        decorator(**kwargs)
    assert fragment in str(info.value)


def test_rate_limit_cost_callable_is_evaluated_per_call_with_its_key_and_charge_adds_debt():
    """``cost=lambda text, **kw: len(text)`` in the worker, per-key bucket; ``limiter().charge(n)``."""
    from celery import Celery

    import celery_tuning
    from celery_tuning import RateLimited

    app = Celery("costs", set_as_current=False, task_cls="celery_tuning:TunedTask")
    app.conf.update(tuning_redis_url="memory://",
                    tuning_rate_limits={"tokens": {"rate": "10/m", "burst": 10}})  # a token every 6 s
    celery_tuning.install(app)
    calls = []

    def cost(tenant, text):
        calls.append(text)
        return len(text)

    @app.task(name="costs.embed", shared=False)
    @rate_limit("tokens", key=lambda tenant, text: tenant, cost=cost, on_limit="raise")
    def embed(tenant, text):
        return len(text)

    rate_limit("10/s", cost=lambda text: len(text))(lambda text: None)  # no burst check for a callable
    lim = celery_tuning.limiter("tokens", app=app)
    assert embed.apply(("a", "abcd")).get() == 4
    assert calls == ["abcd"], "evaluated once, with the call's arguments"
    assert (lim.snapshot(key="a").tokens, lim.snapshot(key="b").tokens, lim.snapshot().tokens) == (6, 10, 10)
    assert embed.apply(("a", "")).get() == 0, "a cost of 0 takes no token"
    assert lim.snapshot(key="a").tokens == 6
    assert embed.apply(("b", "x" * 15)).get() == 15, "above the burst: admitted from a full bucket"
    with pytest.raises(RateLimited) as info:
        embed.apply(("b", "x")).get()
    assert 35 < info.value.retry_after <= 36, "the 5 tokens of debt, then the next one"
    assert lim.charge(4, key="a") == 0.0 and lim.snapshot(key="a").tokens == 2
    assert 29 < lim.charge(6, key="a") <= 30, "the 2 tokens there, then 4 owed + the next: 5 x 6 s"
    assert lim.charge(0) == 0.0 and lim.snapshot().tokens == 10, "charge(0) does nothing"
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigurationError, match=r"limiter 'tokens': charge\(n="):
            lim.charge(bad)

    @app.task(name="costs.negative", shared=False)
    @rate_limit("tokens", cost=lambda text: -1)
    def negative(text):
        pass

    with pytest.raises(ConfigurationError, match=r"task 'costs.negative': @rate_limit\(cost=<lambda>\) returned -1"):
        negative.apply(("x",)).get()


def test_rate_limits_stack_in_reading_order_and_must_agree_on_how_the_task_waits():
    from celery_tuning.policy.attach import RateLimitStack

    def f(tenant):
        pass

    rate_limit("10/s", on_limit="raise")(rate_limit("hourly", key=lambda tenant: tenant, on_limit="raise")(f))
    stack = policies_of(f)["rate_limit"]
    assert isinstance(stack, RateLimitStack)
    assert [p.name for p in stack.policies] == [None, "hourly"], "topmost decorator first"
    assert stack.name is None and stack.on_limit == "raise"
    rate_limit("5000/h", on_limit="raise")(f)
    assert len(policies_of(f)["rate_limit"].policies) == 3

    def g():
        pass

    rate_limit("hourly")(g)
    with pytest.raises(ConfigurationError, match=r"@rate_limit\(on_limit='raise'\) stacked on 'g' whose other "
                                                 r"@rate_limit has on_limit='auto'"):
        rate_limit("10/s", on_limit="raise")(g)
    with pytest.raises(ConfigurationError, match=r"@rate_limit\(max_wait=2\.0\) stacked on 'g'"):
        rate_limit("10/s", max_wait=2)(g)
    with pytest.raises(ConfigurationError, match=r"@rate_limit\('hourly'\) is stacked twice on 'g'"):
        rate_limit("hourly", key=lambda: 1)(g)
    assert policies_of(g)["rate_limit"].name == "hourly", "a refused stacking leaves the policy as it was"


def test_a_stacked_task_is_admitted_only_when_every_limit_admits():
    """10/s burst 3 shared + 1/m per tenant + a callable cost on a named 'tokens' limiter (memory://)."""
    from celery import Celery

    import celery_tuning
    from celery_tuning import RateLimited, Throttled

    app = Celery("stacked", set_as_current=False, task_cls="celery_tuning:TunedTask")
    app.conf.update(tuning_redis_url="memory://",
                    tuning_rate_limits={"tokens": {"rate": "60/m", "burst": 10}})  # a token a second
    celery_tuning.install(app)
    throttle = []

    @app.task(name="stacked.sync", shared=False)
    @rate_limit("10/s", burst=3, on_limit="raise")
    @rate_limit("1/m", key=lambda tenant, text: tenant, on_limit="raise")
    @rate_limit("tokens", cost=lambda tenant, text: len(text), on_limit="raise")
    def sync(tenant, text):
        if throttle:
            raise Throttled(throttle.pop(), name="tokens")
        return tenant

    assert sync.apply(("a", "xxxx")).get() == "a"
    shared = limiter_of(app, "stacked.sync")  # inline limits: the task's name, then TASK#2 ...
    per_tenant = limiter_of(app, "stacked.sync#2")
    tokens = celery_tuning.limiter("tokens", app=app)
    assert (shared.snapshot().tokens, per_tenant.snapshot(key="a").tokens, tokens.snapshot().tokens) == (2, 0, 6)
    with pytest.raises(RateLimited) as info:
        sync.apply(("a", "xx")).get()
    assert 59 < info.value.retry_after <= 60 and info.value.name == "stacked.sync#2", "the tightest limit's wait"
    assert (shared.snapshot().tokens, tokens.snapshot().tokens) == (2, 6), "a refused call spends no bucket"
    with pytest.raises(RateLimited) as info:
        sync.apply(("b", "x" * 7)).get()
    assert 0.9 < info.value.retry_after <= 1.0 and info.value.name == "tokens"
    assert per_tenant.snapshot(key="b").tokens == 1, "nor the tenant's bucket"
    assert sync.apply(("b", "")).get() == "b", "a cost of 0 leaves that limit out"
    assert (shared.snapshot().tokens, per_tenant.snapshot(key="b").tokens, tokens.snapshot().tokens) == (1, 0, 6)
    throttle.append(30)
    with pytest.raises(RateLimited, match="tokens"):
        sync.apply(("c", "x")).get()
    assert tokens.snapshot().tokens == 0, "Throttled(name=...) paused that limit of the stack"


def test_tiers_admit_the_enterprise_burst_while_the_default_key_is_refused():
    """``per_key`` in the config, a ``per_key`` callable decided per call, and an inline dict."""
    from celery import Celery

    import celery_tuning
    from celery_tuning import RateLimited

    app = Celery("tiers", set_as_current=False, task_cls="celery_tuning:TunedTask")
    app.conf.update(tuning_redis_url="memory://", tuning_rate_limits={
        "openai": {"rate": "1/m", "burst": 2, "per_key": {"enterprise": {"rate": "60/m", "burst": 20}}}})
    celery_tuning.install(app)
    premium = {"gold"}

    @app.task(name="tiers.embed", shared=False)
    @rate_limit("openai", key=lambda tenant: tenant, on_limit="raise",
                per_key=lambda tenant: {"rate": "6/m", "burst": 4} if tenant in premium else None)
    def embed(tenant):
        return tenant

    def admitted(tenant, n):
        ok = 0
        for _ in range(n):
            try:
                embed.apply((tenant,)).get()
                ok += 1
            except RateLimited:
                pass
        return ok

    assert (admitted("enterprise", 25), admitted("free", 5), admitted("gold", 6)) == (20, 2, 4)
    with pytest.raises(RateLimited) as info:
        embed.apply(("free",)).get()
    assert 59 < info.value.retry_after <= 60, "the default tier: 1/m after its burst of 2"
    lim = celery_tuning.limiter("openai", app=app)
    assert (lim.snapshot(key="enterprise").burst, lim.snapshot(key="free").burst) == (20, 2)
    # The tier's 1 s tokens: the next token (under 1 s away, less the time the calls above took on a
    # loaded machine) plus the 1 s now owed; the default tier's would be over a minute.
    assert 1.0 < lim.charge(1, key="enterprise") <= 2.05, "the tier's 1 s tokens: next + 1 owed"

    @app.task(name="tiers.bad", shared=False)
    @rate_limit("openai", key=lambda tenant: tenant, per_key=lambda tenant: "lots")
    def bad(tenant):
        pass

    with pytest.raises(ConfigurationError, match=r"task 'tiers.bad': @rate_limit\(per_key=<lambda>\) returned 'lots'"):
        bad.apply(("x",)).get()

    @app.task(name="tiers.inline", shared=False)
    @rate_limit("1/h", key=lambda tenant: tenant, per_key={"vip": {"rate": "3/m", "burst": 3}}, on_limit="raise")
    @rate_limit("openai", key=lambda tenant: tenant, on_limit="raise")
    def inline(tenant):
        return tenant

    assert [inline.apply(("acme",)).failed() for _ in range(2)] == [False, True], "1/h: burst 1"
    results = [inline.apply(("vip",)) for _ in range(3)]
    assert [r.failed() for r in results] == [False, False, True], "vip's burst 3 stacked on openai's 2"
    assert results[2].result.name == "openai"


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        (("10/s",), {"per_key": {"e": "5/s"}}, "tiers are per key; give key= too"),
        (("openai",), {"key": len, "per_key": {"e": "5/s"}},
         "takes its per_key dict from tuning_rate_limits['openai']"),
        (("10/s",), {"key": len, "per_key": {"e": {"rate": "5/s", "burst": 0}}},
         "@rate_limit(per_key)['e'].burst: 0 is not valid"),
        (("10/s",), {"key": len, "per_key": ["e"]}, "@rate_limit(per_key=['e']): expected a dict"),
        (("10/s",), {"key": len, "burst": 3, "cost": 3, "per_key": {"e": "5/s"}},
         "must not exceed the burst of per_key['e'] (1)"),
    ],
)
def test_rate_limit_per_key_rejects_nonsense(args, kwargs, fragment):
    with pytest.raises(ConfigurationError) as info:
        rate_limit(*args, **kwargs)
    assert fragment in str(info.value)


def limiter_of(app, name):
    from celery_tuning.integration.registry import limiter_for
    from celery_tuning.integration.runtime import runtime_for

    return limiter_for(runtime_for(app), name)
