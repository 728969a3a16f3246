"""Our RESP packer writes exactly what redis-py's does, and leaves other types to it."""

from hypothesis import given
from hypothesis import strategies as st
from redis.connection import Connection

from celery_tuning.storage.redis import pack_command

_args = st.one_of(st.text(), st.binary(max_size=10_000), st.integers(min_value=-2**70, max_value=2**70))


@given(st.lists(_args, max_size=12))
def test_same_bytes_as_redis_py(args):
    command = ("EVALSHA", *args)
    assert pack_command(command) == b"".join(Connection().pack_command(*command))


def test_other_types_are_left_to_redis_py():
    for odd in (1.5, True, memoryview(b"x"), None):
        assert pack_command(("SET", "k", odd)) is None
