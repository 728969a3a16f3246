"""Helpers of the fair-queue tests: the worker environment of ``tests.apps.fair_app`` and what its
tasks record in the ledger (database 2 of the test's redis-server)."""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List

APP = "tests.apps.fair_app:app"


def fair_env(server: Any, **extra: str) -> Dict[str, str]:
    """Broker and results in db 0, the tuning store in db 1, the ledger in db 2."""
    return {"TEST_BROKER_URL": server.db_url(0), "TEST_BACKEND_URL": server.db_url(0),
            "TEST_TUNING_URL": server.db_url(1), "TEST_LEDGER_URL": server.db_url(2), **extra}


def fair_runs(server: Any, task: str) -> Dict[str, int]:
    """How many times each call of ``task`` ran, by task id."""
    return {k.decode(): int(v) for k, v in server.client(2).hgetall(f"runs:{task}").items()}


def fair_done(server: Any, task: str) -> List[Dict[str, Any]]:
    """What each finished run of ``task`` recorded, in finishing order."""
    return [json.loads(r) for r in server.client(2).lrange(f"done:{task}", 0, -1)]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
