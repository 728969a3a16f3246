"""Run a real Celery worker and a producer against Redis and show what celery-tuning measures.

Uses $REDIS_URL, else redis://127.0.0.1:6379; when nothing answers there it starts a
private redis-server on a free port and stops it afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import redis

from celery_tuning.storage.urls import redact_url
from celery_tuning.testing import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def find_or_start_redis() -> tuple[str, Optional[RedisServer]]:
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


def start_worker(env: dict) -> subprocess.Popen[bytes]:
    log = open(Path(tempfile.gettempdir()) / "tuning-demo-worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "examples.demo.app", "worker", "-P", "threads", "-c", "4",
         "-Q", "tuning-demo", "-n", "demo@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if " ready." in Path(log.name).read_text(errors="replace"):
            print(f"worker ready (pid {proc.pid}, log {log.name})")
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    sys.exit(f"the worker did not start; see {log.name}")


def main() -> None:
    base, private = find_or_start_redis()
    url = f"{base}/15"
    env = {**os.environ, "DEMO_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    os.environ["DEMO_REDIS_URL"] = url
    worker: Optional[subprocess.Popen[bytes]] = None
    try:
        worker = start_worker(env)
        from examples.demo.app import EVENTS, _events, fetch_page, render_report

        _events.delete(EVENTS)
        print("\n1. SLA timing: 20 fetch_page tasks on the 'tuning-demo' queue (queue SLA: warning 0.5 s total)")
        print("   and 8 render_report tasks (@sla warning 0.15 s run time)")
        results = [fetch_page.delay(i) for i in range(20)] + [render_report.delay(i) for i in range(8)]
        values: List[int] = [r.get(timeout=30) for r in results]
        assert values == list(range(20)) + list(range(8)), values
        time.sleep(0.3)  # the last task_timed events are written after the result
        events = [json.loads(e) for e in _events.lrange(EVENTS, 0, -1)]
        timed = [e for e in events if e["event"] == "timed"]
        breaches = [e for e in events if e["event"] == "breach"]
        for name in ("examples.demo.app.fetch_page", "examples.demo.app.render_report"):
            rows = [e for e in timed if e["task"] == name]
            waits = sorted(e["wait"] for e in rows)
            runs = sorted(e["run"] for e in rows)
            totals = sorted(e["total"] for e in rows)
            short = name.rsplit(".", 1)[1]
            print(f"   {short:<14} n={len(rows):>2}  queue wait p50 {waits[len(waits) // 2] * 1000:6.1f} ms"
                  f"  run p50 {runs[len(runs) // 2] * 1000:6.1f} ms  end-to-end max {totals[-1] * 1000:6.1f} ms")
        print(f"   SLA breaches: {len(breaches)}")
        for b in breaches:
            print(f"     {b['level']:<8} {b['task'].rsplit('.', 1)[1]} {b['kind']}={b['measured']:.3f}s "
                  f"> {b['threshold']}s")
        print("\ndemo finished: every task ran once and its timings came back through celery_tuning.signals")
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        if private is not None:
            private.close()
            print("stopped the private redis-server")


if __name__ == "__main__":
    main()
