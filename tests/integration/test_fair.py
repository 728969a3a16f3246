"""``@fair`` (issue #18 item 5) end to end: real prefork workers, a real redis-server, the dispatcher in
the workers' parking mover.

One tenant's backlog never holds back another's calls; every call runs exactly once, also when a
dispatcher is SIGKILLed between publishing and acknowledging; weights give a key several messages
per turn; a key at its concurrency cap is passed over at release (its calls never park).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.support.apps import run_producer
from tests.support.fair import APP, fair_done, fair_env, fair_runs, wait_for
from tests.support.workers import WorkerProcess, running_workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]



@pytest.fixture()
def server(redis_server) -> Any:
    if not redis_server.alive():
        redis_server.start()
    redis_server.client().flushall()
    return redis_server


def test_a_tenant_publishing_after_a_1500_task_backlog_finishes_within_2s_and_everything_runs_once(server):
    env = fair_env(server)
    with running_workers(APP, env, count=1, concurrency=2, prefix="fair"):
        out = run_producer(
            "import json, time\nfrom tests.apps.fair_app import work\n"
            "a = [work.delay('A').id for _ in range(1500)]\n"
            "time.sleep(0.5)\n"  # A's backlog is being worked through
            "b = []\n"
            "for _ in range(20):\n"
            "    b.append((work.delay('B').id, time.time()))\n"
            "print(json.dumps({'a': a, 'b': b}))\n", server, env=env)
        data = json.loads(out.splitlines()[-1])
        wait_for(lambda: len(fair_runs(server, "work")) >= 1520, 90, "all 1,520 runs")
        time.sleep(0.5)  # a duplicate would have run by now
    runs = fair_runs(server, "work")
    assert set(runs) == set(data["a"]) | {i for i, _ in data["b"]}
    assert set(runs.values()) == {1}, "every call ran exactly once"
    done = {r["id"]: r for r in fair_done(server, "work")}
    last_a = max(done[i]["end"] for i in data["a"])
    late = [done[i]["end"] - at for i, at in data["b"]]
    assert max(late) < 2.0, late
    assert max(done[i]["end"] for i, _ in data["b"]) < last_a, "B finished while A's backlog still ran"


def test_a_dispatcher_sigkilled_between_publishing_and_acking_loses_nothing_and_runs_nothing_twice(server):
    env = fair_env(server, TEST_CLAIM_TTL="2", TEST_FAIR_WINDOW="40")
    run_producer("from tests.apps.fair_app import work\n"
                 "for i in range(60):\n"
                 "    work.delay('A' if i % 2 else 'B')\n", server, env=env)
    # This worker consumes another queue only: everything its dispatcher published waits in the
    # broker, and it dies right after publishing its 5th message, before acknowledging it.
    doomed = WorkerProcess(APP, {**env, "TEST_FAIR_KILL_AFTER": "5"}, concurrency=1, queues="side", name="doomed")
    try:
        try:
            doomed.start()
        except RuntimeError:
            pass  # it died before its "ready" line was read: what it is here for
        assert doomed.proc is not None
        doomed.proc.wait(timeout=30)
        assert doomed.proc.returncode == -9, doomed.output()[-2000:]
    finally:
        doomed.close()
    assert server.client(2).get("killed_after") == b"5"
    assert not fair_runs(server, "work"), "nothing ran yet: the published copies wait in the broker"
    # It claimed 40 (the window), published 5 and acknowledged 4: 36 claims are left behind, the
    # 5th message's among them although a copy of it is in the broker.
    assert server.client(1).zcard("tuning:fq:{fairq}:claim") == 36
    time.sleep(2.5)  # past the claim TTL: the next dispatcher publishes all 36 again (pub 2)
    with running_workers(APP, env, count=1, concurrency=2, prefix="heir") as workers:
        wait_for(lambda: len(fair_runs(server, "work")) >= 60, 60, "all 60 runs")
        time.sleep(3)  # past another claim TTL: a second copy would have run by now
        log = workers[0].output()
    runs = fair_runs(server, "work")
    assert len(runs) == 60 and set(runs.values()) == {1}, runs
    assert log.count("dropped a duplicate of a fair message") <= 1, log


def test_weights_give_a_key_several_messages_per_turn(server):
    env = fair_env(server, TEST_FAIR_WINDOW="1")
    run_producer("from tests.apps.fair_app import weighted\n"
                 "for i in range(40):\n"
                 "    weighted.delay('gold')\n"
                 "    weighted.delay('silver')\n", server, env=env)
    with running_workers(APP, env, count=1, concurrency=1, prefix="weigh"):
        wait_for(lambda: len(fair_runs(server, "weighted")) >= 80, 60, "all 80 runs")
    order = [r["tenant"] for r in sorted(fair_done(server, "weighted"), key=lambda r: r["start"])]
    first = order[:40]
    assert 28 <= first.count("gold") <= 32, first  # three gold per silver while both wait
    assert set(fair_runs(server, "weighted").values()) == {1}


def test_a_key_at_its_concurrency_cap_is_passed_over_at_release_so_its_calls_never_park(server):
    env = fair_env(server, TEST_FAIR_WINDOW="8")
    with running_workers(APP, env, count=1, concurrency=4, prefix="cap"):
        run_producer("from tests.apps.fair_app import capped\n"
                     "for i in range(6):\n"
                     "    capped.delay('X')\n"
                     "    capped.delay('Y')\n", server, env=env)
        wait_for(lambda: len(fair_runs(server, "capped")) >= 12, 60, "all 12 runs")
    ledger = server.client(2)
    for tenant in ("X", "Y"):
        peaks = [int(v) for v in ledger.lrange(f"peak:{tenant}", 0, -1)]
        assert len(peaks) == 6 and max(peaks) <= 2, (tenant, peaks)
    assert set(fair_runs(server, "capped").values()) == {1}
    parked = [k for k in server.client(1).keys("tuning:park:*")]
    assert parked == [], f"a call was fetched, refused at its cap and parked: {parked}"
