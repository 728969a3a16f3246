"""An app with the Prometheus endpoint on, queues bound to their own exchanges, SLAs by queue, a
rate-limited task and a task that SIGKILLs its own pool process (URLs from the environment).

``TEST_ROUTE_SUFFIX`` makes the queue and exchange names unique (RabbitMQ is shared between
tests); ``TEST_QY_KEY`` is the routing key queue ``qy`` binds (``rk.x`` binds it beside ``qx``).
"""

from __future__ import annotations

import os
import signal
import time

from celery import Celery
from kombu import Exchange, Queue

import celery_tuning
from celery_tuning import rate_limit

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
SUFFIX = os.environ.get("TEST_ROUTE_SUFFIX", "")
QX, QY, QT = f"qx{SUFFIX}", f"qy{SUFFIX}", f"qt{SUFFIX}"
DIRECT = Exchange(f"tx{SUFFIX}", type="direct")
TOPIC = Exchange(f"tt{SUFFIX}", type="topic")

app = Celery("tests_observed", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=os.environ.get("TEST_TUNING_URL", URL),
    tuning_metrics_port=int(os.environ["TEST_METRICS_PORT"]) if os.environ.get("TEST_METRICS_PORT") else None,
    tuning_sla={QX: {"critical": 0.1, "on": "run"}, QY: {"warning": 0.1, "on": "run"},
                QT: {"critical": 0.1, "on": "run"}},
    tuning_rate_limits={"trickle": {"rate": "1/s", "burst": 1}},
    tuning_defer_via="countdown",
    task_queues=[Queue(QX, DIRECT, routing_key="rk.x"),
                 Queue(QY, DIRECT, routing_key=os.environ.get("TEST_QY_KEY", "rk.y")),
                 Queue(QT, TOPIC, routing_key="orders.#")],
    task_default_queue=QX,
    task_default_exchange=DIRECT.name,
    task_default_routing_key="rk.x",
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
celery_tuning.install(app)


@app.task
def slow(seconds=0.2):
    """Over every queue's 0.1 s run-time threshold."""
    time.sleep(seconds)
    return seconds


@app.task
def quick(i):
    return i


@app.task
def killed(seconds=0.3):
    """Runs ``seconds`` and then SIGKILLs its own pool process: the main process sees WorkerLostError."""
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
@rate_limit("trickle", on_limit="defer")
def trickle(i):
    """Deferred (countdown) when over 1/s: a deferred attempt is no SLA check, its final run is."""
    return i


@app.task(track_started=True)
def held(seconds=10.0):
    """Runs until revoked with terminate=True (its pool process gets SIGTERM)."""
    time.sleep(seconds)
