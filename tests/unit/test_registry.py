"""One registry per app runtime: limiters, breakers and concurrency limiters, one error, one build path."""

import pytest
from celery import Celery

import celery_tuning
from celery_tuning import ConfigurationError
from celery_tuning.conf import BreakerSpec
from celery_tuning.integration.registry import (
    BREAKERS,
    breaker_for,
    concurrency_limiter_for,
    limiter_for,
)
from celery_tuning.integration.runtime import (
    env_disabled,
    is_redis_url,
    is_worker_process,
    runtime_for,
)

NO_REDIS = "redis://127.0.0.1:1/0"  # never contacted: building a component does no I/O


def make_app(**conf):
    app = Celery("registry", set_as_current=False, broker=NO_REDIS)
    app.conf.update(**conf)
    return app


def test_components_are_built_once_and_kept_on_the_runtime():
    app = make_app(tuning_rate_limits={"api": "5/s"}, tuning_circuit_breakers={"pay": {"fail_max": 2}},
                   tuning_concurrency_limits={"render": 3})
    runtime = runtime_for(app)
    lim = limiter_for(runtime, "api")
    assert lim is runtime.registry.limiter("api") is celery_tuning.limiter("api", app=app)
    assert (lim.rate.amount, lim.burst) == (5, 1)
    brk = breaker_for(runtime, "pay")
    assert brk is celery_tuning.breaker("pay", app=app) and brk.fail_max == 2
    cc = concurrency_limiter_for(runtime, "render")
    assert cc is runtime.registry.concurrency_limiter("render")
    assert runtime.registry.built(BREAKERS) == {"pay": brk}


@pytest.mark.parametrize(
    ("get", "message"),
    [
        (lambda rt: limiter_for(rt, "nope"), "no such limiter 'nope' in tuning_rate_limits (known: 'api')"),
        (lambda rt: breaker_for(rt, "nope"),
         "no such breaker 'nope' in tuning_circuit_breakers (known: none configured)"),
        (lambda rt: concurrency_limiter_for(rt, "nope"),
         "no such concurrency limit 'nope' in tuning_concurrency_limits (known: 'a', 'b')"),
    ],
)
def test_one_error_for_a_missing_name(get, message):
    runtime = runtime_for(make_app(tuning_rate_limits={"api": "5/s"}, tuning_concurrency_limits={"b": 1, "a": 2}))
    with pytest.raises(ConfigurationError) as info:
        get(runtime)
    assert str(info.value) == message
    assert str(runtime.registry.no_such(BREAKERS, "x", by="@circuit_breaker('x')")).startswith(
        "@circuit_breaker('x'): no such breaker 'x' in tuning_circuit_breakers")


def test_inline_breaker_options_and_inline_rates():
    runtime = runtime_for(make_app())
    brk = breaker_for(runtime, "inline", BreakerSpec(fail_max=7))
    assert brk.fail_max == 7
    assert breaker_for(runtime, "older", {"fail_max": 4}).fail_max == 4  # a plain dict is validated too
    from celery_tuning.policy.rates import parse_rate

    assert limiter_for(runtime, "task.x", rate=parse_rate("3/m"), burst=2).burst == 2


def test_needs_redis_is_one_answer():
    # (with tasks=True a fresh app also sees the shared tasks earlier tests registered in this process)
    assert runtime_for(make_app()).needs_redis(tasks=False) is False
    assert runtime_for(make_app(tuning_concurrency_limits={})).needs_redis(tasks=False) is True  # given
    app = make_app()
    celery_tuning.install(app)

    @app.task(base=celery_tuning.TunedTask, shared=False)
    @celery_tuning.cache_result(ttl=5)
    def cached(x):
        return x

    assert runtime_for(app).needs_redis(tasks=False) is False
    assert runtime_for(app).needs_redis() is True


def test_process_questions_are_decided_once(monkeypatch):
    assert is_redis_url("rediss+cluster://h:1") and is_redis_url("SENTINEL://h:1") and is_redis_url("unix:///s")
    assert not is_redis_url("amqp://h") and not is_redis_url(None)
    assert is_worker_process(["celery", "-A", "p", "worker"]) and not is_worker_process(["worker", "beat"])
    for value, off in (("0", True), ("off", True), ("1", False), ("", False), ("maybe", False)):
        monkeypatch.setenv("CELERY_TUNING_ENABLED", value)
        assert env_disabled() is off, value


def test_signals_module_is_reachable_from_the_package():
    import subprocess
    import sys

    code = "import celery_tuning; print(celery_tuning.signals.circuit_state_changed.name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "circuit_state_changed"
