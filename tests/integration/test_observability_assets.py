"""docs/prometheus-alerts.yml and docs/grafana-dashboard.json against real promtool and Prometheus."""

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from celery_tuning.testing import free_port
from tests.support.apps import run_producer, worker_env
from tests.support.workers import ROOT, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOCS = ROOT / "docs"
NEEDS_PROMETHEUS = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="Prometheus is not installed (Debian package 'prometheus'; .ci/run installs it)",
)


@NEEDS_PROMETHEUS
def test_alert_rules_pass_promtool():
    out = subprocess.run(["promtool", "check", "rules", str(DOCS / "prometheus-alerts.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout


def dashboard_queries():
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dash["panels"] for t in panel["targets"]]


def query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


@NEEDS_PROMETHEUS
def test_real_prometheus_scrapes_a_worker_and_every_dashboard_query_runs(redis_clean):
    metrics_port, prom_port = free_port(), free_port()
    env = {**worker_env(redis_clean), "TEST_METRICS_PORT": str(metrics_port)}
    worker = WorkerProcess("tests.apps.metered:app", env, pool="prefork", concurrency=2)
    workdir = Path(tempfile.mkdtemp(prefix="tuning-prom-"))
    (workdir / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{DOCS / 'prometheus-alerts.yml'}']\n"
        "scrape_configs:\n"
        f"  - job_name: celery\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    prom = None
    try:
        worker.start()
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run_producer("from tests.apps.metered import work, too_slow\n"
                     "[work.delay(i).get(timeout=30) for i in range(10)]\n"
                     "too_slow.delay().get(timeout=30)\n", redis_clean)
        deadline = time.time() + 60
        result = []
        while time.time() < deadline:
            time.sleep(1)
            try:
                answer = query(prom_port, "sum(celery_tuning_task_queue_wait_seconds_count)")
            except OSError:
                continue
            result = answer["data"]["result"]
            if result and float(result[0]["value"][1]) >= 11:
                break
        assert result and float(result[0]["value"][1]) >= 11, "Prometheus never scraped the worker's tasks"
        for expr in dashboard_queries():
            answer = query(prom_port, expr)
            assert answer["status"] == "success", (expr, answer)
        depth = query(prom_port, "max by (queue) (celery_tuning_queue_depth)")["data"]["result"]
        assert [(r["metric"]["queue"], r["value"][1]) for r in depth] == [("celery", "0")], depth
        # rate() needs two scrapes that saw tasks: run more and give it a few scrapes
        run_producer("from tests.apps.metered import work\n[work.delay(i).get(timeout=30) for i in range(10)]\n",
                     redis_clean)
        p95 = []
        for _ in range(20):
            time.sleep(1)
            p95 = query(prom_port, dashboard_queries()[1])["data"]["result"]
            if p95 and p95[0]["value"][1] not in ("NaN", "+Inf"):
                break
        assert p95 and 0 <= float(p95[0]["value"][1]) < 5, p95
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        worker.close()
        shutil.rmtree(workdir, ignore_errors=True)
