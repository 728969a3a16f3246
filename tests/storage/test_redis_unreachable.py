"""A tuning Redis that cannot be reached fails fast, as StorageError, in every topology."""

import time

import pytest

from celery_tuning.errors import StorageError
from celery_tuning.storage.redis import RedisConnector
from celery_tuning.testing import free_port

URLS = {
    "standalone": "redis://:pw@127.0.0.1:{port}/0",
    "cluster": "redis+cluster://:pw@127.0.0.1:{port}",
    "sentinel": "sentinel://:pw@127.0.0.1:{port};sentinel://127.0.0.1:{port2}/0?master_name=m",
}


@pytest.mark.parametrize("kind", sorted(URLS))
def test_every_call_on_a_closed_port_is_a_quick_storage_error(kind):
    """A Cluster client connects when made: that failure was a raw RedisClusterException from
    evalsha/get; with every sentinel down a call waited ~60 s in redis-py's default retries."""
    port = free_port()
    connector = RedisConnector(URLS[kind].format(port=port, port2=port + 1), socket_timeout=0.2,
                               connect_timeout=0.2)
    for call in (connector.ping, lambda: connector.evalsha("server_time", [], []),
                 lambda: connector.get("k"), lambda: connector.evalsha_many("server_time", [([], [])])):
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            call()
        assert time.monotonic() - start < 3
        assert "pw" not in str(info.value).replace("password", "")
