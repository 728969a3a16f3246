"""The breaker's reference state machine (policy/breaker.py) on its own: pure, time passed in."""

import pytest

from celery_tuning.policy.breaker import CLOSED, HALF_OPEN, OPEN, OPERATIONS, BreakerState, apply
from celery_tuning.storage.breaker import BreakerParams

P = BreakerParams.make("tuning", "pay", reset_timeout=10, fail_max=2, success_threshold=1, trial_timeout=5)
SEC = 1_000_000


def run(ops, state=None, now=0):
    snap = None
    for op, token in ops:
        state, snap = apply(state, P, op, token, now)
    return state, snap


def test_nothing_stored_reads_closed_and_status_stores_nothing():
    state, snap = apply(None, P, "status", "", 123)
    assert state is None and snap == (CLOSED, 0, 0, 0, False)


def test_a_full_cycle_closed_open_half_open_closed():
    state, snap = run([("failure", ""), ("failure", "")])
    assert (snap.state, snap.version, snap.remaining_us) == (OPEN, 1, 10 * SEC)
    state, snap = apply(state, P, "trial", "A", 9 * SEC)
    assert not snap.granted and snap.remaining_us == SEC
    state, snap = apply(state, P, "trial", "A", 10 * SEC)
    assert (snap.state, snap.granted, snap.remaining_us) == (HALF_OPEN, True, 5 * SEC)
    assert state is not None and state.holder == "A"
    state, snap = apply(state, P, "success", "A", 11 * SEC)
    assert (snap.state, snap.failures, snap.version) == (CLOSED, 0, 3)


def test_inputs_are_never_mutated_and_reset_deletes():
    before = BreakerState(state=OPEN, failures=2, opened_at=0, version=1)
    after, _ = apply(before, P, "close", "", 0)
    assert before == BreakerState(state=OPEN, failures=2, opened_at=0, version=1)
    assert after == BreakerState(state=CLOSED, version=2)
    assert apply(after, P, "reset", "", 0) == (None, (CLOSED, 0, 0, 0, False))


def test_every_operation_is_known_and_others_are_refused():
    for op in OPERATIONS:
        apply(None, P, op, "", 0)
    with pytest.raises(ValueError, match="unknown breaker operation 'explode'"):
        apply(None, P, "explode", "", 0)


def test_the_policy_reads_no_clock_and_imports_no_io():
    import ast
    import inspect

    import celery_tuning.policy.breaker as module

    tree = ast.parse(inspect.getsource(module))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"time", "datetime", "redis", "celery", "threading", "socket"}, imported
