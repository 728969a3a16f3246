"""The security review of docs/security.md, one test per point."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
import traceback
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings

from celery_tuning.testing import free_port
from celery_tuning.testing.redis_server import RedisServer
from tests.support.apps import worker_env
from tests.support.secrets import credential_urls, leaked
from tests.support.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.reliability

PACKAGE = ROOT / "celery_tuning"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle"}


def test_nothing_in_the_package_can_unpickle():
    """No module of ours imports a deserializer that runs code (data read from Redis is JSON/msgpack)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in UNSAFE_MODULES]
            if isinstance(node, ast.Attribute) and node.attr in ("load", "unsafe_load") and \
                    isinstance(node.value, ast.Name) and node.value.id == "yaml":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} yaml.{node.attr}")
    assert found == []


def run_cli(env, *args):
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.basic:app", "tuning", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env)


@pytest.mark.integration
@pytest.mark.slow
def test_a_password_in_the_tuning_url_never_reaches_logs_errors_or_the_cli(redis_clean):
    """The server has no password, so AUTH fails on every call: errors are logged, the secret never."""
    secret = "s3cret-Pa55"
    url = f"redis://:{secret}@127.0.0.1:{redis_clean.port}/1"
    env = {**worker_env(redis_clean), "TEST_TUNING_URL": url}
    worker = WorkerProcess("tests.apps.basic:app", env, pool="solo")
    try:
        worker.start()
        out = subprocess.run(
            [sys.executable, "-c", "from tests.apps.basic import slow\nprint(slow.delay(0.01).get(timeout=30))"],
            capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=worker.env)
        log = worker.output()
    finally:
        worker.close()
    cli = [run_cli(worker.env, "check"), run_cli(worker.env, "status"), run_cli(worker.env, "limit", "show")]
    everything = log + out.stdout + out.stderr + "".join(r.stdout + r.stderr for r in cli)
    assert "tuning Redis" in log  # the worker did report the failing store
    assert secret not in everything
    assert "redis://:***@127.0.0.1" in everything or "redis://:**@127.0.0.1" in everything


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # the formatter appends any traceback


def everything_shown_for(url: str) -> str:
    """Run, in this process, every path that logs, prints or raises with the tuning URL; all their text.

    Configuration errors, the connector's safe URL and reprs, the errors of a PING, a script and a GET,
    the worker-start step's log, and ``tuning check`` / ``status`` / ``status --json``.
    """
    from celery import Celery
    from click.testing import CliRunner

    from celery_tuning.errors import ConfigurationError, StorageError
    from celery_tuning.integration.bootsteps import TuningWorkerStep
    from celery_tuning.integration.cli import tuning
    from celery_tuning.integration.runtime import runtime_for

    app = Celery("secrets", broker="memory://", set_as_current=False)
    app.conf.update(tuning_redis_url=url, tuning_redis_connect_timeout=0.2, tuning_redis_socket_timeout=0.2)
    capture = _Capture()
    logger = logging.getLogger("celery_tuning")
    logger.addHandler(capture)
    # setLevel, not an assignment: loggers cache isEnabledFor() and only setLevel clears that cache
    # (an earlier test leaving 'celery_tuning' at ERROR kept INFO records out of the capture).
    level = logger.level
    logger.setLevel(logging.DEBUG)
    texts = []
    try:
        try:
            runtime = runtime_for(app)
            connector = runtime.connector
        except ConfigurationError as exc:
            texts.append(str(exc))
        else:
            texts += [connector.safe_url, repr(connector), repr(connector.target)]
            for call in (connector.ping, lambda: connector.evalsha("server_time", [], []),
                         lambda: connector.get("k")):
                try:
                    call()
                except StorageError as exc:
                    texts.append(str(exc))
            worker = SimpleNamespace(app=app)
            TuningWorkerStep(worker).start(worker)
        for args in (["check"], ["status"], ["status", "--json"]):
            result = CliRunner().invoke(tuning, args, obj=SimpleNamespace(app=app))
            # Before click 8.2 the runner mixes stderr into output and has no separate stderr.
            texts += [result.output] + ([result.stderr] if result.stderr_bytes is not None else [])
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                texts += traceback.format_exception(result.exception)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
    return "\n".join(texts + capture.lines)


@pytest.mark.integration
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=credential_urls(port=free_port()))
def test_fuzzed_passwords_never_reach_logs_errors_or_the_cli(case):
    """Every URL form and password (reserved characters, encoded or not) against a closed loopback port."""
    url, tokens = case
    shown = everything_shown_for(url)
    assert not leaked(tokens, shown), (url, shown)
    assert "***" in shown


@pytest.fixture()
def auth_redis():
    """A redis-server that requires a password holding every reserved URL character."""
    password = "Pw0@K:;/?#%&= Pw1+!$'()*,[]~K"
    server = RedisServer(extra_args=["--requirepass", password])
    server.client = lambda db=0: __import__("redis").Redis(  # type: ignore[method-assign]
        host="127.0.0.1", port=server.port, db=db, password=password, socket_timeout=2)
    server.start()
    try:
        yield server, password
    finally:
        server.close()


@pytest.mark.integration
def test_an_authenticated_redis_answers_every_credential_form_and_nothing_shows_the_password(auth_redis):
    """The URL forms work against a real password-protected server (so they are real credentials), and
    the worker-start log and the CLI, which print the URL on success, still hide the password."""
    from celery_tuning.storage.redis import RedisConnector

    server, password = auth_redis
    encoded = quote(password, safe="")
    tokens = ["Pw0", "Pw1"]
    urls = [f"redis://:{encoded}@127.0.0.1:{server.port}/1",
            f"redis://default:{encoded}@127.0.0.1:{server.port}/1",
            f"redis://127.0.0.1:{server.port}/1?password={encoded}",
            f"redis://127.0.0.1:{server.port}/1?username=default&password={encoded}",
            f"redis+cluster://127.0.0.1:{server.port}?password={encoded}".replace("redis+cluster", "redis")]
    for url in urls:
        connector = RedisConnector(url)
        assert connector.ping() > 0, url
        connector.close()
        shown = everything_shown_for(url)
        assert "answered in" in shown and "redis: redis://" in shown and " ok (" in shown, shown
        assert not leaked(tokens, shown), (url, shown)
    wrong = f"redis://:{quote('Pw0-wrong-Pw1', safe='')}@127.0.0.1:{server.port}/1"
    shown = everything_shown_for(wrong)
    assert "unreachable" in shown and not leaked(tokens, shown), shown


@pytest.mark.integration
@pytest.mark.slow
def test_a_real_worker_and_the_cli_on_a_password_protected_redis_never_show_the_password(auth_redis, redis_clean):
    """The worker logs the tuning URL at INFO when Redis answers; `tuning check` and `status` print it."""
    server, password = auth_redis
    url = f"redis://default:{quote(password, safe='')}@127.0.0.1:{server.port}/1?socket_keepalive=true"
    env = {**worker_env(redis_clean), "TEST_TUNING_URL": url}
    worker = WorkerProcess("tests.apps.basic:app", env, pool="solo")
    try:
        worker.start()
        out = subprocess.run(
            [sys.executable, "-c", "from tests.apps.basic import slow\nprint(slow.delay(0.01).get(timeout=30))"],
            capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=worker.env)
        log = worker.output()
    finally:
        worker.close()
    cli = [run_cli(worker.env, "check"), run_cli(worker.env, "status")]
    everything = log + out.stdout + out.stderr + "".join(r.stdout + r.stderr for r in cli)
    assert "answered in" in log, log  # the INFO line with the URL was written
    assert cli[0].returncode == 0, cli[0].stderr
    assert not leaked(["Pw0", "Pw1"], everything)
    assert "redis://default:***@127.0.0.1" in everything


LABELS = r"""
from prometheus_client import REGISTRY
from celery import Celery
import celery_tuning
from celery_tuning.integration import metrics as m
app = Celery("labels", set_as_current=False)
app.conf.update(tuning_redis_url=%(url)r, tuning_rate_limits={"api": {"rate": "1000000/s", "burst": 100000}})
celery_tuning.install(app)
m.connect_metric_receivers()
limiter = celery_tuning.limiter("api", app=app)
for i in range(1000):
    assert limiter.try_acquire(key=f"tenant-{i}:{{evil}}*")
values = {tuple(sorted(s.labels.items())) for f in REGISTRY.collect() for s in f.samples
          if s.name.startswith("celery_tuning_limiter")}
print(len(values), sorted(values)[0])
"""


@pytest.mark.integration
def test_per_key_limiter_keys_add_no_label_values_and_stay_in_their_namespace(redis_clean):
    code = LABELS % {"url": redis_clean.db_url(1)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(ROOT), env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    count, sample = out.stdout.split(" ", 1)
    assert int(count) == 1 and "'name', 'api'" in sample and "tenant" not in sample  # 1 series, no keys
    keys = [k.decode() for k in redis_clean.client(1).keys("*")]
    assert len(keys) >= 1000
    # every key sits under the limiter's own hash-tagged stem; the caller's text never appears
    strays = [k for k in keys if not re.fullmatch(r"tuning:rl:\{api\}:(conf|k:[0-9a-f]{16,64})", k)]
    assert strays == []
    assert not any("tenant" in k or "evil" in k for k in keys)


ENDPOINT = r"""
import json, os, urllib.request
from celery_tuning.integration.metrics import connect_metric_receivers, start_endpoint
connect_metric_receivers()
server = start_endpoint(0, "127.0.0.1")
port = server.server_port
bodies = {}
for path in ("/metrics", "/", "/admin", "/../../etc/passwd", "/metrics?name[]=x"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        bodies[path] = (r.headers.get("Content-Type"), r.read().decode())
print(json.dumps({"address": server.server_address[0], "bodies": bodies}))
"""


def test_the_endpoint_binds_the_configured_address_and_serves_only_metrics():
    out = subprocess.run([sys.executable, "-c", ENDPOINT], capture_output=True, text=True, timeout=60,
                         cwd=str(ROOT), env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    import json

    data = json.loads(out.stdout)
    assert data["address"] == "127.0.0.1"
    for path, (ctype, body) in data["bodies"].items():
        assert ctype.startswith("text/plain"), (path, ctype)
        lines = [line for line in body.splitlines() if line and not line.startswith("#")]
        assert all(line.startswith(("celery_tuning_", "python_", "process_")) for line in lines), (path, lines[:5])
        assert "root:" not in body


def test_the_metrics_address_setting_is_validated():
    from celery_tuning.conf import load_config
    from celery_tuning.errors import ConfigurationError

    assert load_config({"tuning_metrics_address": "127.0.0.1"}, environ={}).metrics_address == "127.0.0.1"
    assert load_config({}, environ={}).metrics_address == "0.0.0.0"
    with pytest.raises(ConfigurationError, match="tuning_metrics_address: 'example.com' is not valid"):
        load_config({"tuning_metrics_address": "example.com"}, environ={})


def test_security_doc_lists_each_point():
    text = (ROOT / "docs" / "security.md").read_text()
    for test in ("test_nothing_in_the_package_can_unpickle",
                 "test_a_password_in_the_tuning_url_never_reaches_logs_errors_or_the_cli",
                 "test_per_key_limiter_keys_add_no_label_values_and_stay_in_their_namespace",
                 "test_the_endpoint_binds_the_configured_address_and_serves_only_metrics"):
        assert test in text, test
