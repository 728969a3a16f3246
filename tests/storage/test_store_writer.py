"""Deferred cache stores (StoreWriter) and pipelined scripts against a real redis-server."""

import pytest

from celery_tuning.errors import StorageError
from celery_tuning.storage.cache import RedisCacheStore, StoreWriter
from celery_tuning.storage.redis import RedisConnector
from tests.support.fork import true_in_child

pytestmark = pytest.mark.integration


def _lock(client, key, token):
    client.set(f"{key}:lock", token, px=60_000)


def test_deferred_stores_land_and_release_their_locks(redis_clean):
    conn = RedisConnector(redis_clean.url)
    store = RedisCacheStore(conn)
    client = redis_clean.client()
    errors = []
    for i in range(300):
        _lock(client, f"v{i}", f"t{i}")
        store.store_later(f"v{i}", f"v{i}:lock", f"value{i}".encode(), 60_000, f"t{i}", errors.append)
    assert store.flush(5.0)
    assert errors == []
    assert [client.get(f"v{i}") for i in (0, 150, 299)] == [b"value0", b"value150", b"value299"]
    assert not any(client.exists(f"v{i}:lock") for i in range(300)), "each store released its lock"
    assert 0 < client.pttl("v7") <= 60_000
    conn.close()


def test_pipelined_scripts_survive_a_script_flush(redis_clean):
    conn = RedisConnector(redis_clean.url)
    client = redis_clean.client()
    conn.evalsha_many("cache_store", [(["a", "a:lock"], [b"1", 60_000, "t"])])
    client.script_flush()  # as after a restart: every EVALSHA in the next batch answers NOSCRIPT
    conn.evalsha_many("cache_store", [([f"k{i}", f"k{i}:lock"], [b"x", 60_000, "t"]) for i in range(5)])
    assert [client.get(f"k{i}") for i in range(5)] == [b"x"] * 5
    conn.close()


def test_store_errors_reach_the_handler_and_the_writer_carries_on(fault_redis):
    conn = RedisConnector(fault_redis.url, socket_timeout=0.2, connect_timeout=0.2)
    writer = StoreWriter(conn)
    errors = []
    fault_redis.stop()
    for i in range(3):
        assert writer.submit([f"v{i}", f"v{i}:lock"], [b"x", 1000, "t"], errors.append)
    assert writer.flush(5.0)
    assert len(errors) == 3 and all(isinstance(e, StorageError) for e in errors)
    assert "cache_store" in str(errors[0])
    fault_redis.start()
    assert writer.submit(["back", "back:lock"], [b"y", 60_000, "t"], errors.append)
    assert writer.flush(5.0)
    assert fault_redis.client().get("back") == b"y" and len(errors) == 3
    conn.close()


def test_a_full_writer_makes_the_caller_store_itself(redis_clean):
    conn = RedisConnector(redis_clean.url)
    writer = StoreWriter(conn, max_jobs=0)
    assert not writer.submit(["v", "v:lock"], [b"x", 1000, "t"], lambda exc: None)
    small = StoreWriter(conn, max_bytes=10)
    assert not small.submit(["v", "v:lock"], [b"x" * 11, 1000, "t"], lambda exc: None)
    assert small.submit(["v", "v:lock"], [b"x" * 10, 1000, "t"], lambda exc: None)
    assert small.flush(5.0) and redis_clean.client().get("v") == b"x" * 10
    conn.close()


def test_a_forked_child_starts_its_own_writer(redis_clean):
    conn = RedisConnector(redis_clean.url)
    writer = StoreWriter(conn)
    client = redis_clean.client()
    assert writer.submit(["p0", "p0:lock"], [b"parent", 60_000, "t"], lambda exc: None)
    assert writer.flush(5.0)
    # The child gets a fresh queue and thread: its store lands and its flush answers True.
    assert true_in_child(lambda: writer.submit(["c", "c:lock"], [b"child", 60_000, "t"], lambda exc: None)
                         and writer.flush(5.0))
    assert client.get("c") == b"child" and client.get("p0") == b"parent"
    assert writer.pending() == 0
    conn.close()


def test_no_thread_for_the_writer_means_the_caller_stores_itself(redis_clean, monkeypatch):
    conn = RedisConnector(redis_clean.url)
    store = RedisCacheStore(conn)

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr("threading.Thread.start", refuse)
    store.store_later("v", "v:lock", b"x", 60_000, "t", lambda exc: None)  # no error reaches the task
    assert redis_clean.client().get("v") == b"x", "stored synchronously, before store_later returned"
    monkeypatch.undo()
    conn.close()


def test_a_child_forked_while_the_writer_registry_was_locked_can_store(redis_clean):
    import signal

    from celery_tuning.storage import cache_writer

    conn = RedisConnector(redis_clean.url)
    client = redis_clean.client()

    def in_child():
        signal.alarm(5)  # a deadlock ends the child, and the check answers False
        store = RedisCacheStore(conn)
        store.store_later("f", "f:lock", b"forked", 60_000, "t", lambda exc: None)
        return store.flush(2.0) and client.get("f") == b"forked"

    with cache_writer._writers.get().lock:  # as if another thread were registering a writer at fork()
        assert true_in_child(in_child)
    conn.close()


def test_synchronous_stores_keep_one_pool_connection_and_store_right_away(fault_redis):
    """The design's bar (one pool connection per process) holds with synchronous stores
    (``tuning_cache_write_behind=False``): 300 misses in a row, each value in Redis when its call
    returns. A private server: other tests' background threads (lease and lock renewers,
    listeners) reconnect to the shared one at any moment and would be counted."""
    import inspect

    from celery_tuning.cache import TwoLevelCache
    from celery_tuning.conf import load_config
    from celery_tuning.storage.redis import CLIENT_NAME

    assert load_config({}, environ={}).cache_write_behind is True, "deferred stores are the default"

    def pool_connections():
        return [c for c in fault_redis.client().client_list() if c["name"] == CLIENT_NAME and c["cmd"] != "subscribe"]

    before = len(pool_connections())
    conn = RedisConnector(fault_redis.url)
    cache = TwoLevelCache("t.conns", inspect.signature(lambda x: None), store=RedisCacheStore(conn))
    for i in range(300):
        assert cache.get_or_compute(f"d{i}", lambda i=i: i) == i
        if i % 100 == 0:
            value_key = cache.keys.value(cache._current_generation(), f"d{i}")
            assert fault_redis.client().exists(value_key), "stored before returning"
    assert len(pool_connections()) == before + 1
    cache.invalidate_digest("d0")  # flushes deferred stores first: with none deferred, no writer is made
    from celery_tuning.storage.cache_writer import existing_writer

    assert existing_writer(conn) is None
    conn.close()


def test_deferred_stores_ride_the_next_lookup_and_keep_one_pool_connection(fault_redis):
    """With deferred stores (the default), a busy process's queued stores travel with its next
    lookup: 300 misses in a row still hold one pool connection, and every value lands."""
    import inspect

    from celery_tuning.cache import TwoLevelCache
    from celery_tuning.storage.redis import CLIENT_NAME

    def pool_connections():
        return [c for c in fault_redis.client().client_list() if c["name"] == CLIENT_NAME and c["cmd"] != "subscribe"]

    before = len(pool_connections())
    conn = RedisConnector(fault_redis.url)
    cache = TwoLevelCache("t.deferred", inspect.signature(lambda x: None), store=RedisCacheStore(conn),
                          write_behind=True)
    for i in range(300):
        assert cache.get_or_compute(f"d{i}", lambda i=i: i) == i
    assert cache.flush(2.0)
    assert len(pool_connections()) == before + 1
    generation = cache._current_generation()
    client = fault_redis.client()
    assert all(client.exists(cache.keys.value(generation, f"d{i}")) for i in range(300))
    conn.close()
