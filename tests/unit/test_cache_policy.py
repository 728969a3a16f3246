"""Cache keys, value codec and the L1 layer (no I/O, manual clock)."""

import inspect
import pickle

import pytest

from celery_tuning.cache import TwoLevelCache
from celery_tuning.policy.cachekeys import UncacheableArgument, call_digest, canonical_arguments
from celery_tuning.policy.codec import CorruptValue, decode, encode


def fn(text, model="small", *, options=None):
    pass


SIG = inspect.signature(fn)


def test_positional_keyword_and_default_forms_share_a_key():
    a = canonical_arguments(SIG, ("hi",), {})
    b = canonical_arguments(SIG, (), {"text": "hi", "model": "small"})
    c = canonical_arguments(SIG, ("hi", "small"), {"options": None})
    assert a == b == c
    assert call_digest(a) != call_digest(canonical_arguments(SIG, ("hi", "large"), {}))


def test_dict_order_does_not_matter_and_vary_on_filters():
    a = canonical_arguments(SIG, ("x",), {"options": {"a": 1, "b": 2}})
    b = canonical_arguments(SIG, ("x",), {"options": {"b": 2, "a": 1}})
    assert a == b
    assert canonical_arguments(SIG, ("x", "m1"), {}, vary_on=["text"]) == canonical_arguments(
        SIG, ("x", "m2"), {}, vary_on=["text"])


def test_uncacheable_argument_is_named():
    with pytest.raises(UncacheableArgument, match="argument 'options' \\(object\\)"):
        canonical_arguments(SIG, ("x",), {"options": object()})


def test_codec_round_trips_and_rejects_foreign_bytes():
    for serializer in ("json", "msgpack"):
        value, used, _ = decode(encode({"a": [1, 2.5, "x"], "b": None}, serializer))
        assert value == {"a": [1, 2.5, "x"], "b": None} and used == serializer
    with pytest.raises(TypeError):
        encode(object(), "json")
    for foreign in (b"garbage", pickle.dumps({"a": 1}), b"ct2j:1:{not json", b"", b"ct2m:0:\xc1", b"ct2j:x:1"):
        with pytest.raises(CorruptValue):
            decode(foreign)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_l1_only_cache_with_manual_clock():
    clock = Clock()
    runs = []
    cache = TwoLevelCache("t", SIG, store=None, ttl=100, l1_ttl=10, l1_maxsize=2, clock=clock)

    def compute(v):
        def run():
            runs.append(v)
            return v

        return run

    d1, d2, d3 = (cache.digest((t,), {}) for t in ("a", "b", "c"))
    assert cache.get_or_compute(d1, compute(1)) == 1
    assert cache.get_or_compute(d1, compute(99)) == 1
    clock.now += 10.5  # L1 TTL over
    assert cache.get_or_compute(d1, compute(2)) == 2
    cache.get_or_compute(d2, compute(3))
    cache.get_or_compute(d3, compute(4))  # maxsize 2 evicts the oldest
    assert cache.peek(d1) == (False, None)
    assert runs == [1, 2, 3, 4]


def test_l1_never_outlives_l2():
    cache = TwoLevelCache("t", SIG, store=None, ttl=5, l1_ttl=60)
    assert cache.l1_ttl == 5


def test_exceptions_are_not_cached():
    cache = TwoLevelCache("t", SIG, store=None)
    d = cache.digest(("a",), {})

    def boom():
        raise ValueError("no")

    with pytest.raises(ValueError):
        cache.get_or_compute(d, boom)
    assert cache.get_or_compute(d, lambda: "ok") == "ok"


def test_fast_binder_agrees_with_signature_bind():
    from hypothesis import given
    from hypothesis import strategies as st

    from celery_tuning.policy.cachekeys import ArgumentBinder, canonical_call

    binder = ArgumentBinder(SIG)
    assert binder.fast
    values = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3))

    @given(values, st.one_of(st.just(None), values), st.one_of(st.just(None), values), st.booleans())
    def check(text, model, options, model_as_kw):
        args, kwargs = (text,), {}
        if model is not None:
            if model_as_kw:
                kwargs["model"] = model
            else:
                args = (text, model)
        if options is not None:
            kwargs["options"] = options
        assert canonical_call(binder, args, kwargs) == canonical_arguments(SIG, args, kwargs)

    check()
    for bad_args, bad_kwargs in (((), {}), (("a",), {"text": "b"}), (("a",), {"nope": 1}), (("a", "b", "c"), {})):
        with pytest.raises(TypeError):
            canonical_call(binder, bad_args, bad_kwargs)


def test_digest_memo_agrees_with_the_canonical_digest():
    """Memoized digests (short str arguments) equal the computed ones; other types never share."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from celery_tuning.cache import _MEMO_TEXT

    cache = TwoLevelCache("t", SIG, store=None)
    fresh = TwoLevelCache("t", SIG, store=None)

    @settings(max_examples=200)
    @given(st.text(max_size=20), st.one_of(st.just(None), st.text(max_size=5)), st.booleans())
    def check(text, model, as_kw):
        args, kwargs = (text,), {}
        if model is not None:
            if as_kw:
                kwargs["model"] = model
            else:
                args = (text, model)
        first = cache.digest(args, kwargs)
        assert first == cache.digest(args, kwargs) == call_digest(canonical_arguments(SIG, args, kwargs))
        fresh._digests.clear()
        assert fresh.digest(args, kwargs) == first

    check()
    # 1 == True == 1.0 in Python, but they are different calls: never memoized, never shared
    digests = {cache.digest((v,), {}) for v in (1, True, 1.0, "1")}
    assert len(digests) == 4
    assert (1,) not in cache._digests and (True,) not in cache._digests
    long_text = "x" * (_MEMO_TEXT + 1)
    cache.digest((long_text,), {})
    assert (long_text,) not in cache._digests  # big arguments are not kept alive by the memo
    with pytest.raises(TypeError):
        cache.digest(("a",), {"nope": "b"})
