"""The ``CeleryTuningFairQueueStalled`` rule of docs/prometheus-alerts.yml, through ``promtool test rules``:
it fires for a queue whose calls wait while nothing is released, not for one a dispatcher drains."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.workers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool is not installed (Debian package 'prometheus')")

CASES = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'celery_tuning_fair_waiting{{queue="stuck",instance="w1"}}'
        values: '5x40'
      - series: 'celery_tuning_fair_waiting{{queue="busy",instance="w1"}}'
        values: '5x40'
      - series: 'celery_tuning_fair_released_total{{queue="busy",instance="w1"}}'
        values: '0+3x40'
      - series: 'celery_tuning_fair_waiting{{queue="drained",instance="w1"}}'
        values: '0x40'
    alert_rule_test:
      - eval_time: 8m
        alertname: CeleryTuningFairQueueStalled
        exp_alerts: []
      - eval_time: 30m
        alertname: CeleryTuningFairQueueStalled
        exp_alerts:
          - exp_labels: {{severity: warn, queue: stuck}}
            exp_annotations:
              summary: "@fair calls wait in queue stuck and none was released for 10 minutes"
              description: "5 calls wait for their turn in the tuning Redis. Check that a running worker
                consumes stuck and runs the parking mover (tuning_park_mover), and `celery -A proj tuning fair show`."
"""


def test_fair_queue_stalled_fires_for_the_queue_nothing_is_released_from():
    workdir = Path(tempfile.mkdtemp(prefix="tuning-promtool-"))
    try:
        cases = workdir / "fair_alert_test.yml"
        cases.write_text(CASES.format(rules=ROOT / "docs" / "prometheus-alerts.yml"))
        out = subprocess.run(["promtool", "test", "rules", str(cases)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
