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

    from celery_tuning.policy.cachekeys import MEMO_TEXT

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
        fresh.digester.memo.clear()
        assert fresh.digest(args, kwargs) == first

    check()
    # 1 == True == 1.0 in Python, but they are different calls: never memoized, never shared
    digests = {cache.digest((v,), {}) for v in (1, True, 1.0, "1")}
    assert len(digests) == 4
    assert (1,) not in cache.digester.memo and (True,) not in cache.digester.memo
    long_text = "x" * (MEMO_TEXT + 1)
    cache.digest((long_text,), {})
    assert (long_text,) not in cache.digester.memo  # big arguments are not kept alive by the memo
    with pytest.raises(TypeError):
        cache.digest(("a",), {"nope": "b"})


# -- what a hit hands out (#7) ----------------------------------------------------------------


def test_every_level_hands_out_a_fresh_copy_in_the_serializers_shape():
    """The computing call and each L1 hit return what an L2 hit would: a tuple comes back as a
    list and an int key as a str, and a caller mutating its value changes nobody else's."""
    for serializer in ("json", "msgpack"):
        cache = TwoLevelCache("t", SIG, store=None, l1_ttl=60, serializer=serializer)
        d = cache.digest(("a",), {})
        first = cache.get_or_compute(d, lambda: {"pair": (1, 2), "nested": {"k": [1]}})
        assert first == {"pair": [1, 2], "nested": {"k": [1]}}
        first["pair"].append(99)
        first["nested"]["k"].clear()
        second = cache.get_or_compute(d, lambda: pytest.fail("served from L1"))
        assert second == {"pair": [1, 2], "nested": {"k": [1]}}, serializer
        second["extra"] = 1
        assert cache.peek(d) == (True, {"pair": [1, 2], "nested": {"k": [1]}})
    cache = TwoLevelCache("t", SIG, store=None)
    d = cache.digest(("b",), {})
    assert cache.get_or_compute(d, lambda: {3: "x"}) == {"3": "x"}
    assert cache.get_or_compute(d, lambda: None) == {"3": "x"}


def test_values_that_are_not_cached_are_returned_as_computed():
    cache = TwoLevelCache("t", SIG, store=None, max_size=50)
    d1, d2 = cache.digest(("set",), {}), cache.digest(("big",), {})
    assert cache.get_or_compute(d1, lambda: {1, 2}) == {1, 2}
    big = ("x" * 100,)
    assert cache.get_or_compute(d2, lambda: big) is big  # too big to cache: untouched


def test_l1_is_bounded_by_bytes_as_well_as_entries():
    cache = TwoLevelCache("t", SIG, store=None, l1_maxsize=100, l1_max_bytes=2000)
    digests = [cache.digest((str(i),), {}) for i in range(10)]
    for d in digests:
        cache.get_or_compute(d, lambda: "v" * 600)
    kept = [d for d in digests if cache.peek(d)[0]]
    assert 1 <= len(kept) <= 3 and kept == digests[-len(kept):]
    huge = cache.digest(("huge",), {})
    cache.get_or_compute(huge, lambda: "h" * 5000)  # larger than the whole L1: not kept, no error
    assert cache.peek(huge) == (False, None)
    small = TwoLevelCache("t", SIG, store=None, l1_maxsize=4, l1_max_bytes=10**6)
    for i in range(10):
        small.get_or_compute(small.digest((str(i),), {}), lambda i=i: i)
    assert sum(small.peek(small.digest((str(i),), {}))[0] for i in range(10)) == 4
    tiny = TwoLevelCache("t", SIG, store=None, l1_maxsize=1024, l1_max_bytes=100)  # under a byte per entry
    for i in range(3):
        tiny.get_or_compute(tiny.digest((str(i),), {}), lambda: "x" * 20)  # 41 bytes encoded
    assert sum(tiny.peek(tiny.digest((str(i),), {}))[0] for i in range(3)) == 2


# -- invalidation messages (extras) -----------------------------------------------------------


def test_an_older_generation_never_replaces_a_newer_one():
    clock = Clock()
    cache = TwoLevelCache("t", SIG, store=None, clock=clock)
    cache.generations.note(7)
    cache.invalidations.on_message({"task": "t", "generation": 5})  # a late message of an earlier clear()
    assert cache.generations.known == 7
    cache.generations.note(6)  # a read that started before the clear() and finished after it
    assert cache.generations.known == 7
    cache.invalidations.on_message({"task": "t", "generation": 8})
    assert cache.generations.known == 8


def test_foreign_invalidation_messages_are_ignored_without_raising():
    cache = TwoLevelCache("t", SIG, store=None, l1_ttl=60)
    d = cache.digest(("a",), {})
    cache.get_or_compute(d, lambda: 1)
    for foreign in ({"task": "t", "generation": "x"}, {"task": "t", "generation": [1]},
                    {"task": "t", "digest": ["not", "hashable"]}, {"task": ["t"]}, {"task": "t", "digest": 5},
                    {"task": "t", "generation": 10**30}, {"task": "t", "generation": True}):
        cache.invalidations.on_message(foreign)
    assert cache.peek(d) == (True, 1)
    assert cache.generations.known is None
    cache.invalidations.on_message({"task": "t", "digest": d})
    assert cache.peek(d) == (False, None)


# -- keys are injective (#11) -----------------------------------------------------------------


def one(value):
    return canonical_arguments(SIG, (value,), {})


def test_sentinel_looking_dicts_do_not_share_a_key_with_what_they_look_like():
    nan, inf = float("nan"), float("inf")
    pairs = [
        (b"hi", {"__bytes__": "6869"}),
        (nan, {"__float__": "nan"}),
        (inf, {"__float__": "inf"}),
        (-inf, {"__float__": "-inf"}),
        ({"__bytes__": "6869"}, {"__dict__": {"__bytes__": "6869"}}),
        ({"__dict__": {}}, {}),
    ]
    for a, b in pairs:
        assert one(a) != one(b), (a, b)
    # the same dict in another call of the same task still finds its own entry
    assert one({"__bytes__": "6869"}) == one({"__bytes__": "6869"})


def _shape(value):
    """What a key must tell apart: type and value, with tuple == list and bytearray == bytes
    (Celery's JSON turns a tuple argument into a list on the way to the worker) and every nan
    equal to every other."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, (bytes, bytearray)):
        return ("bytes", bytes(value))
    if value is None:
        return ("none",)
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_shape(v) for v in value))
    return ("dict", frozenset((k, _shape(v)) for k, v in value.items()))


def test_distinct_arguments_get_distinct_keys():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    sentinel_keys = st.sampled_from(["__bytes__", "__float__", "__dict__", "__tuple__", "a"])
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(), st.text(max_size=4),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 1, True]),
        st.binary(max_size=3), st.sampled_from(["6869", "nan", "inf", "-inf"]),
    )
    values = st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.one_of(sentinel_keys, st.text(max_size=3)), inner, max_size=2),
        st.tuples(sentinel_keys, inner).map(lambda kv: {kv[0]: kv[1]}),
    ), max_leaves=6)

    def lookalike(value):
        # the JSON a sentinel encoding would give ``value``: the likeliest collision partner
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": bytes(value).hex()}
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            return {"__float__": repr(value)}
        if isinstance(value, (list, tuple)):
            return [lookalike(v) for v in value]
        if isinstance(value, dict):
            inner = {k: lookalike(v) for k, v in value.items()}
            return {"__dict__": inner} if len(inner) == 1 else inner
        return value

    pairs = values.flatmap(lambda a: st.tuples(st.just(a), st.one_of(values, st.just(lookalike(a)))))

    @settings(max_examples=600, deadline=None)
    @given(pairs)
    def check(pair):
        a, b = pair
        assert (one(a) == one(b)) == (_shape(a) == _shape(b)), (a, b)

    check()
    for a, b in ((b"hi", {"__bytes__": "6869"}), (float("nan"), {"__float__": "nan"}), (0.0, -0.0), (1, 1.0),
                 (1, True), ((1, 2), [1, 2])):
        assert (one(a) == one(b)) == (_shape(a) == _shape(b))


# -- a key function's result is encoded as canonically as arguments are -----------------------


def _key_digest(result):
    from celery_tuning.policy.cachekeys import key_function_digest

    return key_function_digest(lambda *a, **k: result, (), {})


def test_key_function_results_that_print_alike_get_distinct_keys():
    """A key function returning 1 and one returning "1" used to share an entry (str() of each)."""
    for a, b in ((1, "1"), (("a", "b"), "('a', 'b')"), (None, "None"), (True, "True"), (True, 1), (1, 1.0),
                 (b"hi", "b'hi'"), ({"a": 1}, "{'a': 1}"), ([1], "[1]")):
        assert _key_digest(a) != _key_digest(b), (a, b)
    # what Celery's JSON does to a tuple on the way to the worker must not split an entry
    assert _key_digest(("a", "b")) == _key_digest(["a", "b"])
    with pytest.raises(UncacheableArgument, match="key function"):
        _key_digest(object())


def test_key_function_digests_are_injective():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4),
                       st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=3))
    values = st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=2)), max_leaves=6)
    # the likeliest partner of a value is its own printed form
    pairs = values.flatmap(lambda a: st.tuples(st.just(a), st.one_of(values, st.just(str(a)), st.just(repr(a)))))

    @settings(max_examples=400, deadline=None)
    @given(pairs)
    def check(pair):
        a, b = pair
        assert (_key_digest(a) == _key_digest(b)) == (_shape(a) == _shape(b)), (a, b)

    check()
