"""One lazily created, fork-safe Redis client per process per URL, and the Lua scripts."""

from __future__ import annotations

import logging
import threading
import time
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ..errors import StorageError
from .keys import hash_tag
from .process import PerProcess, after_fork_in_child
from .urls import RedisTarget, parse_redis_url, redact_url

__all__ = [
    "CLIENT_NAME", "MOVER_CLIENT_NAME", "RedisConnector", "get_connector", "hash_tag", "load_lua", "pack_command",
]

logger = logging.getLogger("celery_tuning.storage")

CLIENT_NAME = "celery-tuning"
#: The client name of the parking mover's own connection (one per worker main process).
MOVER_CLIENT_NAME = "celery-tuning-mover"

T = TypeVar("T")

#: The redis-py errors that mean "the tuning store is not usable right now".
REDIS_ERRORS: Tuple[Type[BaseException], ...] = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


def _read_lua_sources() -> Dict[str, str]:
    folder = resources.files("celery_tuning.storage") / "lua"
    return {entry.name[:-len(".lua")]: entry.read_text("utf-8")
            for entry in folder.iterdir() if entry.name.endswith(".lua")}


#: Every script's source, read once when this module is imported. Reading them later, from the
#: first call in whatever thread makes it, ran importlib.resources in a mover or listener thread
#: of a prefork worker's main process: a pool child forked meanwhile inherited an import lock
#: held by a thread it does not have, and hung on its first script for good.
_LUA_SOURCES = _read_lua_sources()


def load_lua(name: str) -> str:
    """Source of ``celery_tuning/storage/lua/<name>.lua`` (shipped as package data).

    A line ``--@include OTHER`` becomes ``OTHER.lua`` wrapped as ``local function OTHER(KEYS, ARGV)``,
    so one script can run two others' logic in a single round trip without a copy of either.
    """
    source = _LUA_SOURCES[name]
    lines = []
    for line in source.splitlines():
        if line.startswith("--@include "):
            other = line.split(None, 1)[1].strip()
            lines += [f"local function {other}(KEYS, ARGV)", load_lua(other), "end"]
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def pack_command(command: Sequence[Any]) -> Optional[bytes]:
    """``command`` in the Redis protocol (RESP) when it holds only str, bytes and int (what our
    scripts and GETs send), else None: let redis-py pack it (floats, memoryviews...).

    The same bytes redis-py's packer writes for these types, at a fraction of its cost (it
    checks each argument against every type it knows, ~15 µs for a limiter decision here).
    """
    parts = [b"*%d\r\n" % len(command)]
    append = parts.append
    for arg in command:
        kind = type(arg)
        if kind is str:
            arg = arg.encode()
        elif kind is int:
            arg = b"%d" % arg
        elif kind is not bytes:
            return None  # bool (redis-py refuses it), float (its repr), buffers...
        append(b"$%d\r\n" % len(arg))
        append(arg)
        append(b"\r\n")
    return b"".join(parts)


class RedisConnector:
    """Owns the Redis client of one URL in the current process.

    The client is created on first use and held in a :class:`~.process.PerProcess`,
    so a prefork child builds its own and never shares its parent's sockets. Scripts are
    registered once per client with ``register_script``, whose ``EVALSHA``
    falls back to ``SCRIPT LOAD`` on ``NOSCRIPT`` (a restarted Redis).

    Arguments:
        url: Tuning Redis URL (never logged unredacted).
        socket_timeout: Read/write timeout in seconds.
        connect_timeout: Connect timeout in seconds.
        max_connections: Pool bound per process (None: unbounded).
    """

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        max_connections: Optional[int] = None,
        client_name: str = CLIENT_NAME,
    ) -> None:
        self.target: RedisTarget = parse_redis_url(url)
        self.client_name = client_name
        self.safe_url = redact_url(url)
        self._url = url
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        # A forked child must not reuse the parent's sockets: it builds its own client.
        self._process: PerProcess[_ProcessClient] = PerProcess(
            lambda: _ProcessClient(self._create()), name=f"redis client of {self.safe_url}")

    def __repr__(self) -> str:
        return f"<RedisConnector {self.safe_url}>"

    def _options(self) -> Dict[str, Any]:
        options: Dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
            "client_name": self.client_name,
            "health_check_interval": 30,
            # redis-py retries failed commands with exponential backoff by default; a tuning
            # decision must fail within the socket timeout so the caller's policy can answer.
            "retry": Retry(NoBackoff(), 0),
        }
        if self.max_connections is not None:
            options["max_connections"] = self.max_connections
        return options

    def _create(self) -> Any:
        target = self.target
        if target.kind == "standalone":
            return redis.Redis.from_url(self._url, **self._options())
        if target.kind == "cluster":
            from redis.cluster import RedisCluster

            options = self._options()
            options.pop("health_check_interval", None)
            return RedisCluster.from_url(target.url, **options)
        from redis.sentinel import Sentinel

        options = self._options()
        sentinel = Sentinel(
            list(target.sentinels),
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.connect_timeout,
            sentinel_kwargs={
                "socket_timeout": self.socket_timeout,
                "socket_connect_timeout": self.connect_timeout,
                "password": target.sentinel_password,
                # as for the master: one attempt per sentinel, no backoff (redis-py's default
                # retries kept a PING with every sentinel down waiting ~60 s)
                "retry": Retry(NoBackoff(), 0),
            },
        )
        options.pop("socket_timeout", None)
        options.pop("socket_connect_timeout", None)
        return sentinel.master_for(
            target.master_name, db=target.db, password=target.password, **options
        )

    @property
    def client(self) -> Any:
        """The process's client, created lazily; re-created after ``fork()``."""
        return self._process.get().client

    def script(self, name: str) -> Script:
        """The registered Lua script ``name`` for this process's client."""
        return self._process.get().script(name)

    def run(self, operation: Callable[[Any], T], what: str = "redis call") -> T:
        """Run ``operation(client)``, turning Redis failures into :class:`StorageError`.

        The error message names the redacted URL, never the password.
        """
        try:
            process = self._process.get()
            process.release_idle()  # redis-py's own commands check out of the pool: leave it ours
            return operation(process.client)
        except REDIS_ERRORS as exc:
            raise StorageError(
                f"{what} failed against {self.safe_url}: {type(exc).__name__}: "
                f"{redact_url(str(exc))}"
            ) from None

    def evalsha(self, name: str, keys: Any, args: Any) -> Any:
        """Run a registered script with one round trip (two after a Redis restart).

        This is the hot path of every limiter decision, so it avoids the
        closure that :meth:`run` would need.
        """
        call = self._evalsha_on_connection if self.target.kind != "cluster" else self._evalsha_on_client
        try:
            # Inside the try: a Cluster client connects when it is made, and fails there.
            process = self._process.get()
            script = process.scripts.get(name) or process.script(name)
            try:
                return call(process, script.sha, keys, args)
            except NoScriptError:
                # Redis restarted or failed over: load the script again and retry once.
                script.sha = process.script_load(script.script)
                return call(process, script.sha, keys, args)
        except REDIS_ERRORS as exc:
            raise StorageError(
                f"script {name} failed against {self.safe_url}: {type(exc).__name__}: "
                f"{redact_url(str(exc))}"
            ) from None

    def evalsha_many(self, name: str, calls: Sequence[Tuple[Sequence[Any], Sequence[Any]]]) -> None:
        """Run a registered script once per ``(keys, args)``, pipelined: one round trip for all.

        Used for writes that nobody waits on (the cache's deferred stores); replies are not
        returned. On a Cluster the calls run one by one (their keys live in different slots).
        Raises :class:`StorageError` when Redis fails; some of the calls may have run.
        """
        if self.target.kind == "cluster":
            for keys, args in calls:
                self.evalsha(name, keys, args)
            return
        try:
            process = self._process.get()
            script = process.scripts.get(name) or process.script(name)
            pending = list(calls)
            for _ in range(2):
                replies = self._pipeline_on_connection(
                    process, [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in pending])
                failed = [r for r in replies if isinstance(r, Exception) and not isinstance(r, NoScriptError)]
                if failed:
                    raise failed[0]
                pending = [call for call, reply in zip(pending, replies) if isinstance(reply, NoScriptError)]
                if not pending:
                    return
                # Redis restarted or failed over: load the script again and send those again.
                script.sha = process.script_load(script.script)
            raise NoScriptError(f"script {name} still unknown to Redis after SCRIPT LOAD")
        except REDIS_ERRORS as exc:
            raise StorageError(
                f"script {name} failed against {self.safe_url}: {type(exc).__name__}: "
                f"{redact_url(str(exc))}"
            ) from None

    def evalsha_carrying(self, name: str, keys: Any, args: Any, carried: str,
                         calls: Sequence[Tuple[Sequence[Any], Sequence[Any]]]) -> Tuple[Any, Optional[StorageError]]:
        """Run script ``carried`` once per ``(keys, args)`` of ``calls``, then script ``name``,
        pipelined on one pooled connection: one round trip for all (standalone and Sentinel;
        on a Cluster the calls run one by one first).

        Returns ``(name's reply, the carried calls' error or None)``: the carried calls are writes
        nobody waits on, so their failure is handed back rather than raised, while a failure of
        ``name`` raises :class:`StorageError` as :meth:`evalsha` does (the carried calls then get
        the same error).
        """
        if not calls:
            return self.evalsha(name, keys, args), None
        if self.target.kind == "cluster":
            try:
                self.evalsha_many(carried, calls)
                error = None
            except StorageError as exc:
                error = exc
            return self.evalsha(name, keys, args), error
        try:
            process = self._process.get()
            script = process.scripts.get(name) or process.script(name)
            carried_script = process.scripts.get(carried) or process.script(carried)
            commands = [("EVALSHA", carried_script.sha, len(k), *k, *a) for k, a in calls]
            commands.append(("EVALSHA", script.sha, len(keys), *keys, *args))
            replies = self._pipeline_on_connection(process, commands)
            reply = replies[-1]
            retry = [call for call, r in zip(calls, replies) if isinstance(r, NoScriptError)]
            failed = [r for r in replies[:-1] if isinstance(r, Exception) and not isinstance(r, NoScriptError)]
            if retry:  # Redis restarted or failed over: load the script again and send those again
                carried_script.sha = process.script_load(carried_script.script)
                self.evalsha_many(carried, retry)
            if isinstance(reply, NoScriptError):
                script.sha = process.script_load(script.script)
                reply = self._evalsha_on_connection(process, script.sha, keys, args)
            elif isinstance(reply, Exception):
                raise reply
        except REDIS_ERRORS as exc:
            raise StorageError(
                f"script {name} failed against {self.safe_url}: {type(exc).__name__}: "
                f"{redact_url(str(exc))}"
            ) from None
        error = None
        if failed:
            error = StorageError(f"script {carried} failed against {self.safe_url}: {type(failed[0]).__name__}: "
                                 f"{redact_url(str(failed[0]))}")
        return reply, error

    @staticmethod
    def _pipeline_on_connection(process: _ProcessClient, commands: Sequence[Tuple[Any, ...]]) -> list:
        """Send ``commands`` in one write on one pooled connection and read every reply (an error
        reply comes back as its exception, in its place): one round trip, without a pipeline
        object's per-command bookkeeping."""
        packed = [pack_command(command) for command in commands]
        if any(p is None for p in packed):
            payload = None
        else:
            payload = [b"".join(cast(List[bytes], packed))]  # one write
        conn, kept = process.checkout()
        try:
            return _pipeline_round_trip(process, conn, commands, payload)
        except redis.ConnectionError:
            if not kept:
                raise
        # See _command_on_connection: the kept connection was closed by the server meanwhile.
        return _pipeline_round_trip(process, process.checked_connection(), commands, payload)

    def get(self, key: str) -> Any:
        """GET ``key`` with one round trip on the lean path (the cache's hit path)."""
        try:
            client = self.client
            if self.target.kind == "cluster":
                return client.get(key)
            return self._command_on_connection(self._process.get(), "GET", key)
        except REDIS_ERRORS as exc:
            raise StorageError(
                f"GET failed against {self.safe_url}: {type(exc).__name__}: {redact_url(str(exc))}") from None

    @staticmethod
    def _evalsha_on_client(process: _ProcessClient, sha: str, keys: Any, args: Any) -> Any:
        return process.client.evalsha(sha, len(keys), *keys, *args)

    @classmethod
    def _evalsha_on_connection(cls, process: _ProcessClient, sha: str, keys: Any, args: Any) -> Any:
        return cls._command_on_connection(process, "EVALSHA", sha, len(keys), *keys, *args)

    @staticmethod
    def _command_on_connection(process: _ProcessClient, *command: Any) -> Any:
        # Straight to a connection of the client's pool: redis-py's execute_command adds a retry
        # wrapper and per-command instrumentation that cost ~15 µs on every decision, and EVALSHA
        # and GET need no response callback. Same pool, same timeouts, same health checks.
        conn, kept = process.checkout()
        try:
            return _round_trip(process, conn, command)
        except redis.ConnectionError:
            if not kept:
                raise
        # The connection was kept from a call less than IDLE_TRUST ago and so skipped the pool's
        # readiness check, and the server closed it meanwhile (a Redis restarted that fast, CLIENT
        # KILL): once more on a connection the pool checks (and reconnects), as if the check had
        # run. A timeout is not retried (the call already waited its socket timeout). The retry
        # is safe in the case it is for: a socket the server closed before the call never
        # delivered it. A connection cut after Redis ran the command but before its reply came
        # back would run it twice (one token or lease too many, given back by its TTL), as
        # redis-py's own retry on connection errors (its default since 6.0) would.
        return _round_trip(process, process.checked_connection(), command)

    def ping(self) -> float:
        """Round-trip time in seconds of one PING. Raises :class:`StorageError`."""
        import time

        start = time.perf_counter()
        self.run(lambda client: client.ping(), what="PING")
        return time.perf_counter() - start

    def close(self) -> None:
        """Drop this process's client (connections close when collected)."""
        process = self._process.reset()
        if process is not None:
            try:
                process.client.close()
            except REDIS_ERRORS:  # pragma: no cover - closing a dead socket
                pass


def _round_trip(process: _ProcessClient, conn: Any, command: Tuple[Any, ...]) -> Any:
    """Send ``command`` on ``conn`` and read its reply; ``conn`` is kept for the next call, or
    discarded when the call failed on it."""
    try:
        packed = pack_command(command)
        if packed is None:
            conn.send_command(*command)
        else:
            conn.send_packed_command([packed])
        reply = conn.read_response()
    except redis.ResponseError:
        process.checkin(conn)  # an error reply (NOSCRIPT...), read in full
        raise
    except BaseException:
        # A broken connection, or an exception raised into this thread mid-read (a Celery
        # soft time limit): never use a half-read socket again.
        process.discard(conn)
        raise
    process.checkin(conn)
    return reply


def _pipeline_round_trip(process: _ProcessClient, conn: Any, commands: Sequence[Tuple[Any, ...]],
                         payload: Optional[List[bytes]]) -> list:
    """Send ``commands`` (``payload``: packed already, or None) on ``conn`` in one write and read
    every reply (an error reply comes back as its exception, in its place)."""
    replies: list = []
    try:
        conn.send_packed_command(conn.pack_commands(commands) if payload is None else payload)
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:  # an error reply: the others still follow
                replies.append(exc)
    except BaseException:
        process.discard(conn)  # never use a half-read socket again (see _round_trip)
        raise
    process.checkin(conn)
    return replies


#: Seconds a connection of the lean path may sit idle and still be used without the pool's
#: readiness check. A busy worker makes its round trips milliseconds apart; a Redis restart or
#: failover mostly takes longer than this, so a connection the server closed meanwhile is found
#: out by the pool's check (and reconnected) instead of failing the first call after it. One that
#: was faster (a restart in 25 ms, CLIENT KILL) fails the call on a kept connection: the call is
#: then made once more on one through the pool's check (RedisConnector._command_on_connection).
IDLE_TRUST = 0.05


class _ProcessClient:
    """One process's client of a connector, the scripts registered on it, and the connections
    its lean path keeps between round trips.

    redis-py's pool checkout and release cost more CPU than the round trip they serve (a socket
    poll and two timeout changes to check the connection is ready, instrumentation, locks): a
    connection that just served a call of ours and read its reply in full is ready by
    construction, so the lean path keeps it for the next call instead of releasing it. One
    idle longer than :data:`IDLE_TRUST` goes back through the pool's checks; :meth:`release_idle`
    hands them all back before redis-py's own commands (:meth:`RedisConnector.run`) need one, so
    the process still holds no more connections than it uses at once.
    """

    __slots__ = ("client", "idle", "scripts")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.scripts: Dict[str, Script] = {}
        self.idle: List[Tuple[Any, float]] = []  # (connection, when it was last used)

    def checkout(self) -> Tuple[Any, bool]:
        """A connection ready to send: one kept from the last calls, else the pool's; and whether
        it is a kept one (it skipped the pool's readiness check: the server may have closed it)."""
        try:
            conn, used = self.idle.pop()  # atomic: threads never share a connection
        except IndexError:
            conn = None
        if conn is not None:
            if time.monotonic() - used <= IDLE_TRUST:
                return conn, True
            self.client.connection_pool.release(conn)  # idle a while: through the pool's check again
        return self.checked_connection(), False

    def checked_connection(self) -> Any:
        """A connection from the pool, through its readiness check (reconnected when the server
        closed it)."""
        pool = self.client.connection_pool
        try:
            return pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name
            return pool.get_connection("EVALSHA")

    def script_load(self, source: Any) -> str:
        """SCRIPT LOAD through redis-py (after NOSCRIPT), on a connection of ours handed back first."""
        self.release_idle()
        return str(self.client.script_load(source))

    def checkin(self, conn: Any) -> None:
        """Keep ``conn`` (its replies read in full) for the next call of the lean path."""
        self.idle.append((conn, time.monotonic()))

    def discard(self, conn: Any) -> None:
        """``conn`` failed mid-call: close it and give it back to the pool (which reconnects it)."""
        conn.disconnect()
        self.client.connection_pool.release(conn)

    def release_idle(self) -> None:
        """Hand the kept connections back to the pool."""
        if not self.idle:
            return  # (a Cluster client keeps none: it has no single pool)
        pool = self.client.connection_pool
        while True:
            try:
                conn, _ = self.idle.pop()
            except IndexError:
                return
            pool.release(conn)

    def script(self, name: str) -> Script:
        script = self.scripts.get(name)
        if script is None:
            script = self.scripts[name] = self.client.register_script(load_lua(name))
        return script


_connectors: Dict[Tuple[Any, ...], RedisConnector] = {}
_connectors_lock = threading.Lock()


@after_fork_in_child
def _new_connectors_lock() -> None:
    global _connectors_lock
    _connectors_lock = threading.Lock()  # a parent thread may have held it at fork()


def get_connector(
    url: str,
    *,
    socket_timeout: float = 0.5,
    connect_timeout: float = 0.5,
    max_connections: Optional[int] = None,
    client_name: str = CLIENT_NAME,
) -> RedisConnector:
    """The shared :class:`RedisConnector` for these options (one per process per URL and client name)."""
    key = (url, socket_timeout, connect_timeout, max_connections, client_name)
    with _connectors_lock:
        connector = _connectors.get(key)
        if connector is None:
            connector = RedisConnector(
                url, socket_timeout=socket_timeout, connect_timeout=connect_timeout,
                max_connections=max_connections, client_name=client_name,
            )
            _connectors[key] = connector
        return connector
