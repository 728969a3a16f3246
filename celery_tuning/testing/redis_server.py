"""Start, stop and restart a private ``redis-server`` on a free loopback port (tests, demo, benchmarks)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, List, Optional

import redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process bound to 127.0.0.1 only, with nothing persisted.

    ``stop()``/``start()`` keep the port, so clients reconnect to the same URL
    and see an empty server (scripts and state gone) as after a real restart.
    """

    def __init__(self, port: Optional[int] = None, extra_args: Optional[List[str]] = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self.dir = tempfile.mkdtemp(prefix="tuning-redis-")
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def db_url(self, db: int) -> str:
        return f"{self.url}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=2)

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self.dir,
            "--protected-mode", "no", "--loglevel", "warning", *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if _answers_ping(self.port):
                return self
            time.sleep(0.01)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers_ping(port: int) -> bool:
    """Whether a server on ``port`` answers PING now: one plain socket attempt, without the
    client's connection retries and backoff (redis-py 7 spends ~1.7 s in them while the server is
    still starting)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            # -NOAUTH: a server with requirepass is up too (-LOADING is not ready yet).
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _cluster_port() -> int:
    # A cluster node also listens on port + 10000 (the cluster bus), which must exist and be free.
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """A Redis Cluster of ``masters`` loopback nodes (no replicas), made with ``redis-cli --cluster``."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(port=_cluster_port(),
                                  extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                      for _ in range(masters)]
        for node in self.nodes:
            node.extra_args += ["--cluster-config-file", f"{node.dir}/nodes.conf"]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        try:
            return self._start(timeout)
        except BaseException:
            self.close()  # never leave half a cluster running
            raise

    def _start(self, timeout: float) -> RedisClusterServers:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH")
        for node in self.nodes:
            node.start()
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos: List[Any] = [n.client().cluster("INFO") for n in self.nodes]
            if all(info.get("cluster_state") == "ok" for info in infos):
                return self
            time.sleep(0.1)
        raise RuntimeError("cluster did not reach cluster_state:ok")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class RedisSentinelServers:
    """One master, one replica and one sentinel on loopback, monitoring ``master_name``."""

    def __init__(self, master_name: str = "tuningmaster") -> None:
        self.master_name = master_name
        self.master = RedisServer()
        self.replica = RedisServer()
        self.sentinel_port = free_port()
        self.sentinel_dir = tempfile.mkdtemp(prefix="tuning-sentinel-")
        self.sentinel: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel_port}/0?master_name={self.master_name}"

    def start(self, timeout: float = 20.0) -> RedisSentinelServers:
        try:
            return self._start(timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout: float) -> RedisSentinelServers:
        self.master.extra_args += ["--repl-diskless-sync-delay", "0"]  # Redis 7 waits 5 s by default
        self.master.start()
        self.replica.extra_args += ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.replica.start()
        deadline = time.monotonic() + timeout
        while self._replica_link() != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with the master")
            time.sleep(0.05)
        conf = os.path.join(self.sentinel_dir, "sentinel.conf")
        with open(conf, "w") as fh:
            fh.write(
                f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.sentinel_dir}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 1\n"
                f"sentinel down-after-milliseconds {self.master_name} 1000\n"
                f"sentinel failover-timeout {self.master_name} 5000\n"
            )
        self.sentinel = subprocess.Popen([self.master.binary, conf, "--sentinel"], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.sentinel_port, socket_timeout=1)
        while time.monotonic() < deadline:
            try:
                if client.execute_command("SENTINEL", "get-master-addr-by-name", self.master_name):
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("sentinel did not come up")

    def _replica_link(self) -> Any:
        info: Any = self.replica.client().info("replication")
        return info.get("master_link_status")

    def close(self) -> None:
        if self.sentinel is not None and self.sentinel.poll() is None:
            self.sentinel.kill()
            self.sentinel.wait(timeout=10)
        self.replica.close()
        self.master.close()
        shutil.rmtree(self.sentinel_dir, ignore_errors=True)
