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
    assert double.delay(4).get(timeout=10) == 8
    assert double.delay(4).get(timeout=10) == 8
    assert calls == [4]


def test_import_time_app_in_a_worker(tuning_memory):
    from celery.contrib.testing.worker import start_worker
    from shop import app, charge

    with start_worker(app, perform_ping_check=False, shutdown_timeout=10):
        assert charge.delay(3).get(timeout=10) == 3
        tuning_memory.open_breaker(charge)
        with pytest.raises(Exception, match="payments"):
            charge.delay(4).get(timeout=10)
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
