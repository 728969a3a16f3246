import pytest

from celery_tuning import ConfigurationError, cache_result, circuit_breaker, rate_limit, sla
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


@pytest.mark.parametrize("decorator", [rate_limit, circuit_breaker, cache_result])
def test_capabilities_not_built_yet_fail_loudly(decorator):
    with pytest.raises(NotImplementedError, match="not available in this version"):
        decorator("x")
