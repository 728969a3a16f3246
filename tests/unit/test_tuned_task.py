"""TunedTask's pass-through fast path, kill switch and policy chain (no I/O: eager mode)."""

import pytest
from celery import Celery, Task
from celery.app.trace import task_has_custom

import celery_tuning
from celery_tuning import ConfigurationError, TunedTask, sla
from celery_tuning.integration import pipeline
from celery_tuning.policy.attach import attach_policy


def cls_of(task):
    return type(getattr(task, "_get_current_object", lambda: task)())


def make_app(**conf):
    app = Celery("unit", set_as_current=False, broker="memory://", backend="cache+memory://")
    app.conf.update(task_always_eager=True, **conf)
    return app


def test_passthrough_task_is_plain_celery():
    app = make_app()
    celery_tuning.install(app)

    @app.task(base=TunedTask)
    def add(x, y):
        return x + y

    @app.task(name="plain_add")
    def plain(x, y):
        return x + y

    assert not task_has_custom(add, "__call__")
    assert cls_of(add).run is add.__wrapped__  # no wrapper around run
    assert add.delay(2, 3).get() == 5
    assert add.apply((2, 3)).get() == plain.apply((2, 3)).get()
    assert add(2, 3) == 5


def test_task_cls_string_makes_every_task_tuned():
    app = Celery("unit2", set_as_current=False, task_cls="celery_tuning:TunedTask", broker="memory://")
    app.conf.task_always_eager = True

    @app.task
    def mul(x, y):
        return x * y

    assert isinstance(mul, TunedTask)
    assert mul.delay(3, 4).get() == 12


def test_install_is_idempotent_and_validates():
    app = make_app(tuning_rate_limits={"a": "5/s"}, tuning_redis_url="redis://127.0.0.1:1/0")
    first = celery_tuning.install(app)
    assert celery_tuning.install(app) is first
    bad = make_app(tuning_rate_limits={"a": "5/x"}, tuning_redis_url="redis://127.0.0.1:1/0")
    celery_tuning.install(bad)  # lazy: settings are read when Celery configures the app
    with pytest.raises(ConfigurationError, match=r"tuning_rate_limits\['a'\].rate"):
        celery_tuning.limiter("a", bad)


def test_install_requires_a_redis_url_when_state_is_needed():
    app = Celery("amqp", set_as_current=False, broker="amqp://guest@127.0.0.1//")
    app.conf.tuning_rate_limits = {"a": "1/s"}
    celery_tuning.install(app)
    with pytest.raises(ConfigurationError, match="tuning_redis_url: not set and the broker"):
        celery_tuning.limiter("a", app)


def test_redis_url_defaults_to_redis_broker_and_never_leaks_password():
    app = Celery("r", set_as_current=False, broker="redis://:hunter2@127.0.0.1:1/3")
    runtime = celery_tuning.install(app)
    assert runtime.redis_url == "redis://:hunter2@127.0.0.1:1/3"
    assert "hunter2" not in runtime.connector.safe_url
    assert "hunter2" not in repr(runtime.connector)


class Recorder(pipeline.Step):
    def __init__(self, kind, log):
        self.kind, self.log = kind, log

    def wrap(self, call_next):
        def call(ctx):
            self.log.append(f"enter {self.kind}")
            result = call_next(ctx)
            self.log.append(f"exit {self.kind}")
            return result

        return call


@pytest.fixture()
def recording_steps(monkeypatch):
    log = []
    monkeypatch.setattr(pipeline, "_FACTORIES", {})
    for kind in pipeline.STEP_ORDER:
        pipeline.register_step(kind, lambda policy, cls, kind=kind: Recorder(kind, log))
    return log


def with_all_policies(fun):
    for kind in ("rate_limit", "concurrency", "breaker", "cache"):  # attached in reverse on purpose
        attach_policy(fun, kind, object(), kind)
    return fun


def test_chain_order_is_cache_breaker_concurrency_rate_limit_run(recording_steps):
    app = make_app()
    celery_tuning.install(app)

    @app.task(shared=False, base=TunedTask, bind=True)
    @with_all_policies
    def work(self, x):
        recording_steps.append(f"run {x} {self.name}")
        return x * 2

    assert work.delay(21).get() == 42
    # The slot before the token: a refused slot is given back, a spent token is not.
    assert recording_steps == [
        "enter cache", "enter breaker", "enter concurrency", "enter rate_limit", f"run 21 {work.name}",
        "exit rate_limit", "exit concurrency", "exit breaker", "exit cache",
    ]
    assert [s.kind for s in cls_of(work)._tuning_steps] == ["cache", "breaker", "concurrency", "rate_limit"]


def test_kill_switch_in_config_leaves_run_unwrapped(recording_steps):
    app = make_app(tuning_enabled=False)
    celery_tuning.install(app)

    @app.task(shared=False, base=TunedTask)
    @with_all_policies
    def work(x):
        return x

    assert work.delay(1).get() == 1
    assert recording_steps == []
    assert cls_of(work).run is work.__wrapped__


def test_kill_switch_from_environment(recording_steps, monkeypatch):
    monkeypatch.setenv("CELERY_TUNING_ENABLED", "0")
    app = make_app()
    celery_tuning.install(app)

    @app.task(shared=False, base=TunedTask)
    @with_all_policies
    def work(x):
        return x

    assert work.apply((5,)).get() == 5
    assert recording_steps == []
    assert Task.run is not cls_of(work).run


def test_runtime_disable_bypasses_chain(recording_steps):
    app = make_app()
    runtime = celery_tuning.install(app)

    @app.task(shared=False, base=TunedTask)
    @with_all_policies
    def work(x):
        return x

    runtime.enabled = False  # what `celery worker --without-tuning` does
    assert work.delay(7).get() == 7
    assert recording_steps == []


def test_sla_only_task_is_not_wrapped():
    app = make_app()

    @app.task(base=TunedTask)
    @sla(warning=1)
    def f():
        return 1

    assert cls_of(f).run is f.__wrapped__
    assert cls_of(f)._tuning_policies["sla"].warning == 1.0


def test_invalid_config_is_reported_with_the_task_name(recording_steps):
    app = make_app(tuning_sla={"q": {"warning": -1}})

    @app.task(base=TunedTask, name="needs_conf", shared=False)
    @with_all_policies
    def f():
        return 1

    with pytest.raises(ConfigurationError,
                       match=r"tuning_sla\['q'\].warning.*\(found while binding task 'needs_conf'\)"):
        f.run  # noqa: B018 - binding happens on first access of the lazy task


def _receivers_after(setup: str) -> str:
    import subprocess
    import sys

    code = (
        "from celery import Celery, signals\n"
        "import celery_tuning\n"
        "from celery_tuning import TunedTask, sla\n"
        "app = Celery('p', broker='memory://', set_as_current=False)\n"
        f"{setup}\n"
        "app.conf.broker_url\n"  # receivers connect when Celery configures the app
        "print(len(signals.before_task_publish.receivers), len(signals.task_prerun.receivers),"
        " len(signals.task_postrun.receivers))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_pass_through_install_leaves_worker_signals_unconnected():
    # Celery's tracer skips prerun/postrun dispatch while nobody listens: keep it that way.
    assert _receivers_after("celery_tuning.install(app)") == "1 0 0"


def test_timing_receivers_when_sla_configured_or_attached():
    assert _receivers_after("app.conf.tuning_sla = {'q': {'warning': 1}}\ncelery_tuning.install(app)") == "1 1 1"
    setup = (
        "celery_tuning.install(app)\n"
        "@app.task(base=TunedTask)\n@sla(warning=1)\ndef f(): pass\n"
        "f.run"
    )
    assert _receivers_after(setup) == "1 1 1"
    assert _receivers_after("app.conf.tuning_timing = True\ncelery_tuning.install(app)") == "1 1 1"
    assert _receivers_after("app.conf.tuning_enabled = False\ncelery_tuning.install(app)") == "0 0 0"


class Degrading(pipeline.Step):
    degrades = True

    def __init__(self, kind):
        self.kind = kind

    def wrap(self, call_next):
        return lambda ctx: pipeline.Degraded("stand-in", "fallback")


def test_a_degraded_value_reaches_celery_as_the_plain_value(monkeypatch):
    monkeypatch.setattr(pipeline, "_FACTORIES", {})
    pipeline.register_step("breaker", lambda policy, cls: Degrading("breaker"))
    app = make_app()
    celery_tuning.install(app)

    def work(x):
        return x

    attach_policy(work, "breaker", object(), "breaker")
    task = app.task(shared=False, base=TunedTask)(work)
    assert task.apply((1,)).get() == "stand-in"
    assert task(1) == "stand-in"
