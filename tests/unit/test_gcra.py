"""The GCRA oracle: token-bucket properties with a manual clock (no I/O, no sleeps)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from celery_tuning.policy.gcra import GcraState, adaptive_interval, gcra_acquire, gcra_pause, interval_us


def run(times, interval, burst, cost=1):
    tat, admitted = None, []
    for now in times:
        r = gcra_acquire(tat, now, interval, burst, cost)
        if r.allowed:
            tat = r.new_state
            admitted.append(now)
    return admitted


def test_burst_then_steady_rate():
    interval = interval_us(1, 50)  # 50/s
    assert interval == 20_000
    # hammer every millisecond over [0 s, 6 s]: burst 5 + 6 s * 50/s = 305
    admitted = run(range(0, 6_000_001, 1000), interval, 5)
    assert len(admitted) == 305


def test_refusal_says_when_to_come_back():
    tat = None
    for _ in range(3):
        r = gcra_acquire(tat, 0, 100, 3)
        assert r.allowed and r.wait_us == 0
        tat = r.new_state
    r = gcra_acquire(tat, 0, 100, 3)
    assert not r.allowed and r.wait_us == 100 and r.new_state is None
    assert gcra_acquire(tat, 100, 100, 3).allowed


def test_reservation_spaces_callers_at_the_rate():
    tat, waits = None, []
    for _ in range(6):
        r = gcra_acquire(tat, 0, 100, 2, reserve=10_000)
        assert r.allowed
        tat = r.new_state
        waits.append(r.wait_us)
    assert waits == [0, 0, 100, 200, 300, 400]


def test_reserve_limit_refuses_far_slots():
    r = gcra_acquire(GcraState(10_000, 10_000), 0, 100, 1, reserve=500)
    assert not r.allowed and r.wait_us == 10_100 - 100


def test_weighted_cost():
    r = gcra_acquire(None, 0, 100, 5, cost=5)
    assert r.allowed
    assert not gcra_acquire(r.new_state, 0, 100, 5, cost=1).allowed
    assert gcra_acquire(r.new_state, 300, 100, 5, cost=3).allowed


def test_pause_holds_everything_until_it_ends():
    tat = gcra_pause(None, 0, 100, 5, 1000)
    assert not gcra_acquire(tat, 999, 100, 5).allowed
    assert gcra_acquire(tat, 1000, 100, 5).allowed


def test_adaptive_interval_recovers():
    assert adaptive_interval(100, None, None, 0.0, 0) == 100
    assert adaptive_interval(100, 0.5, 0, 0.001, 0) == 200
    assert adaptive_interval(100, 0.5, 0, 0.001, 250) == 133
    assert adaptive_interval(100, 0.5, 0, 0.001, 500) == 100


@settings(max_examples=200, deadline=None)
@given(
    amount=st.integers(1, 200),
    burst=st.integers(1, 20),
    gaps=st.lists(st.integers(0, 200_000), min_size=1, max_size=300),
)
def test_never_more_than_burst_plus_elapsed_over_interval(amount, burst, gaps):
    interval = interval_us(1, amount)
    times, now = [], 0
    for gap in gaps:
        now += gap
        times.append(now)
    admitted = run(times, interval, burst)
    # any window [a, b] of admissions holds at most burst + (b - a) / interval of them
    for i in range(len(admitted)):
        for j in range(i, min(len(admitted), i + 40)):
            assert j - i + 1 <= burst + (admitted[j] - admitted[i]) // interval
