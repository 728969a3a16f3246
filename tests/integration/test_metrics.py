"""The Prometheus endpoint of a real prefork worker, scraped over HTTP."""

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_tuning.integration.metrics import FLUSH_INTERVAL
from celery_tuning.testing import free_port
from tests.support.apps import run_producer, worker_env
from tests.support.workers import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def scrape(port, settle=True):
    """The worker's samples; ``settle`` waits for pool processes to write what they added up."""
    if settle:
        time.sleep(FLUSH_INTERVAL * 2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return sum(v for (n, lbls), v in samples.items() if n == name and all((k, str(x)) in lbls
                                                                            for k, x in labels.items()))


def test_prefork_children_are_aggregated_and_countdown_is_not_waiting(redis_clean):
    port = free_port()
    env = {**worker_env(redis_clean), "TEST_METRICS_PORT": str(port)}
    worker = WorkerProcess("tests.apps.metered:app", env, pool="prefork", concurrency=2,
                           extra=["--max-tasks-per-child", "5"])
    try:
        worker.start()
        run_producer(
            "from tests.apps.metered import work, too_slow\n"
            "rs = [work.delay(i) for i in range(11)] + [work.apply_async((i,), countdown=6) for i in range(3)]\n"
            "rs += [work.delay(i) for i in range(6)]\n"
            "assert [r.get(timeout=60) for r in rs] == list(range(11)) + list(range(3)) + list(range(6))\n"
            "assert too_slow.delay().get(timeout=30) == 'late'\n", redis_clean)
        samples = scrape(port)  # settled: the status command below reads the same figures
        import subprocess
        import sys

        from tests.support.workers import ROOT

        status = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.metered:app", "tuning", "status"],
                                capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=worker.env)
    finally:
        worker.close()
    task = "tests.apps.metered.work"
    # 20 attempts over recycled children (max_tasks_per_child=5): none lost
    assert value(samples, "celery_tuning_task_queue_wait_seconds_count", task=task) == 20
    assert value(samples, "celery_tuning_task_run_seconds_count", task=task) == 20
    assert value(samples, "celery_tuning_task_outcomes_total", task=task, state="success") == 20
    # the 3 countdown tasks waited 6 s for their ETA, which is not queue wait
    assert value(samples, "celery_tuning_task_queue_wait_seconds_bucket", task=task, le="5.0") == 20
    assert value(samples, "celery_tuning_task_end_to_end_seconds_bucket", task=task, le="5.0") <= 17
    assert value(samples, "celery_tuning_sla_breaches_total", task="tests.apps.metered.too_slow",
                 level="critical", kind="run") == 1
    assert value(samples, "celery_tuning_tasks_in_flight", task=task) == 0
    assert all("tenant" not in str(lbls) and "args" not in str(lbls) for (_, lbls) in samples)
    assert status.returncode == 0, status.stderr
    assert f"SLA by queue (from http://127.0.0.1:{port}/metrics" in status.stdout
    assert "celery: attempts 21, wait p50" in status.stdout
    assert "SLA checked 1, warning 0, critical 1, compliance 0.00%" in status.stdout


def test_port_in_use_is_a_clear_error(redis_clean):
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = {**worker_env(redis_clean), "TEST_METRICS_PORT": str(port)}
        worker = WorkerProcess("tests.apps.metered:app", env, pool="solo")
        try:
            with pytest.raises(RuntimeError) as info:
                worker.start(timeout=30)
            assert f"tuning_metrics_port: cannot listen on 0.0.0.0 port {port}" in str(info.value)
        finally:
            worker.close()


def test_hard_time_limit_is_settled_by_the_main_process(redis_clean):
    port = free_port()
    env = {**worker_env(redis_clean), "TEST_METRICS_PORT": str(port)}
    worker = WorkerProcess("tests.apps.metered:app", env, pool="prefork", concurrency=1, queues="celery,slowlane")
    try:
        worker.start()
        # Routed to a queue other than the task's own: the failure is labelled with that queue.
        task_id = run_producer("from tests.apps.metered import stuck\nprint(stuck.apply_async(queue='slowlane').id)\n",
                               redis_clean)
        running = 0
        deadline = time.monotonic() + 5
        while not running and time.monotonic() < deadline:  # it runs for 1 s before the kill
            running = value(scrape(port, settle=False), "celery_tuning_tasks_in_flight",
                            task="tests.apps.metered.stuck")
            time.sleep(0.05)
        assert running == 1
        run_producer(
            "from tests.apps.metered import app, work\n"
            "from celery.exceptions import TimeLimitExceeded\n"
            f"r = app.AsyncResult({task_id!r})\n"
            "try:\n    r.get(timeout=30)\nexcept TimeLimitExceeded:\n    pass\n"
            "else:\n    raise SystemExit('no time limit')\n"
            "assert work.delay(1).get(timeout=30) == 1\n", redis_clean)
        samples = scrape(port)
    finally:
        worker.close()
    task = "tests.apps.metered.stuck"
    assert value(samples, "celery_tuning_task_outcomes_total", task=task, state="failure") == 1
    assert value(samples, "celery_tuning_task_outcomes_total", task=task, queue="slowlane", state="failure") == 1
    assert value(samples, "celery_tuning_tasks_in_flight", task=task) == 0
    assert value(samples, "celery_tuning_task_outcomes_total", task="tests.apps.metered.work", state="success") == 1


def test_advise_tells_cpu_bound_from_io_bound_queues(redis_clean):
    """`tuning advise` reads a real worker's metrics: spinning tasks -> cpu, sleeping ones -> io."""
    import json
    import subprocess
    import sys

    from tests.support.workers import ROOT

    port = free_port()
    env = {**worker_env(redis_clean), "TEST_METRICS_PORT": str(port)}
    worker = WorkerProcess("tests.apps.metered:app", env, pool="prefork", concurrency=1, queues="crunch,net")
    try:
        worker.start()
        run_producer(
            "from tests.apps.metered import crunch, nap\n"
            "rs = [crunch.apply_async(queue='crunch') for _ in range(25)]\n"
            "rs += [nap.apply_async(queue='net') for _ in range(25)]\n"
            "assert all(r.get(timeout=60) for r in rs)\n", redis_clean)
        time.sleep(FLUSH_INTERVAL * 2)  # pool children write what they added up
        cmd = [sys.executable, "-m", "celery", "-A", "tests.apps.metered:app", "tuning", "advise",
               "--metrics-url", f"http://127.0.0.1:{port}/metrics"]
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=worker.env)
        as_json = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                                 env=worker.env)
        too_few = subprocess.run([*cmd, "--min-attempts", "100"], capture_output=True, text=True, timeout=60,
                                 cwd=str(ROOT), env=worker.env)
    finally:
        worker.close()
    assert text.returncode == 0, text.stderr
    advice = {a["queue"]: a for a in json.loads(as_json.stdout)}
    assert advice["crunch"]["profile"] == "cpu" and advice["crunch"]["cpu_ratio"] > 0.6
    assert advice["net"]["profile"] == "io" and advice["net"]["cpu_ratio"] < 0.25
    assert advice["crunch"]["attempts"] == 25
    assert "crunch: profile cpu - CPU time is" in text.stdout
    assert "net: profile io - CPU time is" in text.stdout
    assert "only 25 task attempts observed (need 100)" in too_few.stdout


def test_breaker_state_follows_the_latest_transition_after_the_child_that_opened_it_is_recycled(redis_clean):
    """Each pool child writes its own gauge file; with multiprocess mode 'max' the recycled child's
    'open' outweighed a live child's 'closed' forever, and the shipped BreakerOpen alert never cleared."""
    port = free_port()
    env = {**worker_env(redis_clean), "TEST_METRICS_PORT": str(port)}
    worker = WorkerProcess("tests.apps.breaker_metered:app", env, pool="prefork", concurrency=1,
                           extra=["--max-tasks-per-child", "1"])
    try:
        worker.start()
        run_producer(
            "import time\n"
            "from tests.apps.breaker_metered import call\n"
            "r = call.delay(False)\n"
            "try:\n    r.get(timeout=30)\nexcept ValueError:\n    pass\n"
            "else:\n    raise AssertionError('should fail')\n"
            "time.sleep(1.2)  # the breaker's reset_timeout: the next call is its half-open trial\n"
            "assert call.delay(True).get(timeout=30) == 'ok'\n", redis_clean)
        samples = scrape(port)
    finally:
        worker.close()
    transitions = {lbls: v for (n, lbls), v in samples.items() if n == "celery_tuning_breaker_transitions_total"}
    assert transitions[(("name", "flaky"), ("state", "open"))] == 1, transitions
    assert transitions[(("name", "flaky"), ("state", "closed"))] >= 1, transitions
    states = [v for (n, lbls), v in samples.items() if n == "celery_tuning_breaker_state"]
    assert states == [0.0], states  # one series (no pid label), showing closed
