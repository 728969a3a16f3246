"""Profiles applied to real `celery worker` subprocesses: -Q pick-up, flags win, scale, conflicts."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.support.apps import worker_env
from tests.support.workers import ROOT, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def started(redis_server, queues, extra=(), env=None):
    worker = WorkerProcess("tests.apps.profiled:app", {**worker_env(redis_server), **(env or {})},
                           pool="solo", queues=queues, extra=list(extra))
    # the profile must be free to choose the pool: drop the harness's -P/-c defaults
    args = worker.args
    for flag in ("-P", "-c"):
        i = args.index(flag)
        del args[i:i + 2]
    return worker


def banner_concurrency(output):
    match = re.search(r"concurrency: +(\d+) \((\w+)\)", output)
    assert match, output[-2000:]
    return int(match.group(1)), match.group(2)


def run_worker(worker):
    try:
        worker.start()
        return worker.output()
    finally:
        worker.close()


def test_queue_picks_its_profile(redis_clean):
    out = run_worker(started(redis_clean, "webhooks"))
    assert banner_concurrency(out) == (32, "thread")
    assert "celery-tuning profile 'io' for queues webhooks (chosen by tuning_queue_profiles[webhooks])" in out


def test_explicit_flags_win_and_scale_multiplies(redis_clean):
    out = run_worker(started(redis_clean, "webhooks", extra=["-c", "5"]))
    assert banner_concurrency(out) == (5, "thread")
    assert "concurrency=<flag>" in out
    out = run_worker(started(redis_clean, "small", env={"CELERY_TUNING_CONCURRENCY_SCALE": "2"}))
    assert banner_concurrency(out) == (6, "thread")
    assert "x CELERY_TUNING_CONCURRENCY_SCALE=2" in out


def test_tuning_profile_option_overrides_the_mapping(redis_clean):
    out = run_worker(started(redis_clean, "webhooks", extra=["--tuning-profile", "tiny"]))
    assert banner_concurrency(out) == (3, "thread")


def test_conflicting_queues_are_a_startup_error(redis_clean):
    worker = started(redis_clean, "webhooks,embeddings")
    try:
        with pytest.raises(RuntimeError) as info:
            worker.start(timeout=30)
    finally:
        worker.close()
    assert "embeddings -> cpu, webhooks -> io" in str(info.value)
    assert "--tuning-profile" in str(info.value)


def test_profiles_command(redis_clean):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **worker_env(redis_clean)}
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.profiled:app", "tuning", "profiles"],
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env)
    assert out.returncode == 0, out.stderr
    assert "webhooks: profile io (preset): pool threads, concurrency 32, prefetch_multiplier 4" in out.stdout
    assert "small: profile tiny (config): pool threads, concurrency 3, prefetch_multiplier 2" in out.stdout
    assert "celery: no profile" in out.stdout


def test_profiles_can_be_turned_off_per_worker(redis_clean):
    out = run_worker(started(redis_clean, "webhooks", env={"CELERY_TUNING_PROFILES": "0"}))
    assert "celery-tuning profile" not in out
    assert banner_concurrency(out)[1] == "prefork"  # Celery's own default, not the io profile's threads


def inspect_stats(redis_server, worker):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **worker_env(redis_server)}
    # naming the worker makes inspect return on its reply instead of waiting out the timeout for others
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.profiled:app", "inspect", "stats",
                          "--json", "-t", "5", "-d", f"w1@{socket.gethostname()}"],
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT), env=env)
    assert out.returncode == 0, out.stdout + out.stderr + worker.output()[-2000:]
    (stats,) = json.loads(out.stdout).values()
    return stats


def stats_of(redis_server, queues, extra=()):
    worker = started(redis_server, queues, extra)
    try:
        worker.start()
        return inspect_stats(redis_server, worker), worker.output()
    finally:
        worker.close()


def test_inspect_stats_show_the_profile_and_the_flag_winning(redis_clean):
    stats, _ = stats_of(redis_clean, "q")
    assert stats["pool"]["max-concurrency"] == 3
    assert stats["prefetch_count"] == 6
    assert "prefork" in stats["pool"]["implementation"]
    stats, out = stats_of(redis_clean, "q", extra=["-c", "2"])
    assert stats["pool"]["max-concurrency"] == 2
    assert stats["prefetch_count"] == 4  # the profile's prefetch multiplier still applies
    assert "concurrency=<flag>" in out


def test_profile_autoscale_reaches_celerys_autoscaler(redis_clean):
    stats, out = stats_of(redis_clean, "elastic")
    assert stats["autoscaler"]["max"] == 3 and stats["autoscaler"]["min"] == 1
    assert "concurrency: {min=1, max=3} (prefork)" in out
    assert "autoscale=(3, 1) (profile elastic)" in out
    stats, out = stats_of(redis_clean, "elastic", extra=["--autoscale", "4,2"])
    assert stats["autoscaler"]["max"] == 4 and stats["autoscaler"]["min"] == 2
    assert "autoscale=<flag>" in out


#: An app declaring task_queues (TEST_TASK_QUEUES) and mapping queues to profiles, for a worker without -Q.
QUEUES_APP = '''
import os
from celery import Celery
from kombu import Queue
import celery_tuning
app = Celery("declared", broker=os.environ["TEST_BROKER_URL"])
app.conf.update(tuning_redis_url=os.environ["TEST_TUNING_URL"], broker_connection_retry_on_startup=True,
                task_queues=[Queue(name) for name in os.environ["TEST_TASK_QUEUES"].split(",")],
                tuning_queue_profiles={"emb": "cpu", "webhooks": "io", "hooks2": "io"})
celery_tuning.install(app)
'''


def test_a_worker_without_q_takes_the_profile_of_task_queues(redis_clean, tmp_path):
    (tmp_path / "declared.py").write_text(QUEUES_APP)

    def worker(queues):
        env = {**worker_env(redis_clean), "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "TEST_TASK_QUEUES": queues}
        w = WorkerProcess("declared:app", env, pool="solo")
        for flag in ("-P", "-c"):  # the profile chooses the pool and concurrency
            i = w.args.index(flag)
            del w.args[i:i + 2]
        return w

    conflicting = worker("emb,webhooks")
    try:
        with pytest.raises(RuntimeError, match="worker exited") as info:
            conflicting.start(timeout=30)
    finally:
        conflicting.close()
    assert ("tuning_queue_profiles: this worker's queues map to different profiles (emb -> cpu, webhooks -> io); "
            "start one worker per profile or pass --tuning-profile NAME") in str(info.value)

    out = run_worker(worker("webhooks,hooks2,plain"))
    assert banner_concurrency(out) == (32, "thread")
    assert ("celery-tuning profile 'io' for queues webhooks,hooks2,plain "
            "(chosen by tuning_queue_profiles[hooks2, webhooks])") in out
