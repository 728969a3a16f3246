"""`celery -A proj tuning ...` through the real celery command and its entry point."""

import re
import subprocess
import sys

import pytest

from tests.support.workers import ROOT

pytestmark = pytest.mark.integration


def celery(*args, env):
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.basic:app", "tuning", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env)


def make_env(tuning_url, monkeypatch_env=None):
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "TEST_BROKER_URL": tuning_url,
            "TEST_TUNING_URL": tuning_url, "TEST_BACKEND_URL": tuning_url}


def test_check_ok(redis_clean):
    out = celery("check", env=make_env(redis_clean.db_url(1)))
    assert out.returncode == 0, out.stderr
    assert "settings: ok" in out.stdout
    assert "lua: scripts load" in out.stdout


def test_check_unreachable_redis_redacts_password(fault_redis):
    url = f"redis://:hunter2@127.0.0.1:{fault_redis.port}/1"
    fault_redis.stop()
    out = celery("check", env=make_env(url))
    assert out.returncode == 1
    assert "unreachable" in out.stderr
    assert "hunter2" not in out.stdout + out.stderr


def test_status_shows_sources_and_redacted_url(redis_clean):
    url = redis_clean.db_url(1).replace("redis://", "redis://:pw123@")
    env = make_env(redis_clean.db_url(1))
    env["TEST_TUNING_URL"] = url
    out = celery("status", env=env)
    assert out.returncode == 0, out.stderr
    assert "tuning_sla" in out.stdout and "(config)" in out.stdout
    assert re.search(r"^tuning_key_prefix +'tuning'  \(default\)$", out.stdout, re.M)
    assert "pw123" not in out.stdout


def test_listed_in_celery_help():
    out = subprocess.run([sys.executable, "-m", "celery", "--help"], capture_output=True, text=True, timeout=60)
    assert "tuning" in out.stdout


def limited_env(redis_server):
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "TEST_BROKER_URL": redis_server.db_url(0),
            "TEST_TUNING_URL": redis_server.db_url(1)}


def limit_cmd(*args, env):
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.limited:app", "tuning", "limit", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env)


def test_limit_set_show_reset_changes_the_shared_rate(redis_clean):
    from celery import Celery

    from celery_tuning.integration.registry import limiter_for
    from celery_tuning.integration.runtime import runtime_for

    env = limited_env(redis_clean)
    out = limit_cmd("show", "shared", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "shared: configured 10/s burst 2; effective 10/s burst 2; tokens now 2"

    out = limit_cmd("set", "shared", "1/m", "--burst", "1", env=env)
    assert out.returncode == 0, out.stderr
    # a worker process that never restarted sees the new rate on its next acquire
    app = Celery("observer", set_as_current=False)
    app.conf.update(tuning_redis_url=redis_clean.db_url(1), tuning_rate_limits={"shared": {"rate": "10/s", "burst": 2}})
    lim = limiter_for(runtime_for(app), "shared")
    assert lim.try_acquire()
    refused = lim.decide()
    assert not refused.allowed and refused.wait > 50
    out = limit_cmd("show", "shared", env=env)
    assert "(override)" in out.stdout and "tokens now 0" in out.stdout

    out = limit_cmd("reset", "shared", env=env)
    assert out.returncode == 0 and "back to the configured 10/s burst 2" in out.stdout
    assert lim.try_acquire() and lim.try_acquire()


def test_limit_show_counts_the_adaptive_factor(redis_clean):
    """An adaptive throttle halves the shared rate: show says 5/s, and the tokens the store sees."""
    from celery_tuning.policy.rates import parse_rate
    from celery_tuning.ratelimit import GcraLimiter
    from celery_tuning.storage.gcra import AdaptiveSpec, RedisGcraStore
    from celery_tuning.storage.redis import RedisConnector

    env = limited_env(redis_clean)
    store = RedisGcraStore(RedisConnector(redis_clean.db_url(1)))
    # recovery never starts, so the factor (and the line) stays put while the command runs
    lim = GcraLimiter("shared", parse_rate("10/s"), 2, store=store,
                      adaptive=AdaptiveSpec(recovery_seconds=float("inf")))
    lim.throttle(600)
    out = limit_cmd("show", "shared", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("shared: configured 10/s burst 2; effective 5/s burst 2 (adaptive factor 0.50); "
                                  "tokens now 0")


def test_limit_reset_clears_one_key_when_asked(redis_clean):
    """Plain reset clears the override and the shared bucket; --key clears that key's bucket and only it."""
    from celery_tuning.policy.rates import parse_rate
    from celery_tuning.ratelimit import GcraLimiter
    from celery_tuning.storage.gcra import RedisGcraStore
    from celery_tuning.storage.redis import RedisConnector

    env = limited_env(redis_clean)
    lim = GcraLimiter("shared", parse_rate("10/s"), 2, store=RedisGcraStore(RedisConnector(redis_clean.db_url(1))))
    for tenant in ("t1", "t2"):
        lim.throttle(600, key=tenant)
    assert limit_cmd("set", "shared", "1/m", env=env).returncode == 0
    out = limit_cmd("show", "shared", "--key", "t1", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("shared (key 't1'): configured 10/s burst 2; effective 0.01667/s burst 2 (override); "
                                  "tokens now 0")

    out = limit_cmd("reset", "shared", env=env)
    assert out.returncode == 0, out.stderr
    assert not lim.decide(key="t1").allowed, "per-key buckets are left to refill on their own"

    limit_reset = limit_cmd("reset", "shared", "--key", "t1", env=env)
    assert limit_reset.returncode == 0, limit_reset.stderr
    assert limit_reset.stdout.strip() == "shared (key 't1'): bucket cleared (the limiter's rate is unchanged)"
    assert lim.decide(key="t1").allowed
    assert not lim.decide(key="t2").allowed


def test_limit_errors_name_the_problem(redis_clean):
    env = limited_env(redis_clean)
    out = limit_cmd("set", "shared", "10/x", env=env)
    assert out.returncode != 0 and "'10/x' is not a rate" in out.stderr
    out = limit_cmd("show", "nope", env=env)
    assert out.returncode != 0 and "no such limiter 'nope' in tuning_rate_limits" in out.stderr


def breaker_cmd(*args, env):
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.limited:app", "tuning", "breaker", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env)


def test_breaker_show_open_close_reset(redis_clean):
    from celery import Celery

    from celery_tuning.integration.registry import breaker_for
    from celery_tuning.integration.runtime import runtime_for

    env = limited_env(redis_clean)
    out = breaker_cmd("show", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "payments: closed (failures 0/3, reset_timeout 30s)"
    out = breaker_cmd("open", "payments", env=env)
    assert out.returncode == 0 and "payments: open" in out.stdout and "trial allowed in" in out.stdout
    app = Celery("cli-observer", set_as_current=False)
    app.conf.update(tuning_redis_url=redis_clean.db_url(1), tuning_circuit_breakers={"payments": {"fail_max": 3}})
    assert breaker_for(runtime_for(app), "payments").refresh().state == "open"
    out = breaker_cmd("close", "payments", env=env)
    assert out.returncode == 0 and out.stdout.startswith("payments: closed")
    out = breaker_cmd("reset", "payments", env=env)
    assert out.returncode == 0
    out = breaker_cmd("show", "nope", env=env)
    assert out.returncode != 0 and "no such breaker 'nope' in tuning_circuit_breakers" in out.stderr


def test_cache_stats_and_clear(redis_clean):
    env = limited_env(redis_clean)
    code = "from tests.apps.cached import embed\nembed.apply(('a',)).get(); embed.apply(('b',)).get()\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                         env=env)
    assert out.returncode == 0, out.stderr

    def cache_cmd(*args):
        return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.cached:app", "tuning", "cache",
                               *args], capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env)

    out = cache_cmd("stats", "tests.apps.cached.embed")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("tests.apps.cached.embed: 2 entries in Redis (version 1, generation ")
    generation = int(out.stdout.split("generation ")[1].split(",")[0].rstrip(")"))
    out = cache_cmd("clear", "tests.apps.cached.embed")
    assert out.returncode == 0 and f"cleared (generation {generation + 1})" in out.stdout
    assert cache_cmd("stats", "tests.apps.cached.embed").stdout.startswith("tests.apps.cached.embed: 0 entries")
    out = cache_cmd("stats", "no.such.task")
    assert out.returncode != 0 and "no task named 'no.such.task'" in out.stderr


def test_cli_reads_no_private_attributes():
    """The CLI works through public, documented APIs only (no obj._name reads, no raw GCRA arithmetic)."""
    import ast
    from pathlib import Path

    import celery_tuning.integration.cli as cli

    tree = ast.parse(Path(cli.__file__).read_text())
    private = sorted({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and node.attr.startswith("_") and not node.attr.startswith("__")})
    assert private == [], private
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert "interval_us" not in imported


def parked_cmd(*args, env, input=None):
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.parked:app", "tuning", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env, input=input)


def test_parked_show_release_and_purge(redis_clean):
    from celery_tuning.storage.park import RedisParkStore, Spot
    from celery_tuning.storage.redis import get_connector

    env = limited_env(redis_clean)
    out = parked_cmd("parked", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no parked tasks"
    store = RedisParkStore(get_connector(redis_clean.db_url(1)), prefix="tuning")
    paced, solo = Spot("rate_limit", "paced"), Spot("concurrency", "solo")
    for i in range(3):
        store.park(paced, f"t{i}:1", "{}", 60_000_000)
    store.park(solo, "w:1", "{}", None)
    out = parked_cmd("parked", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "concurrency:solo: due 0, waiting 1, claimed 0, next due in -, oldest " + lines[0].split()[-1]
    # Due in 60 s less the CLI's start-up (about 1.2 s here alone, more on a loaded host).
    assert re.match(r"rate_limit:paced: due 3, waiting 0, claimed 0, next due in (5[5-9]|60)\.\ds, oldest -$",
                    lines[1]), lines
    out = parked_cmd("parked", "--json", env=env)
    assert {r["name"]: r["due"] + r["waiting"] for r in __import__("json").loads(out.stdout)} == {"paced": 3, "solo": 1}

    out = parked_cmd("parked", "release", "paced", env=env)
    assert out.returncode == 0 and out.stdout.strip() == "rate_limit:paced: released 3", out.stderr
    assert store.snapshot(paced).next_due_us <= store.now_us()

    out = parked_cmd("parked", "purge", "solo", env=env, input="n\n")
    assert out.returncode != 0 and "Aborted" in out.stderr
    assert store.snapshot(solo).waiting == 1
    out = parked_cmd("parked", "purge", "solo", "--reason", "concurrency", "--yes", env=env)
    assert out.returncode == 0 and out.stdout.strip() == "concurrency:solo: purged 1", out.stderr
    assert store.snapshot(solo).waiting == 0

    out = parked_cmd("parked", "release", "nothing-here", env=env)
    assert out.returncode != 0 and "no parked tasks named 'nothing-here'" in out.stderr


def test_parked_shows_releases_and_purges_a_per_key_limits_keys_under_the_limit(redis_clean):
    """Review finding: `parked release/purge LIMIT` missed the spots of its caller keys, and
    `parked` listed each key's spot. Now one line per limit, and no tenant (nor digest) shown."""
    import json

    from celery_tuning.storage.keys import key_digest, keyed_spot_name
    from celery_tuning.storage.park import RedisParkStore, Spot
    from celery_tuning.storage.redis import get_connector

    env = limited_env(redis_clean)
    store = RedisParkStore(get_connector(redis_clean.db_url(1)), prefix="tuning")
    solo = Spot("concurrency", "solo")
    tenants = [Spot("concurrency", keyed_spot_name("solo", key_digest(t))) for t in ("acme", "globex", "initech")]
    store.park(solo, "w:1", "{}", None)
    for i, where in enumerate(tenants):
        for j in range(i + 1):
            store.park(where, f"k{i}-{j}:1", "{}", None)
    out = parked_cmd("parked", env=env)
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.splitlines()
    assert line.startswith("concurrency:solo: due 0, waiting 7, claimed 0, next due in -, oldest "), line
    assert line.endswith(" (over 3 caller keys)"), line
    out = parked_cmd("parked", "--json", env=env)
    [row] = json.loads(out.stdout)
    assert (row["name"], row["waiting"], row["keys"]) == ("solo", 7, 3)
    for where in tenants:
        assert where.name.split(":k:")[1] not in out.stdout

    out = parked_cmd("parked", "release", "solo", env=env)
    assert out.returncode == 0 and out.stdout.strip() == "concurrency:solo: released 7 (over 3 caller keys)", out
    assert [store.snapshot(where).due for where in tenants] == [1, 2, 3]
    out = parked_cmd("parked", "purge", "solo", "--yes", env=env)
    assert out.returncode == 0 and out.stdout.strip() == "concurrency:solo: purged 7 (over 3 caller keys)", out
    assert sum(store.snapshot(where).due for where in [solo, *tenants]) == 0
    assert store.spots() == [solo]  # the keys' spots left the index with their last entry


@pytest.mark.parametrize(("args", "expected"), [
    ((), "WARNING parking: the tuning Redis has neither AOF"),
    (("--appendonly", "yes"), "parking: the tuning Redis persists with AOF"),
    (("--save", "900 1"), "parking: the tuning Redis persists with RDB"),
    (("--rename-command", "CONFIG", ""), "CONFIG GET is disabled"),
])
def test_check_warns_when_parked_tasks_would_live_on_a_redis_without_persistence(args, expected):
    from celery_tuning.testing import RedisServer

    server = RedisServer(extra_args=list(args)).start()
    try:
        out = parked_cmd("check", env=limited_env(server))
    finally:
        server.close()
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout + out.stderr


def test_status_shows_breakers_as_the_dicts_operators_configured(redis_clean):
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.limited:app", "tuning", "status", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=limited_env(redis_clean))
    assert out.returncode == 0, out.stderr
    import json

    shown = json.loads(out.stdout)["tuning_circuit_breakers"]["value"]
    assert shown.startswith("{'payments': {'fail_max': 3, 'reset_timeout': 30.0, ") and "BreakerSpec" not in shown


# -- profiles: `tuning check` refuses what a worker start refuses (issue #21) ------------------

#: An app whose Celery config comes from the environment (TEST_CONF: JSON; TEST_TASK_QUEUES: names).
CONFIGURED_APP = '''
import json, os
from celery import Celery
from kombu import Queue
import celery_tuning
app = Celery("configured", broker=os.environ["TEST_BROKER_URL"])
app.conf.update(tuning_redis_url=os.environ["TEST_TUNING_URL"], broker_connection_retry_on_startup=True,
                **json.loads(os.environ.get("TEST_CONF", "{}")))
if os.environ.get("TEST_TASK_QUEUES"):
    app.conf.task_queues = [Queue(name) for name in os.environ["TEST_TASK_QUEUES"].split(",")]
celery_tuning.install(app)
'''


@pytest.fixture()
def configured(tmp_path, redis_clean):
    """(run `celery -A configured:app ARGS` with a config, its environment) for a module in tmp_path."""
    import json
    import os

    (tmp_path / "configured.py").write_text(CONFIGURED_APP)

    def env_for(conf, **extra):
        return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "TEST_BROKER_URL": redis_clean.db_url(0),
                "TEST_TUNING_URL": redis_clean.db_url(1), "TEST_CONF": json.dumps(conf), **extra}

    def run(conf, *args, **extra):
        return subprocess.run([sys.executable, "-m", "celery", "-A", "configured:app", *args], capture_output=True,
                              text=True, timeout=60, cwd=str(tmp_path), env=env_for(conf, **extra))

    return run, env_for


@pytest.mark.parametrize(("conf", "message"), [
    ({"tuning_queue_profiles": {"emb": "nope"}},
     "tuning_queue_profiles['emb']: unknown profile 'nope'; known: cpu, io, mixed"),
    ({"tuning_queue_profiles": {"emb": "top"}, "tuning_profiles": {"top": {"base": "mid"}, "mid": {"base": "nope"}}},
     "tuning_profiles['mid']['base']: unknown profile 'nope'"),
    ({"tuning_queue_profiles": {"emb": "a"}, "tuning_profiles": {"a": {"base": "b"}, "b": {"base": "a"}}},
     "tuning_profiles: the bases of these profiles form a cycle (a -> b -> a)"),
    ({"tuning_queue_profiles": {"emb": "x"}, "tuning_profiles": {"x": {"base": "x"}}},
     "tuning_profiles['x']['base']: 'x' names the profile itself and there is no preset of that name"),
])
def test_check_refuses_every_profile_error_a_worker_start_refuses(configured, conf, message):
    from tests.support.workers import WorkerProcess

    run, env_for = configured
    out = run(conf, "tuning", "check")
    assert out.returncode == 1, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "settings: ok" not in out.stdout
    # the worker (here one consuming only a queue with no profile) refuses with the same message
    worker = WorkerProcess("configured:app", env_for(conf), pool="solo", queues="unmapped")
    try:
        with pytest.raises(RuntimeError, match="worker exited") as info:
            worker.start(timeout=30)
    finally:
        worker.close()
    assert message in str(info.value)


def test_a_profile_extending_the_preset_of_its_own_name(configured):
    conf = {"tuning_queue_profiles": {"emb": "cpu"}, "tuning_profiles": {"cpu": {"base": "cpu", "concurrency": 3}}}
    out = configured[0](conf, "tuning", "check")
    assert out.returncode == 0 and "settings: ok" in out.stdout, out.stdout + out.stderr
    out = configured[0](conf, "tuning", "profiles")
    assert out.returncode == 0, out.stderr
    assert ("emb: profile cpu (config): pool prefork, concurrency 3, prefetch_multiplier 1, acks_late True, "
            "max_tasks_per_child 1000;") in out.stdout


def test_check_and_profiles_say_what_a_worker_without_q_gets(configured):
    conf = {"tuning_queue_profiles": {"emb": "cpu", "webhooks": "io"}}
    out = configured[0](conf, "tuning", "check", TEST_TASK_QUEUES="emb,webhooks")
    assert out.returncode == 0 and "settings: ok" in out.stdout, out.stdout + out.stderr
    assert ("WARNING profiles: a worker started without -Q consumes emb, webhooks and refuses to start: "
            "tuning_queue_profiles: this worker's queues map to different profiles (emb -> cpu, webhooks -> io)"
            ) in out.stderr
    out = configured[0](conf, "tuning", "profiles", TEST_TASK_QUEUES="webhooks,other")
    assert out.returncode == 0, out.stderr
    assert "a worker without -Q consumes webhooks, other: profile io" in out.stdout
    out = configured[0]({"tuning_queue_profiles": {"emb": "nope"}}, "tuning", "profiles")
    assert out.returncode == 1 and "emb: unknown profile 'nope'; known: cpu, io, mixed" in out.stdout


# -- status / advise against a metrics URL that does not serve metrics (issue #21) ------------


@pytest.fixture(scope="module")
def garbage_url():
    """An HTTP server on loopback serving an HTML page where metrics should be."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html><body><h1>Welcome to nginx!</h1>\n<p>Not metrics.</p></body></html>\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def closed_port_url():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"


@pytest.mark.parametrize("command", ["status", "advise"])
@pytest.mark.parametrize(("case", "expected"), [
    # The parser's own words after "ValueError: " differ between prometheus-client releases.
    ("garbage", "did not serve Prometheus metrics: not Prometheus text (ValueError: "),
    ("closed", "unreachable (<urlopen error"),
    ("no scheme", "metrics URL '127.0.0.1:9/metrics' is not an http(s) URL"),
    ("bad port", "metrics URL 'http://127.0.0.1:notaport/metrics' is not a valid URL"),
    ("credentials", "metrics endpoint http://admin:***@127.0.0.1:"),
])
def test_metrics_url_problems_are_one_line_and_a_failure(garbage_url, command, case, expected):
    url = {"garbage": garbage_url, "closed": closed_port_url(), "no scheme": "127.0.0.1:9/metrics",
           "bad port": "http://127.0.0.1:notaport/metrics",
           "credentials": closed_port_url().replace("http://", "http://admin:s3cretPW@")}[case]
    out = celery(command, "--metrics-url", url, env=make_env("redis://127.0.0.1:9/1"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("Error: ") and expected in out.stderr, out.stderr
    assert "s3cretPW" not in out.stdout + out.stderr
