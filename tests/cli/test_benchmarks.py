"""The benchmark harness runs (so `./run bench` does not rot) and its Redis work per task is as designed.

No timing is asserted: the counts are server-side EVALSHA calls.
"""

import pytest

from benchmarks.__main__ import passthrough, render_table

pytestmark = pytest.mark.slow


def test_passthrough_section_runs_and_scripts_per_task_are_exact(fault_redis):
    # A private server: the harness counts every celery-tuning connection on it, and the test
    # process's own (from earlier tests on the shared server) would be counted too.
    results = passthrough(fault_redis.db_url(5), ["solo"], tasks=120, runs=1)
    solo = results["solo"]
    above = {v: round(n * 120) for v, n in solo["scripts_above_plain"].items()}
    # Counted above plain Celery, whose broker (kombu) runs a few binding-refresh scripts of its
    # own, mostly at start (2-4 here). Pass-through runs no script; the never-binding limiter one
    # per task; everything on (cache miss + limiter + closed breaker + SLA) two: the lookup
    # carrying the limiter's decision, then the store. Slack: kombu's start-up count varies by a
    # few, the first call of each of our scripts in a fresh process is answered NOSCRIPT and sent
    # again, and the closed breaker re-reads its state once per refresh interval. One script more
    # or less per task would move a count by 120.
    assert -4 <= above["tuned"] <= 4, above
    assert 116 <= above["limited"] <= 126, above
    assert 236 <= above["everything"] <= 254, above
    assert all(solo[v]["tasks_per_s"]["median"] > 0 for v in above)
    # The design's bar in a real worker: one pool connection per process (solo: one process).
    assert solo["limited"]["pool_connections"]["median"] == 1
    assert solo["limited"]["pubsub_connections"]["median"] == 0
    # the cache's invalidation listener and the breaker's failure listener
    assert solo["everything"]["pubsub_connections"]["median"] == 2
    table = render_table({"tasks": 120, "runs": 1, "pass_through": results})
    assert "| solo |" in table and "scripts per task" in table


def test_parking_section_runs_each_task_once_and_parks_nothing_in_the_workers(fault_redis):
    # Issue #17's burst, small: 100 tasks at once against the shared 200/s limit (on_limit
    # "defer": every task not admitted at once parks), 2 prefork workers. Counts only, no timing.
    from benchmarks.parking import render, run_once
    from celery_tuning.testing import RedisServer

    tuning = RedisServer().start()
    try:
        burst = run_once("rl", "park", 100, fault_redis.db_url(6), fault_redis.db_url(7), tuning)
    finally:
        tuning.close()
    assert (burst["ran"], burst["missing"], burst["ran_twice_or_more"]) == (100, 0, 0), burst
    assert burst["deferred"] > 0, burst          # the parking path ran
    assert burst["scheduled_max"] == 0, burst    # no ETA message held by a worker
    assert burst["log_errors"] == 0, burst["log_tail"]
    table = render({"burst": {"park": burst}, "cap": {"park": burst}, "rate": 200, "cap_limit": 4,
                    "task_seconds": 0.05})
    assert "| ran / missing / ran twice | 100 / 0 / 0 |" in table
