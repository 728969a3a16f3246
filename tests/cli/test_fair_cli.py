"""`celery -A proj tuning fair show|purge` through the real celery command, on a real Redis."""

import json
import os
import subprocess
import sys

import pytest

from celery_tuning.storage.keys import key_digest
from tests.support.apps import run_producer
from tests.support.workers import ROOT

pytestmark = pytest.mark.integration


def _env(redis_server):
    return {"TEST_BROKER_URL": redis_server.db_url(0), "TEST_BACKEND_URL": redis_server.db_url(0),
            "TEST_TUNING_URL": redis_server.db_url(1), "TEST_LEDGER_URL": redis_server.db_url(2)}


def fair_cmd(redis_server, *args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **_env(redis_server)}
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.fair_app:app", "tuning", "fair", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env, input=stdin)


def _waiting(redis_server):
    shown = json.loads(fair_cmd(redis_server, "show", "--json").stdout)
    return {row["queue"]: {d["key"]: d["waiting"] for d in row["deepest"]} for row in shown}


def test_show_and_purge_a_key_then_the_queue(redis_clean):
    out = fair_cmd(redis_clean, "purge", "fairq", "--yes")
    assert out.returncode == 0 and out.stdout.strip() == "fairq: no fair calls waiting", out.stderr
    # No worker runs: the calls wait in the tuning Redis for their turn.
    run_producer("from tests.apps.fair_app import work\n"
                 "for tenant, n in (('acme', 3), ('globex', 2), ('initech', 4)):\n"
                 "    for _ in range(n):\n"
                 "        work.delay(tenant)\n", redis_clean, env=_env(redis_clean))
    acme, globex, initech = key_digest("acme"), key_digest("globex"), key_digest("initech")
    assert _waiting(redis_clean) == {"fairq": {acme: 3, globex: 2, initech: 4}}
    shown = fair_cmd(redis_clean, "show").stdout.splitlines()
    assert shown[0].startswith("fairq: waiting 9 over 3 keys, window in use 0 of 0 (consumers)"), shown

    refused = fair_cmd(redis_clean, "purge", "fairq", "--key", "acme", stdin="n\n")
    assert refused.returncode == 1 and "Aborted" in refused.stderr
    assert f"drop every fair call of fairq (key {acme}) not yet published" in refused.stdout
    assert _waiting(redis_clean)["fairq"][acme] == 3

    out = fair_cmd(redis_clean, "purge", "fairq", "--key", "acme", stdin="y\n")
    assert out.returncode == 0 and out.stdout.endswith(f"[y/N]: fairq (key {acme}): purged 3\n"), out.stdout
    out = fair_cmd(redis_clean, "purge", "fairq", "--digest", globex, "--yes")
    assert out.returncode == 0 and out.stdout.strip() == f"fairq (key {globex}): purged 2", out.stderr
    assert _waiting(redis_clean) == {"fairq": {initech: 4}}

    out = fair_cmd(redis_clean, "purge", "fairq", "--yes")
    assert out.returncode == 0 and out.stdout.strip() == "fairq: purged 4", out.stderr
    assert _waiting(redis_clean) == {"fairq": {}}
    assert fair_cmd(redis_clean, "show").stdout.startswith("fairq: waiting 0 over 0 keys")


def test_purge_errors(redis_clean):
    out = fair_cmd(redis_clean, "purge", "fairq", "--key", "a", "--digest", "b")
    assert out.returncode == 2 and "give --key or --digest, not both" in out.stderr
    out = fair_cmd(redis_clean, "purge", "no-such-queue", "--key", "acme")
    assert out.returncode == 0 and out.stdout.strip() == "no-such-queue: no fair calls waiting"
