"""install(app) leaves the app lazy: settings are read when Celery configures it, not at the call."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from celery import Celery

import celery_tuning
from celery_tuning import ConfigurationError, rate_limit
from celery_tuning.integration.bootsteps import TuningWorkerStep
from celery_tuning.integration.runtime import runtime_for

NO_REDIS = "redis://127.0.0.1:1/0"  # never contacted: binding a task does no I/O


def fresh_app(**kwargs):
    return Celery("lazy", set_as_current=False, **kwargs)


def cls_of(task):
    return type(getattr(task, "_get_current_object", lambda: task)())


def test_install_leaves_a_fresh_app_unconfigured():
    app = fresh_app()
    celery_tuning.install(app)
    assert app.configured is False


def test_install_is_idempotent_and_connects_one_configure_receiver():
    app = fresh_app()
    first = celery_tuning.install(app)
    assert celery_tuning.install(app) is first
    assert len(app.on_after_configure.receivers) == 1
    assert app.configured is False


class LateConfig:
    broker_url = NO_REDIS
    tuning_key_prefix = "late"
    tuning_rate_limits = {"api": "5/s"}


def test_config_from_object_after_install_is_what_the_runtime_reads():
    app = fresh_app()
    celery_tuning.install(app)
    app.config_from_object(LateConfig)
    assert app.configured is False
    config = runtime_for(app).config
    assert app.configured is True
    assert config.key_prefix == "late"
    assert config.rate_limits["api"].rate.amount == 5


def test_conf_update_after_install_is_seen():
    app = fresh_app(broker=NO_REDIS)
    celery_tuning.install(app)
    app.conf.update(tuning_rate_limits={"api": "7/m"})  # e.g. in a module imported later
    assert app.configured is False
    assert runtime_for(app).config.rate_limits["api"].rate.period == 60


def test_add_defaults_after_install_stays_lazy_and_applies():
    app = fresh_app(broker=NO_REDIS)
    celery_tuning.install(app)
    called = []

    def defaults():
        called.append(1)
        return {"tuning_key_prefix": "from-defaults"}

    app.add_defaults(defaults)
    assert called == [] and app.configured is False
    assert runtime_for(app).config.key_prefix == "from-defaults"
    assert called == [1]


# Modelled on Celery's own checks for pending configuration, with install() applied first.

def test_settings_set_before_config_from_object_survive_it():
    class Config:
        task_default_delivery_mode = "persistent"
        task_default_queue = "from-object"

    app = fresh_app()
    celery_tuning.install(app)
    app.conf.task_default_delivery_mode = "transient"
    app.config_from_object(Config)
    assert app.configured is False
    assert app.conf.task_default_delivery_mode == "transient"
    assert app.conf.task_default_queue == "from-object"
    assert app.configured is True


def test_config_from_object_by_name_is_not_imported_until_read():
    app = fresh_app()
    celery_tuning.install(app)
    app.config_from_object("tests.unit.no_such_config_module")  # Celery imports it lazily
    assert app.configured is False
    with pytest.raises(ImportError):
        app.conf.broker_url  # noqa: B018 - reading configures the app


def test_pending_values_and_defaults_are_visible_once_read():
    app = fresh_app()
    celery_tuning.install(app)
    app.conf.update(task_default_queue="first")
    app.add_defaults({"task_default_exchange": "ex", "task_default_queue": "ignored-default"})
    app.conf.task_default_routing_key = "rk"
    assert app.configured is False
    assert (app.conf.task_default_queue, app.conf.task_default_exchange,
            app.conf.task_default_routing_key) == ("first", "ex", "rk")


def test_a_task_bound_after_configuration_gets_its_policies():
    app = fresh_app(task_cls="celery_tuning:TunedTask")
    celery_tuning.install(app)

    @app.task(shared=False, name="calls_api")
    @rate_limit("api")
    def call():
        return 1

    app.conf.update(broker_url=NO_REDIS, tuning_rate_limits={"api": "5/s"})
    assert app.configured is False
    assert [s.kind for s in cls_of(call)._tuning_steps] == ["rate_limit"]


def test_django_namespace_with_settings_configured_after_install(monkeypatch):
    from django.conf import LazySettings

    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    settings = LazySettings()  # unconfigured, as django.conf.settings is when celery.py is imported
    app = fresh_app()
    app.config_from_object(settings, namespace="CELERY")
    celery_tuning.install(app)
    settings.configure(CELERY_BROKER_URL=NO_REDIS, CELERY_TUNING_KEY_PREFIX="shop",
                       CELERY_TUNING_RATE_LIMITS={"api": "3/s"})
    config = runtime_for(app).config
    assert config.key_prefix == "shop"
    assert config.rate_limits["api"].rate.amount == 3


def test_environment_kill_switch_reads_no_settings(monkeypatch):
    monkeypatch.setenv("CELERY_TUNING_ENABLED", "0")
    app = fresh_app(task_cls="celery_tuning:TunedTask")
    runtime = celery_tuning.install(app)
    assert runtime.enabled is False and app.configured is False
    assert len(app.on_after_configure.receivers) == 0

    @app.task(shared=False)
    @rate_limit("nowhere")  # unknown name: would fail to bind if the chain were built
    def f():
        return 1

    assert cls_of(f).run is f.__wrapped__


def test_config_kill_switch_set_after_install():
    app = fresh_app(task_cls="celery_tuning:TunedTask")
    runtime = celery_tuning.install(app)
    app.conf.tuning_enabled = False

    @app.task(shared=False)
    @rate_limit("nowhere")
    def f():
        return 1

    assert cls_of(f).run is f.__wrapped__
    assert runtime.enabled is False
    assert TuningWorkerStep not in app.steps["worker"]  # the worker runs as if never installed


def test_bad_setting_after_install_fails_at_task_bind_naming_both():
    app = fresh_app(task_cls="celery_tuning:TunedTask", broker=NO_REDIS)
    celery_tuning.install(app)
    app.conf.tuning_rate_limits = {"api": "5/x"}
    assert app.conf.broker_url == NO_REDIS  # configuring the app itself does not raise

    @app.task(shared=False, name="limited")
    @rate_limit("api")
    def f():
        return 1

    with pytest.raises(ConfigurationError,
                       match=r"tuning_rate_limits\['api'\].rate.*\(found while binding task 'limited'\)"):
        f.run  # noqa: B018 - binding happens on first access of the lazy task


def test_bad_setting_after_install_fails_at_worker_start():
    app = fresh_app(broker=NO_REDIS)
    celery_tuning.install(app)
    app.conf.tuning_sla = {"q": {"warning": -1}}
    with pytest.raises(ConfigurationError, match=r"tuning_sla\['q'\].warning"):
        TuningWorkerStep(SimpleNamespace(app=app))


def test_missing_redis_url_fails_at_worker_start():
    app = fresh_app(broker="amqp://guest@127.0.0.1//")
    celery_tuning.install(app)
    app.conf.tuning_rate_limits = {"a": "1/s"}
    with pytest.raises(ConfigurationError, match="tuning_redis_url: not set and the broker"):
        TuningWorkerStep(SimpleNamespace(app=app))


def test_install_on_an_already_configured_app_validates_at_once():
    app = fresh_app(broker=NO_REDIS)
    app.conf.tuning_rate_limits = {"a": "5/x"}
    assert app.conf.broker_url == NO_REDIS
    with pytest.raises(ConfigurationError, match=r"tuning_rate_limits\['a'\].rate"):
        celery_tuning.install(app)


def _receivers(setup: str) -> str:
    code = (
        "from celery import Celery, signals\n"
        "import celery_tuning\n"
        "app = Celery('p', broker='memory://', set_as_current=False)\n"
        "def count():\n"
        "    return ' '.join(str(len(s.receivers)) for s in\n"
        "                    (signals.before_task_publish, signals.task_prerun, signals.task_postrun))\n"
        f"{setup}\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_receivers_connect_when_the_app_is_configured_not_at_install():
    out = _receivers(
        "celery_tuning.install(app)\n"
        "print(count(), app.configured)\n"
        "app.conf.update(tuning_sla={'q': {'warning': 1}})\n"
        "app.conf.broker_url\n"
        "print(count(), app.configured)\n"
    )
    assert out.splitlines() == ["0 0 0 False", "1 1 1 True"]


def test_configuring_again_reads_the_settings_again():
    app = fresh_app(broker=NO_REDIS)
    assert app.conf.broker_url == NO_REDIS
    celery_tuning.install(app)
    assert runtime_for(app).config.key_prefix == "tuning"
    app.config_from_object(LateConfig)  # on a configured app Celery reloads at once
    assert runtime_for(app).config.key_prefix == "late"


def test_a_worker_with_nothing_stateful_starts_without_a_tuning_redis(monkeypatch):
    """install() on every app (a non-Redis broker, no tuning_redis_url, no policy) must not stop its
    workers: Celery's own embedded-worker test failed that way with install applied to every app."""
    from celery import _state

    # Other tests' shared tasks (some with a rate limit) join every app Celery finalizes.
    monkeypatch.setattr(_state, "_on_app_finalizers", set())
    app = fresh_app(broker="memory://")
    celery_tuning.install(app)

    @app.task(shared=False, name="plain")
    def plain():
        return 1

    worker = SimpleNamespace(app=app)
    TuningWorkerStep(worker).start(worker)  # no error: nothing here keeps state in Redis


def test_a_worker_whose_task_keeps_state_still_needs_a_tuning_redis():
    app = fresh_app(broker="amqp://guest@127.0.0.1//", task_cls="celery_tuning:TunedTask")
    celery_tuning.install(app)

    @app.task(shared=False, name="limited_inline")
    @rate_limit("5/s")
    def limited():
        return 1

    app.finalize(auto=True)  # bind the task (so its policy is known), as a starting worker does
    worker = SimpleNamespace(app=app)
    with pytest.raises(ConfigurationError, match="tuning_redis_url: not set and the broker"):
        TuningWorkerStep(worker).start(worker)
