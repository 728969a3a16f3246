import collections.abc
import dataclasses
import typing
from pathlib import Path

import pytest
from celery import Celery

from celery_tuning.conf import SETTINGS, BreakerSpec, TuningConfig, env_override, load_config, render_settings_markdown
from celery_tuning.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_when_nothing_is_set():
    cfg = load_config({}, environ={})
    for setting in SETTINGS:
        assert getattr(cfg, setting.attr) == setting.default
        assert cfg.values[setting.attr] == setting.default
        assert cfg.sources[setting.name] == "default"


def test_config_type_holds_one_field_per_setting():
    """Every setting has a TuningConfig field of its name, and no field lacks a setting."""
    fields = {f.name for f in dataclasses.fields(TuningConfig)} - {"sources"}
    assert fields == {s.attr for s in SETTINGS}
    hints = typing.get_type_hints(TuningConfig)
    cfg = load_config({}, environ={})
    for setting in SETTINGS:
        # The default goes through the setting's own parser unchanged, and has the field's type.
        assert setting.parse(setting.name, setting.default) == setting.default, setting.name
        hint = hints[setting.attr]
        origin = typing.get_origin(hint) or hint
        if origin is typing.Union:
            allowed = tuple(typing.get_origin(a) or a for a in typing.get_args(hint))
        else:
            allowed = (origin,)
        allowed = tuple(dict if a is typing.Mapping or a is collections.abc.Mapping else a for a in allowed)
        assert isinstance(getattr(cfg, setting.attr), allowed), setting.name


def test_config_is_frozen_and_defaults_are_not_shared():
    cfg = load_config({}, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.enabled = False
    cfg.rate_limits["x"] = "mutated"  # a default dict belongs to this config alone
    assert load_config({}, environ={}).rate_limits == {}
    assert dataclasses.is_dataclass(BreakerSpec) and BreakerSpec.__dataclass_params__.frozen


def test_env_override_is_the_one_reading_of_the_environment():
    assert env_override("tuning_enabled", {"CELERY_TUNING_ENABLED": " Off "}) is False
    assert env_override("tuning_enabled", {"CELERY_TUNING_ENABLED": ""}) is None
    assert env_override("tuning_key_prefix", {"CELERY_TUNING_ENABLED": "0"}) is None  # no variable
    with pytest.raises(ConfigurationError, match="CELERY_TUNING_ENABLED: 'maybe'"):
        env_override("tuning_enabled", {"CELERY_TUNING_ENABLED": "maybe"})


def test_breakers_are_typed_specs():
    cfg = load_config({"tuning_circuit_breakers": {"p": {"fail_max": "3", "exclude": "builtins.KeyError"}}},
                      environ={})
    assert cfg.circuit_breakers["p"] == BreakerSpec(fail_max=3, exclude=(KeyError,))


def test_bad_rate_names_setting_value_and_accepted_forms():
    with pytest.raises(ConfigurationError) as info:
        load_config({"tuning_rate_limits": {"api": "20/x"}}, environ={})
    msg = str(info.value)
    assert "tuning_rate_limits['api'].rate" in msg
    assert "'20/x'" in msg
    assert "'20/s', '1200/m' or '5000/h'" in msg


def test_rate_limit_tiers_are_normalized_and_keyed_as_str():
    from celery_tuning.conf import Tier
    from celery_tuning.policy.rates import Rate

    cfg = load_config({"tuning_rate_limits": {"openai": {"rate": "20/s", "burst": 5, "per_key": {
        "enterprise": {"rate": "100/s", "burst": 20}, 42: "1/m"}}}}, environ={})
    spec = cfg.rate_limits["openai"]
    assert (spec.rate, spec.burst) == (Rate(20, 1.0), 5)
    assert spec.per_key == {"enterprise": Tier(Rate(100, 1.0), 20), "42": Tier(Rate(1, 60.0), 1)}
    assert load_config({"tuning_rate_limits": {"a": "1/s"}}, environ={}).rate_limits["a"].per_key == {}


def test_concurrency_limits_take_a_cap_or_a_limit_with_per_key_caps():
    limits = {"plain": 2, "sync": {"limit": 2, "per_key": {"acme": 10, 7: "3"}}}
    cfg = load_config({"tuning_concurrency_limits": limits}, environ={})
    plain, sync = cfg.concurrency_limits["plain"], cfg.concurrency_limits["sync"]
    assert (plain.limit, plain.per_key) == (2, {})
    assert (sync.limit, sync.per_key) == (2, {"acme": 10, "7": 3})  # keys compared as str
    assert (sync.cap_for("acme"), sync.cap_for(7), sync.cap_for("other"), sync.cap_for(None)) == (10, 3, 2, 2)
    from celery_tuning.storage.keys import key_digest

    assert sync.cap_for_digest(key_digest("acme")) == 10 and sync.cap_for_digest(key_digest("x")) == 2


@pytest.mark.parametrize(
    "value, fragment",
    [
        ({"sync": 0}, "tuning_concurrency_limits['sync']: 0 is not valid"),
        ({"sync": {"per_key": {"acme": 1}}}, "tuning_concurrency_limits['sync']: missing 'limit'"),
        ({"sync": {"limit": 2, "cap": 1}}, "tuning_concurrency_limits['sync']: unknown option(s) ['cap']"),
        ({"sync": {"limit": 2, "per_key": {"acme": 0}}}, "tuning_concurrency_limits['sync']['per_key']['acme']: 0"),
        ({"sync": {"limit": 2, "per_key": ["acme"]}}, "tuning_concurrency_limits['sync']['per_key']: ['acme']"),
        ({"sync": {"limit": 2, "per_key": {None: 3}}}, "key None names the shared cap"),
        ({"sync": [2]}, "expected an integer >= 1 or a dict"),
        ({"x:k:" + "a" * 24: 1}, "reserved for per-key parking spots"),
    ],
)
def test_bad_concurrency_limits_name_the_entry(value, fragment):
    with pytest.raises(ConfigurationError) as info:
        load_config({"tuning_concurrency_limits": value}, environ={})
    assert fragment in str(info.value)


def test_rate_limit_forms_are_normalized():
    cfg = load_config({"tuning_rate_limits": {"a": "20/s", "b": {"rate": "60/m", "burst": 5}}}, environ={})
    assert cfg.rate_limits["a"].burst == 1
    assert cfg.rate_limits["b"].rate.per_second == 1.0
    assert cfg.rate_limits["b"].burst == 5


@pytest.mark.parametrize(
    ("conf", "fragment"),
    [
        ({"tuning_rate_limits": {"a": {"rate": "1/s", "burst": 0}}}, "tuning_rate_limits['a'].burst"),
        ({"tuning_rate_limits": {"a": {"rate": "1/s", "brust": 2}}}, "unknown option(s) ['brust']"),
        ({"tuning_rate_limits": ["a"]}, "tuning_rate_limits: ['a'] is not valid; expected a dict"),
        ({"tuning_rate_limits": {"a": {"rate": "1/s", "per_key": {"e": {"rate": "9/s", "burst": 0}}}}},
         "tuning_rate_limits['a']['per_key']['e'].burst: 0 is not valid"),
        ({"tuning_rate_limits": {"a": {"rate": "1/s", "per_key": {"e": "9/x"}}}},
         "tuning_rate_limits['a']['per_key']['e'].rate: '9/x'"),
        ({"tuning_rate_limits": {"a": {"rate": "1/s", "per_key": {"e": {"burst": 2}}}}},
         "tuning_rate_limits['a']['per_key']['e']: missing 'rate'"),
        ({"tuning_rate_limits": {"a": {"rate": "1/s", "per_key": {"e": {"rate": "9/s", "adaptive": True}}}}},
         "tuning_rate_limits['a']['per_key']['e']: unknown option(s) ['adaptive']; accepted: 'rate', 'burst'"),
        ({"tuning_rate_limits": {"a": {"rate": "1/s", "per_key": ["e"]}}},
         "tuning_rate_limits['a']['per_key']: ['e'] is not valid; expected a dict"),
        ({"tuning_circuit_breakers": {"p": {"fail_max": -1}}}, "tuning_circuit_breakers['p'].fail_max"),
        ({"tuning_sla": {"q": {"warning": 10, "critical": 5}}}, "must not exceed critical"),
        ({"tuning_sla": {"q": {"on": "queue"}}}, "tuning_sla['q'].on"),
        ({"tuning_enabled": "maybe"}, "tuning_enabled: 'maybe'"),
        ({"tuning_metrics_port": 70000}, "tuning_metrics_port"),
        ({"tuning_metrics_buckets": [1, 0.5]}, "tuning_metrics_buckets"),
        ({"tuning_metrics_buckets": [1, "x"]}, "tuning_metrics_buckets[1]"),
        ({"tuning_redis_url": "http://x"}, "tuning_redis_url"),
        ({"tuning_key_prefix": "a b"}, "tuning_key_prefix"),
        ({"tuning_profiles": {"x": {"threads": 3}}}, "tuning_profiles['x']"),
        ({"tuning_queue_concurrency": {"q": 0}}, "tuning_queue_concurrency['q']"),
        ({"tuning_profiles": {"x": {"pool": "thread"}}}, "tuning_profiles['x']['pool']: 'thread'"),
        ({"tuning_profiles": {"x": {"concurrency": 0}}}, "tuning_profiles['x']['concurrency']"),
        ({"tuning_profiles": {"x": {"autoscale": "2,5"}}}, "tuning_profiles['x']['autoscale']: '2,5'"),
        ({"tuning_profiles": {"x": {"autoscale": [4]}}}, "tuning_profiles['x']['autoscale']"),
        ({"tuning_profiles": {"x": {"time_limit": 0}}}, "tuning_profiles['x']['time_limit']"),
        ({"tuning_fair_window": 10**20}, "tuning_fair_window: 100000000000000000000 is not valid; expected an "
                                         "integer between 1 and 2147483647"),
        ({"tuning_fair_window": 0}, "tuning_fair_window: 0"),
    ],
)
def test_bad_values_name_the_setting(conf, fragment):
    with pytest.raises(ConfigurationError) as info:
        load_config(conf, environ={})
    assert fragment in str(info.value)


def test_profile_fields_are_normalised():
    cfg = load_config({"tuning_profiles": {"x": {"base": "io", "autoscale": "8,2", "acks_late": "yes"}}},
                      environ={})
    assert cfg.profiles["x"] == {"base": "io", "autoscale": (8, 2), "acks_late": True}


def test_unknown_key_suggests_the_closest_setting():
    with pytest.raises(ConfigurationError, match="did you mean 'tuning_rate_limits'"):
        load_config({"tuning_rate_limit": {}}, environ={})


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigurationError, match="tuning_zzzz: unknown celery-tuning setting$"):
        load_config({"tuning_zzzz": 1}, environ={})


def test_environment_overrides_config():
    cfg = load_config({"tuning_enabled": True}, environ={"CELERY_TUNING_ENABLED": "0"})
    assert cfg.enabled is False
    assert cfg.sources["tuning_enabled"] == "env"
    cfg = load_config({}, environ={"CELERY_TUNING_CONCURRENCY_SCALE": "2"})
    assert cfg.concurrency_scale == 2.0


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigurationError, match="CELERY_TUNING_CONCURRENCY_SCALE"):
        load_config({}, environ={"CELERY_TUNING_CONCURRENCY_SCALE": "-1"})


def test_celery_conf_and_django_namespace():
    app = Celery("t", set_as_current=False)
    app.conf.update(tuning_rate_limits={"x": "5/s"})
    assert load_config(app.conf, environ={}).rate_limits["x"].rate.amount == 5

    class DjangoSettings:
        CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
        CELERY_TUNING_RATE_LIMITS = {"y": "7/m"}
        CELERY_TUNING_KEY_PREFIX = "shop"

    app2 = Celery("t2", set_as_current=False)
    app2.config_from_object(DjangoSettings, namespace="CELERY")
    cfg = load_config(app2.conf, environ={})
    assert cfg.rate_limits["y"].rate.period == 60
    assert cfg.key_prefix == "shop"


def test_django_namespace_unknown_key():
    class DjangoSettings:
        CELERY_TUNING_RATELIMITS = {}

    app = Celery("t3", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    with pytest.raises(ConfigurationError, match="CELERY_TUNING_RATELIMITS.*did you mean 'tuning_rate_limits'"):
        load_config(app.conf, environ={})


def test_settings_doc_is_generated_from_the_table():
    page = (ROOT / "docs" / "settings.md").read_text()
    assert page == render_settings_markdown(), "run: python docs/generate_settings.py"
    for setting in SETTINGS:
        assert f"`{setting.name}`" in page


def test_cli_reference_is_current():
    from celery_tuning.integration.cli import render_cli_markdown

    page = (ROOT / "docs" / "cli.md").read_text()
    assert page == render_cli_markdown(), "run: python docs/generate_cli.py"
    assert "## `celery -A proj tuning advise`" in page and "--metrics-url" in page


FLOAT_SETTINGS = [s.name for s in SETTINGS if s.type == "float (s)"]


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "inf"])
def test_a_duration_that_is_not_finite_names_its_setting(name, value):
    """NaN passed ``value < minimum`` and reached the worker (the mover died on int(nan));
    infinity overflowed the park store's microseconds."""
    assert FLOAT_SETTINGS  # the table has durations
    with pytest.raises(ConfigurationError, match=name):
        load_config({name: value}, environ={})
