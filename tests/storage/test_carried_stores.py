"""Deferred cache stores carried by the next lookup's round trip, against a real redis-server."""

import pytest

from celery_tuning.storage.cache import RedisCacheStore
from celery_tuning.storage.cache_writer import existing_writer, writer_for
from celery_tuning.storage.redis import RedisConnector

pytestmark = pytest.mark.integration


def _writer_that_never_writes_itself(conn):
    writer = writer_for(conn)
    writer.linger = 3600.0  # only a lookup (or a flush) sends what is queued
    return writer


def _queue(store, client, names, errors):
    for name in names:
        client.set(f"{name}:lock", f"t-{name}", px=60_000)
        store.store_later(name, f"{name}:lock", name.encode(), 60_000, f"t-{name}", errors.append)


def test_the_next_lookup_carries_the_queued_stores(redis_clean):
    conn = RedisConnector(redis_clean.url)
    store = RedisCacheStore(conn)
    client = redis_clean.client()
    writer = _writer_that_never_writes_itself(conn)
    errors = []
    _queue(store, client, ["a", "b", "c"], errors)
    assert writer.pending() == 3 and client.get("a") is None, "still queued: the writer lingers"
    raw, _, role = store.lookup("a", "a:lock", "other", 60_000)
    assert (raw, role) == (b"a", -1), "the stores ran ahead of the lookup, in order"
    assert writer.pending() == 0 and errors == []
    assert [client.get(k) for k in "abc"] == [b"a", b"b", b"c"]
    assert not any(client.exists(f"{k}:lock") for k in "abc"), "each carried store released its lock"
    # The combined miss path carries them too.
    _queue(store, client, ["d"], errors)
    raw, _, role, decision = store.lookup_acquire("e", "e:lock", "t-e", 60_000,
                                                  ["bucket", "bucket:override"], "1000 10 1 -1")
    assert (raw, role) == (None, 1) and decision is not None and decision >= 0
    assert client.get("d") == b"d" and writer.pending() == 0 and errors == []
    conn.close()


def test_carried_stores_survive_a_script_flush(redis_clean):
    conn = RedisConnector(redis_clean.url)
    store = RedisCacheStore(conn)
    client = redis_clean.client()
    writer = _writer_that_never_writes_itself(conn)
    errors = []
    store.lookup("x", "x:lock", "t", 0)  # both scripts known to this client
    _queue(store, client, ["p", "q"], errors)
    client.script_flush()  # as after a restart: every EVALSHA of the next trip answers NOSCRIPT
    raw, _, role = store.lookup("p", "p:lock", "other", 0)
    assert (raw, role) == (b"p", -1)
    assert client.get("q") == b"q" and writer.pending() == 0 and errors == []
    conn.close()


def test_a_failed_trip_reports_the_carried_stores_and_raises_for_the_lookup(fault_redis):
    from celery_tuning.errors import StorageError

    conn = RedisConnector(fault_redis.url, socket_timeout=0.2, connect_timeout=0.2)
    store = RedisCacheStore(conn)
    writer = _writer_that_never_writes_itself(conn)
    errors = []
    _queue(store, fault_redis.client(), ["a", "b"], errors)
    fault_redis.stop()
    with pytest.raises(StorageError):
        store.lookup("a", "a:lock", "t", 60_000)
    assert len(errors) == 2 and all(isinstance(e, StorageError) for e in errors)
    assert writer.pending() == 0 and writer.flush(1.0)
    conn.close()


def test_a_flush_writes_what_no_lookup_carried(redis_clean):
    conn = RedisConnector(redis_clean.url)
    store = RedisCacheStore(conn)
    client = redis_clean.client()
    writer = _writer_that_never_writes_itself(conn)
    errors = []
    _queue(store, client, ["f"], errors)
    assert existing_writer(conn) is writer
    assert store.flush(5.0), "a flush does not wait for the linger"
    assert client.get("f") == b"f" and errors == []
    conn.close()


def test_a_lock_held_while_the_renewer_is_paced_is_renewed_too(redis_clean):
    """Holding a lock wakes the renewer only when its pace would be too slow for the lease: a lock
    taken while it keeps pace for earlier ones (a busy worker) is renewed all the same."""
    import time

    from celery_tuning.storage.cache_locks import LockRenewer

    client = redis_clean.client(1)
    connector = RedisConnector(redis_clean.db_url(1))
    renewer = LockRenewer()
    deadline = renewer.clock() + 60
    keys = [f"tuning:cache:{{t.pace}}:v1:g1:d{i}:lock" for i in range(3)]
    for i, key in enumerate(keys):  # each lock lives 0.6 s unless renewed (every 0.2 s)
        client.set(key, f"tok{i}", px=600)
        renewer.hold(connector, "{t.pace}", key, f"tok{i}", 600, deadline)
        time.sleep(0.7)
        assert client.get(key) == f"tok{i}".encode(), "renewed before its lease ran out"
        renewer.drop(key, f"tok{i}")  # nothing held: the thread stays paced for a while
    shorter = "tuning:cache:{t.pace}:v1:g1:short:lock"
    client.set(shorter, "tok-short", px=300)  # a shorter lease than the pace: wakes the thread
    renewer.hold(connector, "{t.pace}", shorter, "tok-short", 300, deadline)
    time.sleep(0.45)
    assert client.get(shorter) == b"tok-short"
    renewer.drop(shorter, "tok-short")
    connector.close()
