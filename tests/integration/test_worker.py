"""TunedTask, header stamping and SLA signals through real workers on a private Redis."""

import logging
import subprocess
import sys
import time

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

import celery_tuning
from celery_tuning import TunedTask, signals, sla
from tests.support.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.integration

from tests.support.workers import QUICK_BACKEND_RETRY  # noqa: E402


def make_app(redis_server, name, **conf):
    app = Celery(name, set_as_current=False, broker=redis_server.db_url(0),
                 backend=redis_server.db_url(0), task_cls="celery_tuning:TunedTask")
    app.conf.update(tuning_redis_url=redis_server.db_url(1), broker_connection_retry_on_startup=True,
                    result_backend_transport_options=QUICK_BACKEND_RETRY,
                    **conf)
    celery_tuning.install(app)
    return app


@pytest.fixture()
def collected():
    timed, breached = [], []

    def on_timed(sender=None, **kw):
        timed.append((sender.name, kw))

    def on_breach(sender=None, **kw):
        breached.append((sender.name, kw))

    signals.task_timed.connect(on_timed, weak=False)
    signals.sla_breached.connect(on_breach, weak=False)
    yield timed, breached
    signals.task_timed.disconnect(on_timed)
    signals.sla_breached.disconnect(on_breach)


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_timings_and_sla_in_process_worker(redis_clean, collected):
    timed, breached = collected
    handler = ListHandler()
    sla_logger = logging.getLogger("celery_tuning.sla")
    sla_logger.addHandler(handler)
    sla_logger.setLevel(logging.WARNING)  # start_worker sets the root logger to ERROR
    app = make_app(redis_clean, "inproc", tuning_sla={"celery": {"warning": 30, "critical": 60}})

    @app.task(bind=True)
    def stamps(self):
        return [self.request.tuning_published_at, self.request.tuning_sent_at]

    @app.task(base=TunedTask)
    @sla(warning=0.05, critical=0.5, on="run")
    def sleepy(seconds):
        time.sleep(seconds)
        return seconds

    before = time.time()
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=10):
        published, sent = stamps.delay().get(timeout=10)
        assert before <= published == sent <= time.time()
        assert sleepy.delay(0.1).get(timeout=10) == 0.1
        delayed = stamps.apply_async(countdown=1)
        delayed.get(timeout=10)
    by_task = {name: kw for name, kw in timed}
    assert set(by_task) >= {stamps.name, sleepy.name}
    run = by_task[sleepy.name]
    assert run["queue"] == "celery" and run["state"] == "SUCCESS"
    assert 0.1 <= run["run"] < 1.0 and run["total"] >= run["run"]
    delayed_timing = next(kw for _, kw in timed if kw["task_id"] == delayed.id)
    assert delayed_timing["wait"] < 0.9, "the countdown is not queue wait"
    assert delayed_timing["total"] >= 1.0
    assert [(n, kw["level"], kw["kind"], kw["threshold"]) for n, kw in breached] == [
        (sleepy.name, "warning", "run", 0.05)
    ]
    sla_logger.removeHandler(handler)
    sla_logger.setLevel(logging.NOTSET)
    assert len(handler.lines) == 1
    assert handler.lines[0].startswith(f"SLA warning breached: task={sleepy.name} id=")
    assert "queue=celery run=" in handler.lines[0]


def test_queue_sla_critical(redis_clean, collected):
    _, breached = collected
    app = make_app(redis_clean, "qsla", tuning_sla={"other": {"warning": 60}, "*": {"warning": 0.01, "critical": 0.02}})

    @app.task
    def nap():
        time.sleep(0.05)

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        nap.delay().get(timeout=10)
    assert [kw["level"] for _, kw in breached] == ["critical"]


def test_retry_keeps_first_publish_time(redis_clean):
    app = make_app(redis_clean, "retry")

    @app.task(bind=True, max_retries=2)
    def flaky(self):
        if self.request.retries == 0:
            raise self.retry(countdown=0.2)
        return [self.request.tuning_published_at, self.request.tuning_sent_at, self.request.retries]

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        published, sent, retries = flaky.delay().get(timeout=10)
    assert retries == 1
    assert sent - published >= 0.0 and sent > published


def test_tuned_and_plain_behave_alike_in_worker(redis_clean):
    app = make_app(redis_clean, "alike")

    @app.task(base=TunedTask)
    def tuned(x):
        if x < 0:
            raise ValueError("negative")
        return x * 2

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        assert tuned.delay(4).get(timeout=10) == 8
        failing = tuned.delay(-1)
        with pytest.raises(ValueError, match="negative"):
            failing.get(timeout=10)
        assert failing.state == "FAILURE"


def worker_env(redis_server):
    return {
        "TEST_BROKER_URL": redis_server.db_url(0),
        "TEST_BACKEND_URL": redis_server.db_url(0),
        "TEST_TUNING_URL": redis_server.db_url(1),
    }


@pytest.mark.slow
def test_prefork_worker_subprocess_and_producer_only_process(redis_clean):
    """A producer process that never starts a worker stamps headers; a prefork worker runs them."""
    worker = WorkerProcess("tests.apps.basic:app", worker_env(redis_clean), pool="prefork", concurrency=2)
    try:
        worker.start()
        # Every result stays referenced and the collector is off: on Celery < 5.7 an AsyncResult
        # collected inside the next call's SUBSCRIBE unsubscribes from its __del__ and deadlocks on
        # the result consumer's lock (seen with Celery 5.6.3 on Python 3.9; a Celery matter).
        code = (
            "import gc; gc.disable();"
            "from tests.apps.basic import headers, add;"
            "rs = [headers.delay() for _ in range(6)];"
            "r = [x.get(timeout=20) for x in rs];"
            "assert add.delay(2, 3).get(timeout=20) == 5;"
            "print(len({x['pid'] for x in r}), all(x['published_at'] and x['sent_at'] for x in r))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             cwd=str(ROOT), env={**worker.env})
        assert out.returncode == 0, out.stderr
        pids, stamped = out.stdout.split()
        assert stamped == "True"
        assert int(pids) >= 1
        assert "celery-tuning: tuning Redis redis://127.0.0.1" in worker.output()
    finally:
        worker.close()


@pytest.mark.slow
def test_without_tuning_worker_option(redis_clean):
    worker = WorkerProcess("tests.apps.basic:app", worker_env(redis_clean), pool="solo",
                           extra=["--without-tuning"])
    try:
        worker.start()
        assert "celery-tuning is disabled on this worker" in worker.output()
    finally:
        worker.close()


@pytest.mark.slow
def test_worker_starts_when_tuning_redis_is_down(redis_clean):
    env = worker_env(redis_clean)
    env["TEST_TUNING_URL"] = "redis://:secretpw@127.0.0.1:1/0"
    worker = WorkerProcess("tests.apps.basic:app", env, pool="solo")
    try:
        worker.start()
        code = "from tests.apps.basic import add; print(add.delay(20, 22).get(timeout=20))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             cwd=str(ROOT), env=worker.env)
        assert out.stdout.strip() == "42", out.stderr
        log = worker.output()
        assert "tuning Redis unreachable" in log
        assert "secretpw" not in log
    finally:
        worker.close()
