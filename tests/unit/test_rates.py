import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_tuning.policy.rates import Rate, parse_rate


@pytest.mark.parametrize(
    ("text", "amount", "period"),
    [("20/s", 20, 1), ("1200/m", 1200, 60), ("5000/h", 5000, 3600), ("0.5/s", 0.5, 1), (" 7 / min ", 7, 60)],
)
def test_parse_accepted_forms(text, amount, period):
    rate = parse_rate(text)
    assert rate == Rate(amount, period)
    assert rate.interval == pytest.approx(period / amount)


@pytest.mark.parametrize("text", ["20/x", "20", "/s", "-1/s", "0/s", "abc", "", "20/s/s"])
def test_parse_rejects_with_accepted_forms(text):
    with pytest.raises(ValueError, match="'20/s', '1200/m' or '5000/h'|more than zero"):
        parse_rate(text)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate(20)  # type: ignore[arg-type]


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["s", "m", "h"]))
def test_round_trip_through_str(n, unit):
    rate = parse_rate(f"{n}/{unit}")
    assert parse_rate(str(rate)) == rate


@pytest.mark.parametrize("text", ["1000001/s", "2000000/s", "1000000000/s", "3600000001/h"])
def test_rates_above_a_million_per_second_are_refused_not_clamped(text):
    """The emission interval is whole µs: 1e9/s was accepted and kept as 1e6/s without a word."""
    with pytest.raises(ValueError, match="above 1,000,000/s"):
        parse_rate(text)


def test_a_million_per_second_is_still_accepted():
    assert parse_rate("1000000/s").per_second == 1_000_000
