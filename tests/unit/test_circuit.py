"""The breaker as composition: SharedCircuit alone, SharedBreaker as its pybreaker face.

The in-process reference store stands in for the shared one here (the Redis store runs the same
contract in tests/storage); the integration tests run the breaker against a real redis-server.
"""

import pybreaker
import pytest

from celery_tuning.circuit import CircuitEvents, CircuitOpen, SharedBreaker, SharedCircuit
from celery_tuning.storage.breaker import BreakerParams, MemoryBreakerStore


class Recorder(CircuitEvents):
    def __init__(self):
        self.seen = []

    def state_changed(self, old, new, reason):
        self.seen.append(("state", old, new))

    def before_call(self, func, args, kwargs):
        self.seen.append(("before", args))

    def succeeded(self):
        self.seen.append(("success",))

    def failed(self, exc):
        self.seen.append(("failure", type(exc).__name__))


def circuit(**options):
    params = BreakerParams.make("tuning", "c", reset_timeout=60, fail_max=2, success_threshold=1, trial_timeout=5)
    return SharedCircuit("c", store=MemoryBreakerStore(), params=params, refresh_interval=0, **options)


def _boom():
    raise ValueError("down")


def test_the_circuit_stands_alone_without_pybreaker():
    assert not isinstance(circuit(), pybreaker.CircuitBreaker)
    events = Recorder()
    c = circuit(events=events, neutral=(KeyError,), is_failure=lambda exc: not isinstance(exc, LookupError))
    assert c.call(lambda x: x, 1) == 1
    with pytest.raises(KeyError):  # neutral: nothing counted
        c.call(lambda: {}["x"])
    with pytest.raises(IndexError):  # excluded: a success
        c.call(lambda: [][1])
    with pytest.raises(ValueError):
        c.call(_boom)
    with pytest.raises(CircuitOpen) as info:  # the second failure trips it
        with c:
            raise ValueError("down")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(CircuitOpen):
        c.call(lambda: None)
    assert events.seen == [("before", (1,)), ("success",), ("before", ()), ("before", ()), ("success",),
                           ("before", ()), ("failure", "ValueError"),
                           ("state", "closed", "open"), ("failure", "ValueError")]  # the store answers first


def test_settlement_by_outcome_is_the_one_path():
    c = circuit()
    assert c.settle(c.admit()) is False
    assert c.settle(None, ValueError()) is False
    assert c.settle(None, ValueError()) is True  # fail_max=2
    assert c.refresh().state == "open"


def test_the_adapter_is_a_pybreaker_breaker_writing_none_of_its_private_state():
    seen = []

    class Listener(pybreaker.CircuitBreakerListener):
        def state_change(self, cb, old_state, new_state):
            seen.append((cb.name, old_state.name, new_state.name))

        def failure(self, cb, exc):
            seen.append(("failure", type(exc).__name__))

    b = SharedBreaker("p", store=MemoryBreakerStore(), fail_max=1, refresh_interval=0, listeners=[Listener()])
    assert isinstance(b, pybreaker.CircuitBreaker) and isinstance(b.circuit, SharedCircuit)
    private = {k: v for k, v in vars(b).items() if k.startswith("_")}
    with pytest.raises(pybreaker.CircuitBreakerError):
        b.call(_boom)
    assert b.current_state == "open" and b.state.name == "open" and b.fail_counter == 1
    b.state = "closed"
    assert b.current_state == "closed"
    assert {k: v for k, v in vars(b).items() if k.startswith("_")} == private
    assert seen == [("p", "closed", "open"), ("failure", "ValueError"), ("p", "open", "closed")]
    assert (b.store, b.params, b.degraded) == (b.circuit.store, b.circuit.params, False)


def test_the_adapter_settings_are_writable_as_before_the_split():
    from celery_tuning.circuit import SharedBreaker
    from celery_tuning.storage.breaker import MemoryBreakerStore

    b = SharedBreaker("w", store=MemoryBreakerStore(), fail_max=1, reset_timeout=1)
    b.refresh_interval = 0
    b.on_redis_error = "open"
    assert (b.circuit.refresh_interval, b.circuit.on_redis_error) == (0, "open")
    assert (b.refresh_interval, b.on_redis_error) == (0, "open")
