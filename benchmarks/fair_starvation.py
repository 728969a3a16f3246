"""Fair queues (issue #18 item 5): tenant A publishes 5,000 tasks of 10 ms, then tenant B publishes 20.

One real prefork worker (2 processes, prefetch 1: a window of 2) runs ``tests/apps/fair_app.py``
against a private redis-server; a producer process publishes A's 5,000 calls, waits 0.5 s, then
B's 20. Reported: the slowest B call's time from publication to finish, when the last A call
finished, and how many times each of the 5,020 ran (must be once). Run:
``python -m benchmarks.fair_starvation [a_tasks]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from celery_tuning.testing import RedisServer, stop_process_groups

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.fair_app:app"


def run(a_tasks: int = 5000, b_tasks: int = 20) -> Dict[str, Any]:
    server = RedisServer().start()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TEST_BROKER_URL": server.db_url(0),
           "TEST_BACKEND_URL": server.db_url(0), "TEST_TUNING_URL": server.db_url(1),
           "TEST_LEDGER_URL": server.db_url(2)}
    log = open(os.devnull, "wb")
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", APP, "worker", "-P", "prefork", "-c", "2",
                               "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
                              env=env, cwd=str(ROOT), stdout=log, stderr=log, start_new_session=True)
    try:
        time.sleep(3)  # the worker starts and its dispatcher registers the queue's consumer
        code = ("import json, time\nfrom tests.apps.fair_app import work\n"
                f"a = [work.delay('A').id for _ in range({a_tasks})]\n"
                "time.sleep(0.5)\n"
                f"b = [(work.delay('B').id, time.time()) for _ in range({b_tasks})]\n"
                "print(json.dumps({'a': a, 'b': b}))\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True,
                             check=True, timeout=300)
        data = json.loads(out.stdout.strip().splitlines()[-1])
        ledger = server.client(2)
        deadline = time.monotonic() + 600
        while ledger.hlen("runs:work") < a_tasks + b_tasks and time.monotonic() < deadline:
            time.sleep(0.2)
        runs = {k.decode(): int(v) for k, v in ledger.hgetall("runs:work").items()}
        done = {r["id"]: r for r in (json.loads(x) for x in ledger.lrange("done:work", 0, -1))}
    finally:
        stop_process_groups([worker], timeout=15)
        server.close()
    b_late: List[float] = [done[i]["end"] - at for i, at in data["b"]]
    last_a = max(done[i]["end"] for i in data["a"])
    first_a = min(done[i]["start"] for i in data["a"])
    return {"a_tasks": a_tasks, "b_tasks": b_tasks, "ran": len(runs),
            "ran_once": sum(1 for v in runs.values() if v == 1),
            "b_slowest_s": max(b_late), "b_median_s": sorted(b_late)[len(b_late) // 2],
            "b_last_finished_before_a_s": last_a - max(done[i]["end"] for i, _ in data["b"]),
            "a_run_s": last_a - first_a}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 5000), indent=2))
