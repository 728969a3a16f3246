"""The pytest plugin as a user project sees it: a sample project written here, run in a subprocess
with no redis-server on PATH (issue #20)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from celery_tuning.testing import free_port

APP = '''
from celery import Celery
import celery_tuning
from celery_tuning import cache_result, circuit_breaker, rate_limit

app = Celery("shop", broker="memory://", backend="cache+memory://",
             task_cls="celery_tuning:TunedTask")
app.conf.tuning_redis_url = "redis://127.0.0.1:{closed}/0"  # nothing listens here
celery_tuning.install(app)

CALLS = []


@app.task(name="shop.charge")
@circuit_breaker("payments", fail_max=2, reset_timeout=60, on_open="fail")
def charge(amount):
    CALLS.append(amount)
    return amount


@app.task(name="shop.quote")
@rate_limit("2/m", burst=2, on_limit="raise")
def quote(n):
    return n * 2


@app.task(name="shop.price")
@cache_result(ttl=300)
def price(sku):
    CALLS.append(sku)
    return len(sku)
'''

CONFTEST = '''
import pytest

@pytest.fixture(autouse=True)
def _calls():
    from shop import CALLS
    CALLS.clear()
    yield
'''

TEST_EAGER = '''
import pytest
from celery_tuning import CircuitOpen, RateLimited
from shop import CALLS, app, charge, price, quote


@pytest.fixture(autouse=True)
def eager():
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    yield
    app.conf.task_always_eager = False


def test_breaker_opened_by_the_helper(tuning_memory):
    assert charge.delay(5).get() == 5
    tuning_memory.open_breaker(charge)
    with pytest.raises(CircuitOpen):
        charge.delay(6).get()
    assert CALLS == [5]


def test_state_is_reset_between_tests(tuning_memory):
    assert charge.delay(7).get() == 7  # the breaker opened above is closed again


def test_full_bucket_limits_the_next_call(tuning_memory):
    tuning_memory.fill_bucket(quote)
    with pytest.raises(RateLimited):
        quote.apply(args=(1,), throw=True).get()


def test_bucket_is_empty_again(tuning_memory):
    assert quote.delay(2).get() == 4
    assert quote.delay(3).get() == 6


def test_seeded_cache_answers_without_running(tuning_memory):
    tuning_memory.seed_cache(price, 99, "abc")
    assert price.delay("abc").get() == 99
    assert price.delay("abcd").get() == 4
    assert price.delay("abcd").get() == 4
    assert CALLS == ["abcd"]
'''

TEST_WORKER = '''
import pytest
import celery_tuning
from celery_tuning import cache_result

pytest_plugins = ("celery.contrib.pytest",)


@pytest.fixture(scope="session")
def celery_config():
    return {"broker_url": "memory://", "result_backend": "cache+memory://"}


@pytest.fixture(scope="session")
def celery_worker_parameters():
    return {"perform_ping_check": False}


@pytest.fixture()
def celery_app(celery_app):
    celery_tuning.install(celery_app)
    return celery_app


@pytest.fixture()
def celery_includes():
    return []


def test_worker_with_the_fixture_app(tuning_memory, celery_app, celery_worker):
    calls = []

    @celery_app.task(name="w.double", base=celery_tuning.TunedTask)
    @cache_result(ttl=60)
    def double(n):
        calls.append(n)
        return n * 2

    celery_worker.reload()
    assert double.delay(4).get(timeout=10, interval=0.05) == 8
    assert double.delay(4).get(timeout=10, interval=0.05) == 8
    assert calls == [4]


def test_import_time_app_in_a_worker(tuning_memory):
    from celery.contrib.testing.worker import start_worker
    from shop import app, charge

    with start_worker(app, perform_ping_check=False, shutdown_timeout=10):
        assert charge.delay(3).get(timeout=10, interval=0.05) == 3
        tuning_memory.open_breaker(charge)
        with pytest.raises(Exception, match="payments"):
            charge.delay(4).get(timeout=10, interval=0.05)
'''


SESSION_CONFTEST = '''
import pytest
import celery_tuning

pytest_plugins = ("celery.contrib.pytest",)


@pytest.fixture(scope="session")
def celery_config():
    return {"broker_url": "memory://", "result_backend": "cache+memory://",
            "broker_transport_options": {"polling_interval": 0.05},  # not a second a message
            "task_cls": "celery_tuning:TunedTask",
            "tuning_circuit_breakers": {"payments": {"fail_max": 1, "reset_timeout": 60}}}


@pytest.fixture(scope="session")
def celery_worker_parameters():
    return {"perform_ping_check": False}


@pytest.fixture(scope="session")
def celery_session_app(celery_session_app):
    celery_tuning.install(celery_session_app)
    return celery_session_app


@pytest.fixture(scope="session")
def celery_includes():
    return ["jobs"]
'''

SESSION_JOBS = '''
from celery import shared_task
from celery_tuning import TunedTask, circuit_breaker, debounce, rate_limit
from celery_tuning.integration.deferral import deferrals_of

RUNS = []


@shared_task(name="jobs.paced", base=TunedTask, bind=True)
@rate_limit("4/s", burst=1, on_limit="defer")
def paced(self, n):
    RUNS.append(("paced", n))
    return [n, deferrals_of(self.request)]


@shared_task(name="jobs.reindex", base=TunedTask)
@debounce(0.2)
def reindex(doc):
    RUNS.append(("reindex", doc))
    return doc


@shared_task(name="jobs.charge", base=TunedTask)
@circuit_breaker("payments", on_open="fail")
def charge(n):
    return n
'''

# The session worker starts (and its parking mover with it) before each test's tuning_memory puts the
# app on new stores: the mover must publish from the stores the producers park in now.
TEST_SESSION = '''
import pytest
from celery_tuning import CircuitOpen
from jobs import RUNS, charge, paced, reindex


@pytest.fixture(autouse=True)
def _runs():
    RUNS.clear()


def _parked_and_published():
    first, second = paced.delay(1), paced.delay(2)
    # One of them found the bucket empty: parked once, then published by the mover.
    answers = [first.get(timeout=10, interval=0.05), second.get(timeout=10, interval=0.05)]
    assert sorted(deferrals for _, deferrals in answers) == [0, 1]


def _debounced():
    first, second = reindex.delay("a"), reindex.delay("b")
    assert first.id == second.id
    assert first.get(timeout=10, interval=0.05) == "b"
    assert RUNS == [("reindex", "b")]


def test_parked_call_under_tuning_memory(tuning_memory, celery_session_worker):
    _parked_and_published()


def test_debounced_call_under_tuning_memory(tuning_memory, celery_session_worker):
    _debounced()


def test_again_after_a_reset(tuning_memory, celery_session_worker):
    _parked_and_published()
    RUNS.clear()
    _debounced()


def test_plain_helpers_with_the_session_worker(tuning_helpers, celery_session_worker):
    """No tuning_memory: the app's own memory:// store (its broker is memory://), shared with the worker."""
    tuning_helpers.open_breaker(charge)
    with pytest.raises(CircuitOpen):
        charge.delay(1).get(timeout=10, interval=0.05)
    tuning_helpers.close_breaker(charge)
    assert charge.delay(2).get(timeout=10, interval=0.05) == 2
    _parked_and_published()
'''

# tuning_redis: an earlier test's L1 cache entry and breaker view must not answer for the flushed Redis.
TEST_REDIS_RESET = '''
import os

import pytest
from celery import Celery

import celery_tuning
from celery_tuning import CircuitOpen, cache_result, circuit_breaker

app = Celery("resets", broker="memory://", backend="cache+memory://", task_cls="celery_tuning:TunedTask")
app.conf.tuning_redis_url = os.environ["CELERY_TUNING_TEST_REDIS_URL"]
celery_tuning.install(app)
CALLS = []


@app.task(name="resets.price")
@cache_result(ttl=300)
def price(sku):
    CALLS.append(sku)
    return len(sku)


@app.task(name="resets.charge")
@circuit_breaker("payments", fail_max=1, reset_timeout=300, on_open="fail")
def charge(n):
    CALLS.append(n)
    return n


@pytest.fixture(autouse=True)
def eager():
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    CALLS.clear()
    yield
    app.conf.task_always_eager = False


def test_a_seeds_and_opens(tuning_redis, tuning_helpers):
    assert app.conf.tuning_redis_url == tuning_redis
    tuning_helpers.seed_cache(price, 99, "abc")
    assert price.delay("abc").get() == 99
    tuning_helpers.open_breaker(charge)
    with pytest.raises(CircuitOpen):
        charge.delay(1).get()
    assert CALLS == []


def test_b_starts_afresh(tuning_redis):
    assert price.delay("abc").get() == 3  # the flushed Redis has no entry: no L1 answer either
    assert charge.delay(2).get() == 2  # the breaker is closed in Redis: no cached open view
    assert CALLS == ["abc", 2]
'''


def _path_without_redis() -> str:
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not os.path.exists(os.path.join(d, "redis-server"))]
    keep.insert(0, os.path.dirname(sys.executable))
    return os.pathsep.join(keep)


def _write(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(textwrap.dedent(APP).format(closed=free_port()))
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_eager.py").write_text(TEST_EAGER)
    (tmp_path / "test_worker.py").write_text(TEST_WORKER)


def test_sample_project_passes_on_the_plugin_alone_without_redis(tmp_path):
    _write(tmp_path)
    env = dict(os.environ, PATH=_path_without_redis(), PYTHONPATH=str(tmp_path))
    env.pop("CELERY_TUNING_TEST_REDIS_URL", None)
    assert shutil.which("redis-server", path=env["PATH"]) is None
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                           "ignore::DeprecationWarning", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "7 passed" in proc.stdout, proc.stdout[-3000:]


def test_tuning_check_says_memory_is_one_process_only(tmp_path):
    (tmp_path / "mem.py").write_text(
        "from celery import Celery\nimport celery_tuning\n"
        "app = Celery('mem', broker='memory://')\napp.conf.tuning_rate_limits = {'a': '1/s'}\n"
        "celery_tuning.install(app)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "mem", "tuning", "check"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "memory://" in proc.stdout and "this process only" in proc.stdout, proc.stdout


def _run_project(path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                           "ignore::DeprecationWarning", str(path)], cwd=path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_session_worker_publishes_parked_and_debounced_calls_of_each_test(tmp_path):
    """celery_session_worker starts before a test's tuning_memory: its parking mover (and the mover's
    @debounce pass) follow the stores the test's producers use, every round."""
    (tmp_path / "conftest.py").write_text(SESSION_CONFTEST)
    (tmp_path / "jobs.py").write_text(SESSION_JOBS)
    (tmp_path / "test_session.py").write_text(TEST_SESSION)
    env = dict(os.environ, PATH=_path_without_redis(), PYTHONPATH=str(tmp_path))
    env.pop("CELERY_TUNING_TEST_REDIS_URL", None)
    proc = _run_project(tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "4 passed" in proc.stdout, proc.stdout[-3000:]


def test_tuning_redis_resets_what_the_process_kept(tmp_path, redis_clean):
    (tmp_path / "test_resets.py").write_text(TEST_REDIS_RESET)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), CELERY_TUNING_TEST_REDIS_URL=redis_clean.db_url(3))
    proc = _run_project(tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout, proc.stdout[-3000:]
