"""Bad input, fuzzed: rate strings, setting dicts, cache keys and bytes read from Redis."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_tuning.cache import TwoLevelCache
from celery_tuning.conf import SETTINGS, load_config
from celery_tuning.errors import ConfigurationError
from celery_tuning.policy.cachekeys import call_digest, canonical_arguments
from celery_tuning.policy.codec import CorruptValue, decode, encode
from celery_tuning.policy.rates import parse_rate

pytestmark = pytest.mark.reliability

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values of every shape a config file or an environment can hold.
ANY_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
              st.binary(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


@FUZZ
@given(st.text(max_size=20))
def test_rate_strings_parse_or_raise_value_error(text):
    try:
        rate = parse_rate(text)
    except ValueError:
        return
    assert rate.count > 0 and rate.period > 0


@FUZZ
@given(st.sampled_from([s.name for s in SETTINGS]), ANY_VALUE)
def test_any_setting_value_is_accepted_or_named_in_one_error(name, value):
    try:
        load_config({name: value}, environ={})
    except ConfigurationError as exc:
        assert str(exc).startswith(name), (name, value, str(exc))
        assert "\n" not in str(exc)


def target(text, n=0, *, extra=None):
    pass


SIG = inspect.signature(target)
ADVERSARIAL = st.one_of(
    st.text(alphabet=st.sampled_from([":", "{", "}", "*", "\\", '"', "é", "😀", "\x00", "a", " "]), max_size=12),
    st.text(max_size=12),
)
HUGE = st.one_of(st.integers(), st.integers(min_value=2**63, max_value=2**200))


@FUZZ
@given(ADVERSARIAL, HUGE, st.one_of(st.none(), st.dictionaries(ADVERSARIAL, HUGE, max_size=3)))
def test_equal_calls_share_a_key_in_every_form(text, n, extra):
    forms = [((text, n), {"extra": extra}), ((text,), {"n": n, "extra": extra}), ((), {"text": text, "n": n,
                                                                                        "extra": extra})]
    if extra is None:
        forms.append(((text, n), {}))
    digests = {call_digest(canonical_arguments(SIG, a, k)) for a, k in forms}
    assert len(digests) == 1
    cache = TwoLevelCache("t", SIG, store=None)
    assert {cache.digest(a, k) for a, k in forms} == digests


@FUZZ
@given(ADVERSARIAL, ADVERSARIAL, HUGE, HUGE)
def test_different_calls_get_different_keys(a, b, n, m):
    if (a, n) == (b, m):
        return
    assert call_digest(canonical_arguments(SIG, (a, n), {})) != call_digest(canonical_arguments(SIG, (b, m), {}))


def test_type_confusions_are_different_calls():
    keys = {call_digest(canonical_arguments(SIG, (v,), {})) for v in ("1", 1, 1.0, True, b"1", [1], {"1": 1})}
    assert len(keys) == 7


@FUZZ
@given(st.binary(max_size=64))
def test_any_bytes_from_redis_decode_or_are_corrupt(raw):
    try:
        decode(raw)
    except CorruptValue:
        pass


@FUZZ
@given(st.binary(max_size=64), st.sampled_from(["json", "msgpack"]))
def test_damaged_values_are_a_miss_never_an_exception(garbage, serializer):
    cache = TwoLevelCache("t", SIG, store=None)
    good = encode({"v": [1, 2, 3]}, serializer, 0)
    for raw in (garbage, good[: len(good) // 2], good[:6] + garbage, good + garbage):
        ok, value, _ = cache._decode(raw)
        assert ok or value is None
