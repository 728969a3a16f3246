"""Shared fixtures: a private redis-server per session and helpers for real workers.

hypothesis is imported here, up front, on purpose: CPython 3.11.7 can fail with "AST
constructor recursion depth mismatch" when pytest rewrites a module while a Celery worker
thread compiles a task signature at the same moment (seen in this suite); importing early keeps
pytest's rewriting out of the window where in-process worker threads run.
"""

from __future__ import annotations

import sys
from typing import Iterator

import hypothesis
import hypothesis.strategies  # noqa: F401
import pytest

from celery_tuning.storage.cache import flush_writers
from celery_tuning.testing import RedisClusterServers, RedisServer


@pytest.fixture(autouse=True)
def _fresh_kombu_event_loop() -> Iterator[None]:
    """Celery < 5.6 leaves a stopped in-process worker's kombu hub as the global event loop, so
    the next in-process worker in this process never fires its timers (a countdown or a retry
    waits forever; plain Celery 5.5.3 does it too). Celery 5.6+ clears it; the lowest row needs this."""
    yield
    loop = sys.modules.get("kombu.asynchronous")  # a test that never imported kombu needs nothing
    if loop is not None:
        loop.set_event_loop(None)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server on a free loopback port for the whole session."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture()
def redis_clean(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session server, started if a fault test stopped it, and flushed.

    An earlier test's cache stores are written in the background: they land first, so they
    cannot show up in this test's (flushed) databases.
    """
    flush_writers()
    if not redis_server.alive():
        redis_server.start()
    redis_server.client().flushall()
    yield redis_server


@pytest.fixture()
def fault_redis() -> Iterator[RedisServer]:
    """A private redis-server a test may kill and restart at will."""
    server = RedisServer().start()
    yield server
    server.close()


RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The machine's RabbitMQ (guest/guest on loopback); tests using it skip when it does not answer."""
    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # any failure to reach it means: skip, saying why
        pytest.skip(f"RabbitMQ not reachable at 127.0.0.1:5672 ({exc.__class__.__name__}: {exc})")
    return RABBITMQ_URL


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A 3-master Redis Cluster on loopback ports for the whole session."""
    servers = RedisClusterServers().start()
    yield servers
    servers.close()


@pytest.fixture()
def cluster_clean(redis_cluster: RedisClusterServers) -> RedisClusterServers:
    """The session cluster, every node flushed."""
    for node in redis_cluster.nodes:
        node.client().flushall()
    return redis_cluster
