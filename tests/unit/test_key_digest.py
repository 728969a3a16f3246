"""Caller keys (per-key limits, caps, fair queues) are identified by ``str(key)``: a key whose
``str()`` differs between processes is refused, naming ``key=``, instead of silently giving each
process (and each call) a bucket of its own."""

import pytest

from celery_tuning import ConfigurationError
from celery_tuning.ratelimit import hash_key
from celery_tuning.storage.keys import key_digest


class Tenant:  # no __str__ / __repr__: str() shows the object's address
    def __init__(self, name):
        self.name = name


class Named:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


@pytest.mark.parametrize("value", [Tenant("acme"), {"eu", "acme"}, frozenset({1, 2}), ("acme", Tenant("x")),
                                   [1, {2, 3}], {"tier": {"a", "b"}}])
def test_a_key_whose_str_is_not_stable_is_refused_naming_key(value):
    for digest in (key_digest, hash_key):
        with pytest.raises(ConfigurationError, match="key=.*differs between processes"):
            digest(value)


@pytest.mark.parametrize(("value", "same_as"), [(42, "42"), (("a", 1), "('a', 1)"), (Named("acme"), "acme"),
                                                (None, "None"), (b"x", "b'x'"), (1.5, "1.5"), ({"k": 1}, "{'k': 1}")])
def test_stable_keys_digest_as_their_str(value, same_as):
    assert key_digest(value) == key_digest(same_as) == hash_key(value)
    assert len(key_digest(value)) == 24
