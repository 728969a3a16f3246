"""Shared plumbing for the examples: find (or start) Redis, run real workers, stop them.

Each example is ``python -m examples.NAME``: it uses ``$REDIS_URL`` (else
redis://127.0.0.1:6379) and starts a private redis-server when nothing answers there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import redis

from celery_tuning.storage.urls import redact_url
from celery_tuning.testing import RedisServer, stop_process_groups

ROOT = Path(__file__).resolve().parents[1]


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def find_or_start_redis() -> Tuple[str, Optional[RedisServer]]:
    """$REDIS_URL (default: the local Redis) when it answers, else a private redis-server."""
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    shown = redact_url(base)
    if _answers(base):
        print(f"using Redis at {shown}")
        return base.rstrip("/").rsplit("/", 1)[0] if base.count("/") > 2 else base, None
    try:
        server = RedisServer().start()
    except RuntimeError as exc:
        sys.exit(f"no Redis answers at {shown} and no private one could be started: {exc} "
                 "(apt-get install redis-server, or set REDIS_URL)")
    print(f"no Redis answered at {shown}: started a private redis-server on port {server.port}")
    return server.url, server


@contextlib.contextmanager
def redis_base() -> Iterator[str]:
    """A Redis base URL (no database): $REDIS_URL, or a private redis-server for the run."""
    url, server = find_or_start_redis()
    try:
        yield url.rstrip("/")
    finally:
        if server is not None:
            server.close()
            print("stopped the private redis-server")


@contextlib.contextmanager
def workers(app: str, env: Dict[str, str], *, count: int = 1, queues: str = "",
            extra: Tuple[str, ...] = ()) -> Iterator[List[subprocess.Popen]]:
    """``count`` real ``celery worker`` processes of ``app``, stopped (warm) on exit."""
    procs, logs = [], []
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    try:
        for i in range(count):
            log = Path(tempfile.gettempdir()) / f"tuning-example-{os.getpid()}-{i}.log"
            args = [sys.executable, "-m", "celery", "-A", app, "worker", "-n", f"ex{i}@%h", "--without-gossip",
                    "--without-mingle", "-l", "INFO", *extra]
            if queues:
                args += ["-Q", queues]
            procs.append(subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=full_env,
                                          cwd=str(ROOT), start_new_session=True))
            logs.append(log)
        for proc, log in zip(procs, logs):
            deadline = time.monotonic() + 60
            while " ready." not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"a worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.1)
        print(f"{count} worker(s) of {app} ready (logs: {', '.join(str(x) for x in logs)})")
        yield procs
    finally:
        stop_process_groups(procs)


def fresh_database(url: str) -> None:
    """Empty the example's own database: messages left by an interrupted run would run again."""
    redis.Redis.from_url(url).flushdb()


def worker_log(index: int = 0) -> str:
    return (Path(tempfile.gettempdir()) / f"tuning-example-{os.getpid()}-{index}.log").read_text(errors="replace")


class FakeApi:
    """A local HTTP API for the examples: ``handler(path, body) -> (status, headers, body)``."""

    def __init__(self, handler: Callable[[str, bytes], Tuple[int, Dict[str, str], bytes]]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, payload = outer.handler(self.path, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.handler = handler
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> FakeApi:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
