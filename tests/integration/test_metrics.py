"""The Prometheus endpoint of a real prefork worker, scraped over HTTP."""

import glob
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid

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


def metrics_dirs(pid):
    """The metrics directories of the worker whose main process is ``pid`` (also as named before)."""
    base = os.path.join(tempfile.gettempdir(), f"celery-tuning-metrics-{pid}")
    return glob.glob(base + "-*") + ([base] if os.path.isdir(base) else [])


def test_port_in_use_is_a_clear_error_and_leaves_no_metrics_directory(redis_clean):
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
            pid = worker.proc.pid
            assert worker.proc.wait(timeout=30) != 0
            assert "metrics on" not in worker.output()
            assert metrics_dirs(pid) == []  # removed by the main process on its way out
        finally:
            worker.close()


def get_health(port):
    """(HTTP status, JSON body) of the worker's /health."""
    import json
    import urllib.error

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            return answer.status, answer.headers.get("Content-Type"), json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), json.loads(exc.read())


def test_hard_time_limit_health_and_queue_depth_of_a_real_worker(redis_clean, fault_redis):
    """One prefork worker with one process and prefetch 1, its tuning store a Redis we can kill:

    * /health answers 200 naming the queues it consumes; celery_tuning_worker_consuming is 1;
    * while its only process sleeps in a task, tasks published to a queue it consumes wait there,
      and celery_tuning_queue_depth{queue} says how many (the broker's own count, one prefetched);
    * a hard time limit is settled by the main process (issue #9);
    * with the tuning Redis down /health answers 503 saying so, and 200 again once it is back.
    """
    from celery import Celery

    port = free_port()
    env = {**worker_env(redis_clean), "TEST_METRICS_PORT": str(port), "TEST_TUNING_URL": fault_redis.db_url(1)}
    worker = WorkerProcess("tests.apps.metered:app", env, pool="prefork", concurrency=1, queues="celery,slowlane",
                           extra=["--prefetch-multiplier", "1"])
    producer = Celery("depth_producer", set_as_current=False, broker=redis_clean.db_url(0))
    broker = redis_clean.client(0)
    waiting = 6
    try:
        worker.start()
        status, ctype, body = get_health(port)
        assert (status, ctype) == (200, "application/json"), body
        assert body == {"status": "ok", "consuming": ["celery", "slowlane"], "redis": "ok"}
        samples = scrape(port, settle=False)
        assert value(samples, "celery_tuning_worker_consuming") == 1
        assert samples[("celery_tuning_queue_depth", (("queue", "slowlane"),))] == 0
        assert samples[("celery_tuning_queue_depth", (("queue", "celery"),))] == 0

        # The only process sleeps 3 s in a task; what is published meanwhile waits in the broker.
        producer.send_task("tests.apps.metered.stuck", queue="celery", time_limit=30)
        deadline = time.monotonic() + 5
        while not value(scrape(port, settle=False), "celery_tuning_tasks_in_flight", task="tests.apps.metered.stuck"):
            assert time.monotonic() < deadline, "the sleeping task never started"
            time.sleep(0.05)
        for i in range(waiting + 1):
            producer.send_task("tests.apps.metered.work", (i,), queue="slowlane")
        deadline = time.monotonic() + 2
        while True:  # the worker reserves one (prefetch 1); a reading is reused for up to 1 s
            listed = broker.llen("slowlane")
            depth = scrape(port, settle=False).get(("celery_tuning_queue_depth", (("queue", "slowlane"),)))
            if depth == listed == waiting and broker.llen("slowlane") == listed:
                break
            assert time.monotonic() < deadline, (depth, listed)
            time.sleep(0.1)
        assert value(scrape(port, settle=False), "celery_tuning_queue_depth", queue="celery") == 0
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
        drained = samples.get(("celery_tuning_queue_depth", (("queue", "slowlane"),)))
        fault_redis.stop()
        down = get_health(port)
        fault_redis.start()
        deadline = time.monotonic() + 10
        while (back := get_health(port))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.close()
    assert drained == 0
    status, _, body = down
    assert status == 503, body
    assert body["status"] == "unavailable" and body["redis"] == "error", body
    assert body["reason"].startswith("tuning Redis: PING failed against redis://127.0.0.1:"), body
    assert body["consuming"] == ["celery", "slowlane"], body
    assert back[0] == 200 and back[2]["redis"] == "ok", back
    assert value(samples, "celery_tuning_task_outcomes_total", task="tests.apps.metered.work",
                 queue="slowlane", state="success") == waiting + 1
    task = "tests.apps.metered.stuck"
    assert value(samples, "celery_tuning_task_outcomes_total", task=task, queue="celery", state="success") == 1
    assert value(samples, "celery_tuning_task_outcomes_total", task=task, state="failure") == 1
    assert value(samples, "celery_tuning_task_outcomes_total", task=task, queue="slowlane", state="failure") == 1
    # timed from its start to the kill at the 1 s limit (the child never reached task_postrun)
    assert value(samples, "celery_tuning_task_run_seconds_count", task=task, queue="slowlane") == 1
    assert 1.0 <= value(samples, "celery_tuning_task_run_seconds_sum", task=task, queue="slowlane") < 10
    assert value(samples, "celery_tuning_tasks_in_flight", task=task) == 0
    assert value(samples, "celery_tuning_task_outcomes_total", task="tests.apps.metered.work", queue="celery",
                 state="success") == 1


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


def listening_inode(port):
    """The socket inode listening on ``port`` (from /proc/net/tcp*)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                    return fields[9]
    raise AssertionError(f"nothing listens on {port}")


def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def socket_inodes(pid):
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def test_queue_labels_lost_children_deferrals_and_the_metrics_directory_with_a_real_prefork_worker(redis_clean):
    """One prefork worker whose children are replaced after every task (issue #21, 2, 6, 9):

    * a task sent to exchange tx with routing key rk.x is timed, SLA-checked and labelled as the
      queue qx it was consumed from, topic keys orders.eu.N as their queue qt;
    * a child that SIGKILLs itself leaves a run-time sample and an SLA check (it left an outcome only);
    * a deferred attempt is no SLA check, the attempt that runs is;
    * the directories of workers that are gone are swept at start, a live one is kept; children's
      files do not pile up and totals stay exact; pool children do not hold the metrics socket;
      a warm shutdown leaves no directory.
    """
    import fcntl

    tmp = tempfile.gettempdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tempfile.mkdtemp(prefix=f"celery-tuning-metrics-{gone.pid}-", dir=tmp)  # a lock nobody holds
    open(os.path.join(stale, "owner.lock"), "w").close()
    open(os.path.join(stale, f"counter_{gone.pid}.db"), "wb").close()
    old_style = os.path.join(tmp, f"celery-tuning-metrics-{gone.pid}")  # an earlier version's: no lock
    os.makedirs(old_style, exist_ok=True)
    live = tempfile.mkdtemp(prefix=f"celery-tuning-metrics-{gone.pid}-", dir=tmp)  # dead pid, held lock
    held = os.open(os.path.join(live, "owner.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)

    port = free_port()
    env = {**worker_env(redis_clean), "TEST_METRICS_PORT": str(port)}
    worker = WorkerProcess("tests.apps.observed:app", env, pool="prefork", concurrency=2, queues="qx,qy,qt",
                           extra=["--max-tasks-per-child", "1"])
    try:
        worker.start()
        assert not os.path.exists(stale) and not os.path.exists(old_style)
        assert os.path.isdir(live)
        pid = worker.proc.pid
        [ours] = metrics_dirs(pid)
        run_producer(
            "from celery.exceptions import WorkerLostError\n"
            "from tests.apps.observed import DIRECT, TOPIC, killed, quick, slow, trickle\n"
            "rs = [trickle.delay(i) for i in range(2)]  # both start at once (two idle children): one is deferred\n"
            "lost = killed.delay()\n"
            "rs.append(slow.apply_async(exchange=DIRECT, routing_key='rk.x'))\n"
            "rs += [quick.apply_async((i,), exchange=TOPIC, routing_key=f'orders.eu.{i}', declare=[TOPIC])\n"
            "       for i in range(4)]\n"
            "assert [r.get(timeout=60) for r in rs] == [0, 1, 0.2] + list(range(4))\n"
            "try:\n    lost.get(timeout=30)\nexcept WorkerLostError:\n    pass\n"
            "else:\n    raise SystemExit('the child was not lost')\n"
            "import time\n"
            "from tests.apps.observed import held\n"
            "r = held.delay()\n"
            "deadline = time.monotonic() + 30\n"
            "while r.state != 'STARTED' and time.monotonic() < deadline:\n    time.sleep(0.05)\n"
            "r.revoke(terminate=True)\n"
            "while r.state != 'REVOKED' and time.monotonic() < deadline:\n    time.sleep(0.05)\n"
            "assert r.state == 'REVOKED', r.state\n", redis_clean)
        samples = scrape(port)
        files = [f for f in os.listdir(ours) if f.endswith(".db")]
        children = children_of(pid)
        listener = listening_inode(port)
        assert listener in socket_inodes(pid)
        held_by_children = {child: listener in socket_inodes(child) for child in children}
        worker.stop()  # warm shutdown (SIGTERM)
        assert not os.path.exists(ours)
    finally:
        worker.close()
        os.close(held)
        for path in (stale, old_style, live):
            shutil.rmtree(path, ignore_errors=True)
    m = "tests.apps.observed."
    run_counts = {lbls: v for (n, lbls), v in samples.items() if n == "celery_tuning_task_run_seconds_count"}
    assert {dict(lbls)["queue"] for lbls in run_counts} == {"qx", "qt"}, run_counts
    # 2: the queue consumed from, not the routing key; its SLA applies
    assert value(samples, "celery_tuning_sla_breaches_total", task=m + "slow", queue="qx", level="critical") == 1
    assert value(samples, "celery_tuning_task_run_seconds_count", task=m + "quick", queue="qt") == 4
    assert value(samples, "celery_tuning_sla_checked_total", task=m + "quick", queue="qt") == 4
    # 9: the killed child's attempt is timed (0.3 s before the kill) and checked against qx's SLA
    assert value(samples, "celery_tuning_task_outcomes_total", task=m + "killed", queue="qx", state="failure") == 1
    assert value(samples, "celery_tuning_task_run_seconds_count", task=m + "killed", queue="qx") == 1
    # from its start to when the main process noticed the loss (later on a loaded machine)
    assert 0.3 <= value(samples, "celery_tuning_task_run_seconds_sum", task=m + "killed") < 30
    assert value(samples, "celery_tuning_sla_checked_total", task=m + "killed", queue="qx") == 1
    assert value(samples, "celery_tuning_sla_breaches_total", task=m + "killed", queue="qx", level="critical",
                 kind="run") == 1
    # a running task revoked with terminate=True: timed once, by the main process
    assert value(samples, "celery_tuning_task_outcomes_total", task=m + "held", queue="qx", state="revoked") == 1
    assert value(samples, "celery_tuning_task_run_seconds_count", task=m + "held", queue="qx") == 1
    # (a): two tasks ran once each; the deferred attempt was no SLA check
    assert value(samples, "celery_tuning_task_outcomes_total", task=m + "trickle", state="deferred") >= 1
    assert value(samples, "celery_tuning_task_outcomes_total", task=m + "trickle", state="success") == 2
    assert value(samples, "celery_tuning_sla_checked_total", task=m + "trickle") == 2
    # 6: ten children came and went (one attempt each); their files were merged, totals exact
    assert value(samples, "celery_tuning_task_run_seconds_count") == 2 + 1 + 4 + 1 + 1 + value(
        samples, "celery_tuning_task_outcomes_total", task=m + "trickle", state="deferred")
    assert value(samples, "celery_tuning_task_outcomes_total", state="success") == 7
    assert {"counter_archive.db", "histogram_archive.db"} <= set(files), files
    exited = [f for f in files if f.rsplit("_", 1)[1][:-3].isdigit()
              and not os.path.exists(f"/proc/{f.rsplit('_', 1)[1][:-3]}")]
    assert len(exited) <= 6, files  # at most the children that exited since the scrape began
    assert len(files) <= 3 * 3 + 3, files  # main process and two children, three kinds each; archives
    # (b): the children did not inherit the metrics listening socket
    assert children and not any(held_by_children.values()), held_by_children


@pytest.mark.reliability
def test_queue_label_is_the_queue_consumed_from_on_rabbitmq(redis_clean, rabbitmq_url):
    """Two queues bound to the same key on one exchange both get a copy; matching the routing key
    labelled both with the first, and the second's SLA never applied. The consumer tag names each."""
    from kombu import Connection

    suffix = "-" + uuid.uuid4().hex[:8]
    port = free_port()
    env = {**worker_env(redis_clean), "TEST_BROKER_URL": rabbitmq_url, "TEST_METRICS_PORT": str(port),
           "TEST_ROUTE_SUFFIX": suffix, "TEST_QY_KEY": "rk.x"}
    # A node name of its own: RabbitMQ is shared, and a pidbox queue is exclusive to one connection.
    worker = WorkerProcess("tests.apps.observed:app", env, pool="prefork", concurrency=1,
                           queues=f"qx{suffix},qy{suffix},qt{suffix}", name=f"observed{suffix}")
    try:
        worker.start()
        run_producer(
            "from tests.apps.observed import DIRECT, TOPIC, quick, slow\n"
            "slow.apply_async(exchange=DIRECT, routing_key='rk.x').get(timeout=30)\n"
            "assert quick.apply_async((1,), exchange=TOPIC, routing_key='orders.us.7').get(timeout=30) == 1\n",
            redis_clean, env=env)
        deadline = time.monotonic() + 20
        while True:  # both copies of slow ran
            samples = scrape(port)
            if value(samples, "celery_tuning_task_run_seconds_count", task="tests.apps.observed.slow") >= 2:
                break
            assert time.monotonic() < deadline, samples
        health = get_health(port)
    finally:
        worker.close()
        with Connection(rabbitmq_url) as conn:
            channel = conn.channel()
            for queue in ("qx", "qy", "qt"):
                channel.queue_delete(queue + suffix)
            for exchange in ("tx", "tt"):
                channel.exchange_delete(exchange + suffix)
    slow = "tests.apps.observed.slow"
    # queue depths from a passive queue_declare on RabbitMQ: every consumed queue drained
    depths = {dict(lbls)["queue"]: v for (n, lbls), v in samples.items() if n == "celery_tuning_queue_depth"}
    assert depths == {q + suffix: 0 for q in ("qx", "qy", "qt")}, depths
    assert health[0] == 200 and health[2]["consuming"] == sorted(q + suffix for q in ("qt", "qx", "qy")), health
    assert value(samples, "celery_tuning_task_run_seconds_count", task=slow, queue="qx" + suffix) == 1
    assert value(samples, "celery_tuning_task_run_seconds_count", task=slow, queue="qy" + suffix) == 1
    assert value(samples, "celery_tuning_sla_breaches_total", task=slow, queue="qx" + suffix, level="critical") == 1
    assert value(samples, "celery_tuning_sla_breaches_total", task=slow, queue="qy" + suffix, level="warning") == 1
    assert value(samples, "celery_tuning_sla_breaches_total", task=slow, queue="qy" + suffix, level="critical") == 0
    assert value(samples, "celery_tuning_task_run_seconds_count", task="tests.apps.observed.quick",
                 queue="qt" + suffix) == 1


NO_WORKER = r"""
import json, urllib.error, urllib.request
from celery_tuning.integration.metrics import connect_metric_receivers, start_endpoint
connect_metric_receivers()
port = start_endpoint(0, "127.0.0.1").server_port
try:
    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    health = None
except urllib.error.HTTPError as exc:
    health = [exc.code, json.loads(exc.read())]
metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
print(json.dumps({"health": health, "metrics": metrics}))
"""


def test_health_is_503_until_a_worker_consumes():
    """An endpoint whose process has no consuming worker (never ready) is not healthy, and says why."""
    import json
    import sys

    from tests.support.workers import ROOT

    out = subprocess.run([sys.executable, "-c", NO_WORKER], capture_output=True, text=True, timeout=60,
                         cwd=str(ROOT), env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["health"] == [503, {"status": "unavailable", "reason": "consumer not started", "consuming": [],
                                    "redis": "unknown"}]
    assert "celery_tuning_worker_consuming 0.0" in data["metrics"]
    assert "celery_tuning_queue_depth{" not in data["metrics"]


def test_queue_depth_of_a_broker_that_does_not_answer_is_left_out_with_one_log_line(caplog):
    """A refused broker connection: no reading (the gauge is left out), a bounded wait, and one
    warning however many scrapes fail until the broker answers."""
    import logging

    from celery import Celery

    from celery_tuning.integration.metrics import QUEUE_DEPTH_TTL, _QueueDepths

    app = Celery("depth_down", set_as_current=False, broker=f"redis://127.0.0.1:{free_port()}/0")
    depths = _QueueDepths()
    with caplog.at_level(logging.INFO, logger="celery_tuning.metrics"):
        started = time.monotonic()
        assert depths.get(app, [("q", "q")]) is None
        took = time.monotonic() - started
        assert depths.get(app, [("q", "q")]) is None  # the failed reading, reused
        time.sleep(QUEUE_DEPTH_TTL)
        assert depths.get(app, [("q", "q")]) is None
    assert took < 1.5
    lines = [r.getMessage() for r in caplog.records if r.name == "celery_tuning.metrics"]
    assert len(lines) == 1 and "cannot read queue depths from the broker" in lines[0], lines
