"""The Redis layer against a real redis-server: naming, fork safety, NOSCRIPT, failures."""

import os
import time

import pytest

from celery_tuning.errors import StorageError
from celery_tuning.storage.redis import CLIENT_NAME, RedisConnector, get_connector, hash_tag, load_lua
from tests.support.fork import true_in_child

pytestmark = pytest.mark.integration


def test_client_is_named_and_shared(redis_clean):
    conn = get_connector(redis_clean.db_url(1))
    assert conn is get_connector(redis_clean.db_url(1))
    assert conn.client is conn.client
    conn.ping()
    names = [c["name"] for c in redis_clean.client().client_list()]
    assert CLIENT_NAME in names


def test_one_connection_per_process_in_steady_state(redis_clean):
    def ours():
        return [c for c in redis_clean.client().client_list() if c["name"] == CLIENT_NAME]

    before = len(ours())
    conn = RedisConnector(redis_clean.url)
    for _ in range(200):
        conn.evalsha("server_time", keys=[], args=[])
    assert len(ours()) == before + 1
    conn.close()


def test_new_client_after_fork(redis_clean):
    conn = RedisConnector(redis_clean.url)
    parent_client = conn.client
    conn.ping()
    # The child must build its own client, never reuse the parent's socket.
    assert true_in_child(lambda: conn.client is not parent_client and conn.ping() >= 0)
    assert conn.client is parent_client


def test_script_survives_redis_restart(fault_redis):
    conn = RedisConnector(fault_redis.url)
    first = conn.evalsha("server_time", keys=[], args=[])
    assert abs(first / 1000 - time.time()) < 5
    fault_redis.restart()  # scripts are gone: EVALSHA answers NOSCRIPT
    conn.client.connection_pool.disconnect()
    assert conn.evalsha("server_time", keys=[], args=[]) >= first


def test_dead_redis_is_a_bounded_storage_error_without_password(fault_redis):
    url = f"redis://:hunter2@127.0.0.1:{fault_redis.port}/0"
    fault_redis.stop()
    conn = RedisConnector(url, socket_timeout=0.2, connect_timeout=0.2)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        conn.ping()
    assert time.monotonic() - start < 2
    assert "hunter2" not in str(info.value)
    assert ":***@" in str(info.value)


def test_unresponsive_redis_times_out(fault_redis):
    import signal

    conn = RedisConnector(fault_redis.url, socket_timeout=0.3, connect_timeout=0.3)
    conn.ping()
    os.kill(fault_redis.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
    try:
        start = time.monotonic()
        with pytest.raises(StorageError, match="Timeout"):
            conn.ping()
        assert time.monotonic() - start < 2
    finally:
        os.kill(fault_redis.proc.pid, signal.SIGCONT)


def test_unix_socket_url(tmp_path):
    from celery_tuning.testing import RedisServer

    sock = tmp_path / "r.sock"
    server = RedisServer(extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"]).start()
    try:
        conn = RedisConnector(f"unix://{sock}?db=2")
        assert conn.ping() >= 0
        conn.run(lambda c: c.set("k", "v"))
        assert server.client(2).get("k") == b"v"
    finally:
        server.close()


def test_hash_tag_and_lua_package_data():
    assert hash_tag("tuning", "rl", "openai") == "tuning:rl:{openai}"
    assert "KEYS" in load_lua("server_time")
