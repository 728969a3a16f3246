"""``@debounce`` (issue #19) end to end: real prefork workers, a real redis-server, the mover in the workers.

Calls collapse into one run with the latest arguments, ``delay`` after the last call (at most
``max_wait`` after the first); a call during a run schedules exactly one more, after it; keys keep
calls apart; a mover killed mid-publish loses nothing and runs nothing twice; Redis flushed or down
never crashes a caller or a worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List

import pytest

from celery_tuning.storage.debounce import RedisDebounceStore
from celery_tuning.storage.redis import get_connector
from tests.support.apps import run_producer
from tests.support.workers import ROOT, running_workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "tests.apps.debounced:app"
T = "tests.apps.debounced."


def _env(server: Any, broker: int = 0, tuning: int = 1, ledger: int = 2, **extra: str) -> Dict[str, str]:
    return {"TEST_BROKER_URL": server.db_url(broker), "TEST_BACKEND_URL": server.db_url(broker),
            "TEST_TUNING_URL": server.db_url(tuning), "TEST_LEDGER_URL": server.db_url(ledger), **extra}


def _runs(server: Any, task: str, ledger: int = 2) -> List[Dict[str, Any]]:
    return [json.loads(r) for r in server.client(ledger).lrange(f"runs:{task}", 0, -1)]


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world(redis_server) -> Iterator[Dict[str, Any]]:
    """One prefork worker (2 processes, its mover on) for the tests that share it; each test uses its own task."""
    if not redis_server.alive():
        redis_server.start()
    redis_server.client().flushall()
    env = _env(redis_server)
    with running_workers(APP, env, count=1, concurrency=2, prefix="deb") as workers:
        yield {"server": redis_server, "env": env, "worker": workers[0]}


def test_twenty_calls_50ms_apart_make_one_run_with_the_last_arguments_delay_after_the_last_call(world):
    out = run_producer(
        "import json, time\nfrom tests.apps.debounced import refresh\n"
        "ids, times = [], []\n"
        "for i in range(20):\n"
        "    times.append(time.time())\n"
        "    ids.append(refresh.delay(i).id)\n"
        "    time.sleep(0.05)\n"
        "value = refresh.AsyncResult(ids[0]).get(timeout=15)\n"
        "print(json.dumps({'ids': ids, 'last': times[-1], 'value': value}))\n", world["server"], env=world["env"])
    data = json.loads(out.splitlines()[-1])
    time.sleep(0.7)  # a second run would have started by now
    runs = _runs(world["server"], "refresh")
    assert len(runs) == 1, runs
    assert runs[0]["i"] == 19 and data["value"] == 19
    assert set(data["ids"]) == {runs[0]["id"]}, "every caller holds the id of the run that happened"
    after_last = runs[0]["start"] - data["last"]
    assert 0.45 <= after_last <= 2.5, after_last  # due 0.5 s after the last call; a mover round and a hop later


def test_a_call_during_a_run_makes_exactly_one_more_run_after_it_with_the_latest_arguments(world):
    server = world["server"]
    run_producer(
        "from tests.apps.debounced import slow\n"
        "import redis, os, time\n"
        "ledger = redis.Redis.from_url(os.environ['TEST_LEDGER_URL'])\n"
        "slow.delay(0)\n"
        "deadline = time.time() + 15\n"
        "while not ledger.llen('started:slow') and time.time() < deadline:\n"
        "    time.sleep(0.02)\n"
        "for i in (1, 2, 3):\n"              # while run 0 runs (1.5 s)
        "    slow.delay(i)\n"
        "    time.sleep(0.1)\n", server, env=world["env"])
    _wait_for(lambda: len(_runs(server, "slow")) >= 2, 15, "the second run")
    time.sleep(1.0)  # a third run would have started by now
    runs = _runs(server, "slow")
    assert [r["i"] for r in runs] == [0, 3], runs
    assert server.client(2).lrange("started:slow", 0, -1) == [b"0", b"3"]
    assert runs[1]["start"] >= runs[0]["end"] - 0.01, "the next run started before the running one ended"


def test_max_wait_runs_a_steady_stream_of_calls_about_every_second(world):
    server = world["server"]
    out = run_producer(
        "import json, time\nfrom tests.apps.debounced import capped\n"
        "first = time.time()\ni = 0\n"
        "while time.time() - first < 2.0:\n"
        "    capped.delay(i)\n"
        "    i += 1\n"
        "    time.sleep(0.05)\n"
        "print(json.dumps({'first': first, 'last_i': i - 1}))\n", server, env=world["env"])
    data = json.loads(out.splitlines()[-1])
    time.sleep(2.0)
    runs = _runs(server, "capped")
    starts = [r["start"] - data["first"] for r in runs]
    assert 2 <= len(runs) <= 3, starts  # at ~1 s, ~2 s (and the calls after the second run's claim)
    assert 0.9 <= starts[0] <= 1.8, starts  # max_wait, not delay after the last call (> 2.5 s)
    assert 1.8 <= starts[1] <= 3.0, starts
    assert runs[-1]["i"] == data["last_i"], runs  # the stream's last call ran
    assert [r["i"] for r in runs] == sorted(r["i"] for r in runs)


def test_different_arguments_collapse_by_default_and_a_key_function_keeps_them_apart(world):
    server = world["server"]
    run_producer(
        "from tests.apps.debounced import any_account, per_account\n"
        "a = [any_account.delay(acc, i) for i, acc in enumerate('abab')]\n"
        "b = [per_account.delay(acc, i) for i, acc in enumerate('abab')]\n"
        "assert len({r.id for r in a}) == 1, a\n"
        "assert len({r.id for r in b}) == 2, b\n"
        "print(a[0].get(timeout=15), sorted(r.get(timeout=15) for r in b[2:]))\n", server, env=world["env"])
    time.sleep(0.6)
    collapsed = _runs(server, "any_account")
    assert [(r["account"], r["i"]) for r in collapsed] == [("b", 3)], collapsed
    apart = sorted((r["account"], r["i"]) for r in _runs(server, "per_account"))
    assert apart == [("a", 2), ("b", 3)], apart


def test_redis_flushed_while_a_run_is_pending_loses_that_run_and_nothing_crashes(world):
    server = world["server"]
    store = RedisDebounceStore(get_connector(server.db_url(1)))
    before = len(_runs(server, "patient"))
    # `patient` is due 4 s after its call, so the flush comes first even when the producer's exit is slow.
    run_producer("from tests.apps.debounced import patient\nprint(patient.delay(100).id)\n", server, env=world["env"])
    assert store.next_due_us(f"{T}patient") is not None, "the call is pending before the flush"
    server.client(1).flushdb()  # the pending call is gone (docs/debounce.md)
    time.sleep(4.5)
    assert len(_runs(server, "patient")) == before
    assert store.next_due_us(f"{T}patient") is None
    out = run_producer("from tests.apps.debounced import refresh\nprint(refresh.delay(101).get(timeout=15))\n",
                       server, env=world["env"])
    assert out.splitlines()[-1] == "101"
    assert "Traceback" not in world["worker"].output()


_MOVER_DIES = """
import os, signal
from tests.apps.debounced import app
from celery_tuning.integration.mover import Mover
mover = Mover(app)
claimed = mover.debounce.store.claim("tests.apps.debounced.per_account", 100, 500_000)   # a claim of 0.5 s
for entry in claimed[: len(claimed) // 2]:
    mover.debounce.publish(entry)                 # published, never acknowledged
print(len(claimed), len(claimed) // 2, flush=True)
os.kill(os.getpid(), signal.SIGKILL)              # the mover dies holding its claims
"""

_NEXT_MOVER = """
import time
from tests.apps.debounced import app
from celery_tuning.integration.mover import Mover
time.sleep(0.7)                                   # the dead mover's claims expire
mover = Mover(app)
while mover.run_once().published:
    pass
print(mover.published)
"""


def test_a_mover_killed_mid_publish_loses_nothing_and_runs_nothing_twice(redis_server):
    """Four keys' runs: a mover claims them all, publishes two and dies. Its claims expire, the next
    mover publishes all four again under a higher ticket; the two older copies are dropped."""
    env = _env(redis_server, broker=3, tuning=4, ledger=5, TEST_PARK_MOVER="0")
    for db in (3, 4, 5):
        redis_server.client(db).flushdb()
    run_producer("from tests.apps.debounced import per_account\n"
                 "print([per_account.delay(acc, 0).id for acc in 'abcd'])\n", redis_server, env=env)
    time.sleep(0.4)  # due (0.3 s)
    proc = subprocess.run([sys.executable, "-c", _MOVER_DIES], capture_output=True, text=True, timeout=60,
                          cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.split() == ["4", "2"], proc.stdout
    assert int(run_producer(_NEXT_MOVER, redis_server, env=env).splitlines()[-1]) == 4
    assert redis_server.client(3).llen("celery") == 6  # 2 stale copies + 4 current ones
    with running_workers(APP, env, count=1, concurrency=2, prefix="heir") as workers:
        _wait_for(lambda: (redis_server.client(3).llen("celery") == 0
                           and len(_runs(redis_server, "per_account", 5)) >= 4), 30, "every run")
        time.sleep(0.5)
        logs = workers[0].output()
    runs = _runs(redis_server, "per_account", 5)
    assert sorted(r["account"] for r in runs) == list("abcd"), runs
    assert logs.count("dropped a duplicate of a debounced run") == 2, logs[-3000:]


def test_tuning_redis_down_publishes_the_call_at_once(redis_server, fault_redis):
    """The tuning Redis is down when apply_async runs: logged once, published at once, never dropped."""
    env = _env(redis_server, broker=6, tuning=1, ledger=7)
    env["TEST_TUNING_URL"] = fault_redis.db_url(1)
    for db in (6, 7):
        redis_server.client(db).flushdb()
    fault_redis.stop()
    out = run_producer(
        "import logging, sys\nlogging.basicConfig(stream=sys.stdout)\n"
        "from tests.apps.debounced import refresh\nrs = [refresh.delay(i) for i in range(3)]\n"
        "print(len({r.id for r in rs}))\n", redis_server, env=env)
    assert out.splitlines()[-1] == "3"  # not collapsed: each published
    assert out.count("tuning Redis failed") == 1, out  # logged once
    with running_workers(APP, env, count=1, concurrency=2, prefix="down"):
        _wait_for(lambda: len(_runs(redis_server, "refresh", 7)) == 3, 30, "the three calls to run")
    assert sorted(r["i"] for r in _runs(redis_server, "refresh", 7)) == [0, 1, 2]


_CANVAS = """
import json, time
from celery import chain, chord, group
from tests.apps.debounced import ledger, plain_add, refresh
g = group(refresh.s(i) for i in range(3)).apply_async()
c = chord([refresh.s(10), refresh.s(20)], plain_add.s(1)).apply_async()
ch = chain(plain_add.s(1, 1), refresh.s(), plain_add.s(100)).apply_async()
linked = refresh.apply_async((7,), link=plain_add.s(1000))
frozen = refresh.s(9)
frozen_id = frozen.freeze().id
r = frozen.delay()
out = {"group": g.get(timeout=10), "chord": c.get(timeout=10), "chain": ch.get(timeout=10),
       "linked": linked.get(timeout=10), "frozen": [frozen_id == r.id, r.get(timeout=10)]}
deadline = time.time() + 10
while time.time() < deadline and not any(json.loads(x)["y"] == 1000 for x in ledger.lrange("runs:plain_add", 0, -1)):
    time.sleep(0.05)
out["link_ran"] = any(json.loads(x)["y"] == 1000 for x in ledger.lrange("runs:plain_add", 0, -1))
print(json.dumps(out))
"""


def test_group_chord_chain_link_and_frozen_members_of_a_debounced_task_all_run_under_their_own_ids(world):
    """Somebody waits on each of these ids: they are published at once, never collapsed into one run."""
    out = run_producer(_CANVAS, world["server"], env=world["env"])
    data = json.loads(out.splitlines()[-1])
    assert data == {"group": [0, 1, 2], "chord": 31, "chain": 102, "linked": 7, "frozen": [True, 9],
                    "link_ran": True}, data


def test_a_retried_run_keeps_its_key_so_the_next_run_starts_after_the_retry_with_the_latest_arguments(world):
    server = world["server"]
    out = run_producer(
        "import json, time\nfrom tests.apps.debounced import ledger, retried\n"
        "first = retried.delay(1)\n"
        "deadline = time.time() + 15\n"
        "while not ledger.llen('runs:retried') and time.time() < deadline:\n"
        "    time.sleep(0.02)\n"
        "second = retried.delay(2)\n"       # during the first attempt, which then retries (after 1 s)
        "print(json.dumps([first.id != second.id, first.get(timeout=15), second.get(timeout=15)]))\n",
        server, env=world["env"])
    assert json.loads(out.splitlines()[-1]) == [True, 1, 2]
    time.sleep(0.5)
    runs = _runs(server, "retried")
    assert [(r["i"], r["retries"]) for r in runs] == [(1, 0), (1, 1), (2, 0)], runs


def test_a_revoked_pending_run_frees_its_key_when_the_worker_drops_it(world):
    """The worker drops the revoked run's message: the next call runs about `delay` later, not after
    the key's bound for a published run (tuning_dedupe_ttl, an hour)."""
    server = world["server"]
    out = run_producer(
        "import json, time\nfrom tests.apps.debounced import refresh\n"
        "a = refresh.delay(1)\n"
        "a.revoke()\n"
        "time.sleep(1.5)\n"                      # due at 0.5 s, published, dropped by the worker
        "t = time.time()\n"
        "b = refresh.delay(2)\n"
        "print(json.dumps([a.id != b.id, b.get(timeout=10), time.time() - t, a.state]))\n",
        server, env=world["env"])
    different, value, took, state = json.loads(out.splitlines()[-1])
    assert different and value == 2 and state == "REVOKED"
    assert took < 5, took  # due 0.5 s after the call; without the fix, held for the queued bound


_MOVER_ROUND = """
import json
from kombu.utils.json import dumps
from tests.apps.debounced import app
from celery_tuning.integration.mover import Mover
from celery_tuning.integration.runtime import runtime_for
from celery_tuning.integration.steps.debounce import debounce_store
T = "tests.apps.debounced.per_account"
store = debounce_store(runtime_for(app))
def payload(acc, **extra):
    return dumps({"task": T, "args": [acc, 0], "kwargs": {}, "options": {}, "subtask_type": None,
                  "immutable": False, "v": 1, **extra})
bad = dict(options={"serializer": "no-such-serializer"}, tuning_app=app.main)
store.call(T, "bad", "id-bad", payload("bad", **bad), 0)        # claimed first: publishing it raises
store.call(T, "foreign", "id-foreign", payload("foreign", tuning_app="another_app"), 0)
store.call(T, "good", "id-good", payload("good", tuning_app=app.main), 0)
mover = Mover(app)
published = mover.debounce.run_once(0.0).published
now = store.now_us()
out = {"published": published}
for d in ("bad", "foreign", "good"):
    e = store.entry(T, d)
    out[d] = [e.state, round((e.expires_us - now) / 1e6)]
print(json.dumps(out))
"""


def test_one_failing_run_does_not_hold_up_the_others_and_another_app_name_is_no_reason_to_hold_a_run(redis_server):
    env = _env(redis_server, broker=8, tuning=9, ledger=10, TEST_PARK_MOVER="0")
    for db in (8, 9, 10):
        redis_server.client(db).flushdb()
    data = json.loads(run_producer(_MOVER_ROUND, redis_server, env=env).splitlines()[-1])
    assert data["published"] == 2, data
    assert data["bad"] == ["c", 30], data         # left claimed: claimed again after the claim TTL
    # A run stamped with another app name but of a task this app has is published: the producer may
    # name its app differently from the worker's (the name is kept for diagnostics only).
    assert data["foreign"][0] == "a", data
    assert data["good"][0] == "a" and data["good"][1] >= 3500, data  # held until started, up to tuning_dedupe_ttl
    published = [json.loads(m)["headers"]["id"] for m in redis_server.client(8).lrange("celery", 0, -1)]
    assert sorted(published) == ["id-foreign", "id-good"]
