"""The lean path's kept connections when the server closed them before the next call.

A connection kept from a call less than IDLE_TRUST ago skips the pool's readiness check; when
the server closed it meanwhile (a Redis restarted within that time, CLIENT KILL), the call is
made once more on a connection through the pool's check instead of failing (and applying the
fallback policy). IDLE_TRUST is raised for these tests so the kept connection is the one used
however slow this machine is: otherwise the pool's check would hide what they test.
"""

import pytest

from celery_tuning.errors import StorageError
from celery_tuning.storage import redis as storage_redis
from celery_tuning.storage.redis import RedisConnector

pytestmark = pytest.mark.integration

#: The connector's own client name: the session's server also holds other tests' connections.
NAME = "celery-tuning-kept-test"


@pytest.fixture()
def trust_kept(monkeypatch):
    monkeypatch.setattr(storage_redis, "IDLE_TRUST", 60.0)


def kill_ours(server) -> int:
    """Closes every connection of ours on ``server`` (as a restart would); how many there were."""
    admin = server.client()
    ids = [c["id"] for c in admin.client_list() if c["name"] == NAME]
    for client_id in ids:
        admin.execute_command("CLIENT", "KILL", "ID", client_id)
    return len(ids)


def test_a_kept_connection_closed_by_the_server_is_replaced_not_failed(redis_clean, trust_kept):
    conn = RedisConnector(redis_clean.db_url(1), socket_timeout=0.5, connect_timeout=0.5, client_name=NAME)
    try:
        redis_clean.client(1).set("k", "v")
        assert conn.get("k") == b"v"
        first = conn.evalsha("server_time", keys=[], args=[])
        assert len(conn._process.get().idle) == 1, "the connection is kept for the next call"
        assert kill_ours(redis_clean) == 1
        assert conn.get("k") == b"v"  # GET: the lean path
        assert kill_ours(redis_clean) == 1
        assert conn.evalsha("server_time", keys=[], args=[]) >= first  # EVALSHA: the lean path
        assert kill_ours(redis_clean) == 1
        conn.evalsha_many("server_time", [([], []), ([], [])])  # pipelined on one connection
        assert kill_ours(redis_clean) == 1  # still one connection: the closed ones were not kept
    finally:
        conn.close()


def test_a_restart_between_two_calls_costs_no_failed_call(fault_redis, trust_kept):
    """Scripts and state are gone too: the replacement connection meets NOSCRIPT and loads them."""
    conn = RedisConnector(fault_redis.db_url(1), socket_timeout=0.5, connect_timeout=0.5)
    try:
        first = conn.evalsha("server_time", keys=[], args=[])
        fault_redis.restart()
        assert conn.evalsha("server_time", keys=[], args=[]) >= first
    finally:
        conn.close()


def test_a_server_that_stays_down_still_fails_the_call(fault_redis, trust_kept):
    conn = RedisConnector(fault_redis.db_url(1), socket_timeout=0.2, connect_timeout=0.2)
    try:
        conn.evalsha("server_time", keys=[], args=[])
        fault_redis.stop()
        with pytest.raises(StorageError, match="server_time"):
            conn.evalsha("server_time", keys=[], args=[])
        assert conn._process.get().idle == [], "no broken connection is kept"
    finally:
        fault_redis.start()
        conn.close()
