"""Real ``celery worker`` subprocesses (prefork by default), cleaned up by process group."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from celery_tuning.testing import stop_process_groups

ROOT = Path(__file__).resolve().parents[2]

#: Result-backend retry policy for test apps: a pending AsyncResult collected after its
#: redis-server is gone would otherwise retry 20 times, a second apart.
QUICK_BACKEND_RETRY = {"retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.1,
                                        "interval_max": 0.1}}


class WorkerProcess:
    """``python -m celery -A APP worker`` in its own process group.

    Arguments:
        app: Import path of the Celery app (e.g. ``tests.apps.basic:app``).
        env: Extra environment (broker and tuning URLs are passed this way).
        pool, concurrency, queues, extra: Worker command-line options.
    """

    def __init__(self, app: str, env: Dict[str, str], *, pool: str = "prefork",
                 concurrency: int = 2, queues: Optional[str] = None,
                 extra: Optional[List[str]] = None, name: str = "w1") -> None:
        self.args = [
            sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool,
            "-c", str(concurrency), "-n", f"{name}@%h", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "-l", "INFO",
        ]
        if queues:
            self.args += ["-Q", queues]
        self.args += list(extra or [])
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.log = tempfile.NamedTemporaryFile(prefix="tuning-worker-", suffix=".log", delete=False)
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=str(ROOT), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.output()}")
            if " ready." in self.output():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process_groups([proc], timeout=timeout)

    def close(self) -> None:
        self.stop()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


@contextlib.contextmanager
def running_workers(app: str, env: Dict[str, str], count: int = 2, *, prefix: str = "w",
                    **options: Any) -> Iterator[List[WorkerProcess]]:
    """``count`` started worker subprocesses, stopped (and their logs removed) on exit."""
    workers = [WorkerProcess(app, env, name=f"{prefix}{i}", **options) for i in range(count)]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        for worker in workers:
            worker.close()
