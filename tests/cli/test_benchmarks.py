"""The benchmark harness runs (so `./run bench` does not rot) and its Redis work per task is as designed.

No timing is asserted: the counts are server-side EVALSHA calls, which are exact.
"""

import pytest

from benchmarks.__main__ import passthrough, render_table

pytestmark = pytest.mark.slow


def test_passthrough_section_runs_and_scripts_per_task_are_exact(redis_server):
    results = passthrough(redis_server.db_url(5), ["solo"], tasks=120, runs=1)
    solo = results["solo"]
    calls = {v: round(solo[v]["scripts_per_task"]["median"] * 120) for v in ("plain", "tuned", "limited", "everything")}
    # plain and pass-through run no script; the never-binding limiter one per task; everything on
    # (cache miss + limiter + closed breaker + SLA) two: the lookup carrying the limiter's decision,
    # then the store. The first call of each script in a fresh process is answered NOSCRIPT and
    # sent again after loading it (one extra per script), and the closed breaker re-reads its
    # shared state once per refresh interval (a few calls in a run this short); a third script
    # per task (a separate limiter trip) would add 120.
    assert calls["plain"] == calls["tuned"] == 0
    assert 120 <= calls["limited"] <= 121
    assert 240 <= calls["everything"] <= 252, calls
    assert all(solo[v]["tasks_per_s"]["median"] > 0 for v in calls)
    table = render_table({"tasks": 120, "runs": 1, "pass_through": results})
    assert "| solo |" in table and "scripts per task" in table
