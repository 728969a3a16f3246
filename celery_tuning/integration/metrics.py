"""Prometheus metrics fed by celery-tuning's events sink; one scrape endpoint per worker node.

prometheus-client decides once, when it is first imported, whether values live in per-process
files (multiprocess mode). Under prefork every pool child records into its own file and the
worker's main process serves the sum, so the directory must be set before anything imports
prometheus_client: :func:`prepare_multiprocess` does that from ``install()`` in a worker process,
and this module imports prometheus_client only inside functions.

The directory lives as long as its worker: the main process removes it at exit (a warm shutdown or
a failed start), merges the series of pool processes that have exited into one archive file per
kind (:func:`compact`), and a worker starting sweeps the directories of workers that are gone.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from celery import signals as celery_signals

from .. import events
from ..errors import ConfigurationError
from ..storage.process import PerProcess
from .receivers import (
    OTHER_QUEUE,
    _queue_of,
    connect_loss_receiver,
    queue_label,
    settling_lost_attempt,
    timing_connected,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: directories are told apart by pid only
    fcntl = None  # type: ignore[assignment]

__all__ = ["BUCKETS", "compact", "flush", "health", "metrics", "prepare_multiprocess", "start_endpoint"]

logger = logging.getLogger("celery_tuning.metrics")

#: Seconds; task queues wait from milliseconds to hours.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
           600.0, 1800.0, 3600.0, 7200.0, float("inf"))

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_state: Dict[str, Any] = {"server": None, "ours": None}
#: Task ids counted as 'deferred', so the timing receiver does not count them again; oldest
#: dropped first past _REMEMBERED (an id whose attempt is never timed would stay for good).
_deferred: OrderedDict[str, bool] = OrderedDict()
_REMEMBERED = 10_000

#: A worker's directory is ``<tmp>/celery-tuning-metrics-<pid>-<random>``; its main process holds an
#: exclusive lock on ``owner.lock`` inside it for life (pool children inherit it), so a directory
#: whose lock can be taken belongs to no live worker, whatever its pid became since.
_DIR_PREFIX = "celery-tuning-metrics-"
_LOCK_NAME = "owner.lock"


def prepare_multiprocess() -> Optional[str]:
    """Point prometheus-client at a per-node directory before it is imported (worker processes only).

    Sweeps the directories of workers that are gone, makes this worker's (removed when its main
    process exits). Returns the directory, or None when this is not a worker or the operator set
    one already (an operator's directory is never swept, compacted or removed).
    """
    from .runtime import is_worker_process

    if not is_worker_process() or os.environ.get(_ENV):
        return os.environ.get(_ENV)
    if "prometheus_client" in sys.modules:
        logger.warning("prometheus_client was imported before the app's settings were read: metrics of prefork "
                       "children cannot be aggregated; set %s before starting the worker", _ENV)
        return None
    tmp = tempfile.gettempdir()
    sweep_stale_directories(tmp)
    # Made under a staging name and renamed once locked: a sweeper never sees it unlocked.
    staging = tempfile.mkdtemp(prefix=f".{_DIR_PREFIX}{os.getpid()}-", dir=tmp)
    _state["lock"] = _lock_directory(staging)
    path = os.path.join(tmp, os.path.basename(staging)[1:])
    os.rename(staging, path)
    os.environ[_ENV] = path
    _state["ours"] = path
    _state["owner"] = os.getpid()
    atexit.register(_remove_ours)  # before flush registers: runs after the last flush
    return path


def _lock_directory(path: str) -> Optional[int]:
    fd = os.open(os.path.join(path, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without flock: sweepers judge the directory by its pid
            os.close(fd)
            os.remove(os.path.join(path, _LOCK_NAME))
            return None
    return fd


def _remove_ours() -> None:
    """Remove this worker's directory when its main process exits (pool children exit with
    ``os._exit`` and never run this; a fork that does is no owner)."""
    path = _state.get("ours")
    if not path or _state.get("owner") != os.getpid():
        return
    locked = _compact_lock.acquire(timeout=5)  # not under a merge running in the compactor thread
    try:
        _state["ours"] = None
        shutil.rmtree(path, ignore_errors=True)
    finally:
        if locked:
            _compact_lock.release()
    fd = _state.pop("lock", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid we can ask about: leave it
    return True


def sweep_stale_directories(tmp: Optional[str] = None) -> List[str]:
    """Remove the metrics directories of workers that are gone (their main process died without
    cleaning up: SIGKILL, a crash). A directory is stale when nobody holds its lock (a directory of
    an earlier version, without a lock: when its pid is gone). Returns the directories removed."""
    tmp = tmp or tempfile.gettempdir()
    removed: List[str] = []
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name.lstrip(".")
        if not name.startswith(_DIR_PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            pid = int(name[len(_DIR_PREFIX):].split("-", 1)[0])
        except (OSError, ValueError):
            continue
        # A staging directory exists for the moment between its making and its lock: by pid only.
        if (_pid_alive(pid) if entry.name.startswith(".") else _owned(entry.path, pid)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    if removed:
        logger.info("celery-tuning: removed %d metrics director%s of workers that are gone", len(removed),
                    "y" if len(removed) == 1 else "ies")
    return removed


def _owned(path: str, pid: int) -> bool:
    try:
        fd = os.open(os.path.join(path, _LOCK_NAME), os.O_RDWR)
    except FileNotFoundError:
        return _pid_alive(pid)
    except OSError:
        return True  # not ours to judge (another user's)
    try:
        if fcntl is None:
            return _pid_alive(pid)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True  # held: its worker (or one of its pool processes) is alive
        return False
    finally:
        os.close(fd)


class TuningMetrics:
    """The metric objects of one process (created after fork, per process)."""

    def __init__(self, buckets: Optional[Tuple[float, ...]] = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge

        buckets = tuple(buckets or BUCKETS)

        # Multiprocess mode reads the per-process files, not a registry; registering there would
        # also collide with the objects a parent made before forking this process.
        registry = None if os.environ.get(_ENV) else REGISTRY
        counter = functools.partial(Counter, registry=registry)
        gauge = functools.partial(Gauge, registry=registry)
        labels = ("task", "queue")
        histogram = functools.partial(BulkHistogram, registry=registry)
        self.wait = histogram("celery_tuning_task_queue_wait_seconds",
                              "Time from publish (or ETA) to start of a task attempt.", labels, buckets=buckets)
        self.run = histogram("celery_tuning_task_run_seconds", "Run time of a task attempt.", labels,
                             buckets=buckets)
        self.total = histogram("celery_tuning_task_end_to_end_seconds",
                               "Time from first publish to the end of a task attempt.", labels, buckets=buckets)
        self.cpu = counter("celery_tuning_task_cpu_seconds_total",
                           "CPU time of the thread running the task, summed over attempts "
                           "(with run time: how cpu-bound a queue is).", labels)
        self.outcomes = counter("celery_tuning_task_outcomes_total", "Task attempts by outcome.",
                                ("task", "queue", "state"))
        self.sla = counter("celery_tuning_sla_breaches_total", "SLA threshold breaches.",
                           ("task", "queue", "level", "kind"))
        self.sla_checked = counter("celery_tuning_sla_checked_total",
                                   "Task attempts checked against an SLA (compliance denominator).",
                                   ("task", "queue"))
        self.clamped = counter("celery_tuning_clock_skew_clamped_total",
                               "Queue waits that came out negative (publisher clock ahead) and were clamped.",
                               ("task",))
        self.limiter = counter("celery_tuning_limiter_events_total", "Rate-limiter decisions and events.",
                               ("name", "event"))
        self.limiter_wait = counter("celery_tuning_limiter_wait_seconds_total",
                                    "Seconds waited or reserved ahead for rate-limit slots.", ("name",))
        self.breaker = counter("celery_tuning_breaker_transitions_total", "Circuit-breaker state changes seen.",
                               ("name", "state"))
        # 'mostrecent': the node shows the latest transition any process saw. 'max' kept the 'open'
        # of a child that had since exited above a live child's 'closed', and the alert never cleared.
        self.breaker_state = gauge("celery_tuning_breaker_state",
                                   "Breaker state as last seen: 0 closed, 1 half-open, 2 open.", ("name",),
                                   multiprocess_mode="mostrecent")
        self.cache = counter("celery_tuning_cache_events_total", "Result-cache events (hits by level, misses...).",
                             ("task", "event"))
        self.deduplicated = counter("celery_tuning_deduplicated_total",
                                    "@dedupe calls not published: an identical call was queued or running.",
                                    ("task",))
        self.debounced = counter("celery_tuning_debounced_total",
                                 "@debounce calls collapsed into the pending run of their key (not published).",
                                 ("task",))
        self.parked = counter("celery_tuning_parked_total", "Deferred calls parked in the tuning Redis.",
                              ("reason", "name"))
        self.unparked = counter("celery_tuning_unparked_total", "Parked calls a mover published back to their queue.",
                                ("reason", "name"))
        self.park_fallbacks = counter("celery_tuning_park_fallbacks_total",
                                      "Deferrals that should have parked and went out as countdown messages.",
                                      ("reason", "why"))
        # Counted by the movers in the workers' main processes; every mover sees the same Redis.
        self.parked_tasks = gauge("celery_tuning_parked_tasks",
                                  "Tasks parked now (due, waiting and claimed), as last counted by a mover.",
                                  ("reason", "name"), multiprocess_mode="mostrecent")
        # @fair, per queue only (never per key: tenants are unbounded).
        self.fair_queued = counter("celery_tuning_fair_queued_total",
                                   "@fair calls queued per key in the tuning Redis (counted where they were made).",
                                   ("queue",))
        self.fair_released = counter("celery_tuning_fair_released_total",
                                     "@fair messages a dispatcher published into their queue.", ("queue",))
        self.fair_waiting = gauge("celery_tuning_fair_waiting",
                                  "@fair messages waiting for their turn, as last seen by a dispatcher.",
                                  ("queue",), multiprocess_mode="mostrecent")
        self.fair_keys = gauge("celery_tuning_fair_keys",
                               "Keys with @fair messages waiting, as last seen by a dispatcher.",
                               ("queue",), multiprocess_mode="mostrecent")
        self.fair_in_window = gauge("celery_tuning_fair_in_window",
                                    "@fair messages released and not started yet (the window in use).",
                                    ("queue",), multiprocess_mode="mostrecent")


class _BulkChild:
    """One labelled series of a :class:`BulkHistogram`: a count per bucket and a sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self, buckets: List[Any], total: Any) -> None:
        self.buckets = buckets
        self.sum = total

    def add(self, counts: Sequence[int], total: float) -> None:
        """Add ``counts[i]`` observations to bucket ``i`` (not cumulative) and ``total`` to the sum:
        what as many ``observe()`` calls would leave, in one write per changed value."""
        self.sum.inc(total)
        for value, n in zip(self.buckets, counts):
            if n:
                value.inc(n)


class BulkHistogram:
    """A Prometheus histogram that takes observations in bulk (counts per bucket and their sum).

    prometheus-client's ``Histogram`` takes one observation per call. This one keeps the same
    series with prometheus-client's public value type (``prometheus_client.values.ValueClass``,
    the per-process files in multiprocess mode, where the node's collector adds them up exactly as
    a ``Histogram``'s) and, in a single process, is itself the collector of its series.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *, buckets: Sequence[float],
                 registry: Any = None) -> None:
        bounds = [float(b) for b in buckets]
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))  # as prometheus-client does
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.upper_bounds = tuple(bounds)
        self._children: Dict[Tuple[str, ...], _BulkChild] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def labels(self, *labelvalues: str) -> _BulkChild:
        key = tuple(str(v) for v in labelvalues)
        child = self._children.get(key)
        if child is None:
            from prometheus_client.utils import floatToGoString
            from prometheus_client.values import ValueClass

            with self._lock:
                child = self._children.get(key)
                if child is None:
                    le = (*self.labelnames, "le")
                    buckets = [ValueClass("histogram", self.name, self.name + "_bucket", le,
                                          (*key, floatToGoString(bound)), self.documentation)
                               for bound in self.upper_bounds]
                    total = ValueClass("histogram", self.name, self.name + "_sum", self.labelnames, key,
                                       self.documentation)
                    child = self._children[key] = _BulkChild(buckets, total)
        return child

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in sorted(self._children.items()):
            acc = 0.0
            cumulative = []
            for bound, value in zip(self.upper_bounds, child.buckets):
                acc += value.get()
                cumulative.append((floatToGoString(bound), acc))
            family.add_metric(list(key), cumulative, child.sum.get())
        yield family


class _TaskSeries:
    """The labelled series one (task, queue) pair records into, looked up once per process."""

    __slots__ = ("cpu", "run", "total", "wait")

    def __init__(self, m: TuningMetrics, task: str, queue: str) -> None:
        self.wait = m.wait.labels(task, queue)
        self.run = m.run.labels(task, queue)
        self.total = m.total.labels(task, queue)
        self.cpu = m.cpu.labels(task, queue)


class _Process:
    """What one process records into: its metric objects, their labelled series looked up once,
    the observations not written yet, and whether its flusher thread runs. A forked pool child
    starts with none of its parent's (each process writes its own files)."""

    __slots__ = ("flusher", "labelled", "lock", "metrics", "pending", "series")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metrics: Optional[TuningMetrics] = None
        self.series: Dict[Tuple[str, str], _TaskSeries] = {}
        self.labelled: Dict[Tuple[str, Tuple[str, ...]], Any] = {}
        self.pending: Dict[Tuple[str, str], _Pending] = {}
        self.flusher = False


_process: PerProcess[_Process] = PerProcess(_Process, name="metrics")


def _task_series(task: str, queue: str) -> _TaskSeries:
    # .labels() costs a few µs per call; a task attempt would pay it six times.
    series = _process.get().series
    found = series.get((task, queue))
    if found is None:
        found = series[(task, queue)] = _TaskSeries(metrics(), task, queue)
    return found


def _labelled(metric: str, *labels: str) -> Any:
    """``metrics().<metric>.labels(*labels)``, looked up once per process (``.labels()`` costs a
    few µs, and outcomes and limiter and cache events are recorded on every task)."""
    labelled = _process.get().labelled
    found = labelled.get((metric, labels))
    if found is None:
        found = labelled[(metric, labels)] = getattr(metrics(), metric).labels(*labels)
    return found


def _outcome(task: str, queue: str, state: str) -> Any:
    return _labelled("outcomes", task, queue, state)


def metrics() -> TuningMetrics:
    """This process's metrics (created lazily, again after fork)."""
    process = _process.get()
    found = process.metrics
    if found is None:
        with process.lock:
            found = process.metrics
            if found is None:
                found = process.metrics = TuningMetrics(_state.get("buckets"))
    return found


def start_endpoint(port: int, address: str = "0.0.0.0") -> Any:
    """Serve /metrics for the whole node from the worker's main process, and /health (see :func:`health`)."""
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    registry = REGISTRY
    if os.environ.get(_ENV):
        registry = CollectorRegistry()
        registry.register(_ReapingCollector(os.environ[_ENV]))
        registry.register(_InFlightCollector())
        registry.register(_WorkerCollector())
        if os.environ[_ENV] == _state.get("ours"):
            _start_compactor(os.environ[_ENV])
    elif not _state.get("in_flight_registered"):
        registry.register(_InFlightCollector())
        registry.register(_WorkerCollector())
        _state["in_flight_registered"] = True
    celery_signals.worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid="celery_tuning.metrics.ready")
    try:
        server, _thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise ConfigurationError(
            f"tuning_metrics_port: cannot listen on {address} port {port}: {exc.strerror or exc}") from None
    # wsgiref's public hook: /health is answered here, every other path by prometheus-client.
    server.set_app(_with_health(server.get_app()))
    _state["server"] = server
    logger.info("celery-tuning: Prometheus metrics on %s:%d/metrics (and /health)%s", address, server.server_port,
                " (multiprocess)" if os.environ.get(_ENV) else "")
    return server


# -- /health and the worker's own gauges --------------------------------------------------------

#: Seconds a queue-depth reading is reused: concurrent or close scrapes ask the broker once.
QUEUE_DEPTH_TTL = 1.0
#: Seconds a broker connection attempt or read for queue depths may take before the scrape gives up.
BROKER_TIMEOUT = 1.0
#: The tuning Redis client name /health pings with (its own connections, never a task's).
_HEALTH_CLIENT = "celery-tuning-health"


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """The worker's consumer (``worker_ready`` is sent with it once it consumes)."""
    _state["consumer"] = sender


def _consumer_state() -> Tuple[Optional[Any], Optional[str]]:
    """The worker's consumer and, when it is not consuming now, why."""
    from celery.bootsteps import RUN
    from celery.worker import state as worker_state

    consumer = _state.get("consumer")
    if consumer is None:
        return None, "consumer not started"
    if worker_state.should_stop is not None or worker_state.should_terminate is not None:
        return consumer, "worker shutting down"
    blueprint = getattr(consumer, "blueprint", None)
    if blueprint is not None and blueprint.state != RUN:
        return consumer, f"consumer {blueprint.human_state()}"
    connection = getattr(consumer, "connection", None)
    if connection is None or getattr(consumer, "task_consumer", None) is None:
        return consumer, "consumer not connected to the broker"
    return consumer, None


def _consumed_queues(consumer: Any) -> List[Tuple[str, str]]:
    """(label, broker name) of each queue the worker consumes: the label is the queue's name (a
    ``Broadcast`` queue's own name, not its per-process ``bcast.<uuid>``)."""
    found = list(getattr(getattr(consumer, "task_consumer", None), "queues", None) or ())
    if not found:
        found = list(consumer.app.amqp.queues.consume_from.values())
    pairs = {}
    for queue in found:
        name = getattr(queue, "name", None)
        if name:
            pairs[str(getattr(queue, "alias", None) or name)] = str(name)
    return sorted(pairs.items())


def _redis_health(app: Any) -> Tuple[str, Optional[str]]:
    """``(status, problem)`` of the tuning Redis: one PING on the health check's own connection,
    within the tuning Redis socket timeouts (0.5 s by default)."""
    from ..errors import StorageError
    from .runtime import runtime_for

    runtime = runtime_for(app)
    if runtime.in_memory:
        return "memory", None
    try:
        connector = runtime.connector_named(_HEALTH_CLIENT)
    except ConfigurationError:
        return "none", None  # no tuning Redis set and none needed (the bootstep said so at start)
    try:
        connector.ping()
    except StorageError as exc:
        return "error", f"tuning Redis: {exc}"
    return "ok", None


def health() -> Tuple[int, Dict[str, Any]]:
    """The worker's health as ``(HTTP status, JSON body)``: 200 when its consumer runs and the
    tuning Redis answers a PING, 503 with the reason otherwise. No metric is read."""
    consumer, problem = _consumer_state()
    body: Dict[str, Any] = {"status": "ok"}
    if consumer is None:
        return 503, {"status": "unavailable", "reason": problem, "consuming": [], "redis": "unknown"}
    body["consuming"] = [label for label, _ in _consumed_queues(consumer)] if problem is None else []
    try:
        body["redis"], redis_problem = _redis_health(consumer.app)
    except Exception as exc:  # a settings problem: reported, never a traceback in the server
        body["redis"], redis_problem = "error", f"tuning Redis: {type(exc).__name__}: {exc}"
    reasons = [r for r in (problem, redis_problem) if r]
    if reasons:
        body["status"] = "unavailable"
        body["reason"] = "; ".join(reasons)
        return 503, body
    return 200, body


def _with_health(metrics_app: Any) -> Any:
    """A WSGI app that answers ``/health`` itself and hands every other request to ``metrics_app``."""
    import json

    def app(environ: Dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != "/health":
            return metrics_app(environ, start_response)
        try:
            status, body = health()
        except Exception as exc:  # never a traceback: a 503 that says why
            logger.warning("celery-tuning: /health failed: %s: %s", type(exc).__name__, exc)
            status, body = 503, {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"}
        payload = json.dumps(body).encode()
        start_response("200 OK" if status == 200 else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                        ("Cache-Control", "no-store")])
        return [payload] if environ.get("REQUEST_METHOD") != "HEAD" else [b""]

    return app


class _QueueDepths:
    """Messages waiting in the queues the worker consumes, read from the broker at most every
    QUEUE_DEPTH_TTL on a connection of its own (never the consumer's): Redis sums LLEN over the
    queue's priority lists, AMQP a passive ``queue_declare``'s message count. Messages a worker
    has reserved (prefetched) are not waiting and not counted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.read_at = -QUEUE_DEPTH_TTL
        self.depths: Optional[Dict[str, int]] = None
        self.connection: Any = None
        self.failing = False

    def get(self, app: Any, queues: List[Tuple[str, str]]) -> Optional[Dict[str, int]]:
        with self.lock:  # a second scrape waits for the first's reading and reuses it
            now = time.monotonic()
            if now - self.read_at < QUEUE_DEPTH_TTL:
                return self.depths
            try:
                self.depths = self._read(app, queues)
                if self.failing:
                    logger.info("celery-tuning: queue depths readable again")
                self.failing = False
            except Exception as exc:  # the gauge is left out: one log line, no scrape error
                self.depths = None
                self._drop()
                if not self.failing:
                    logger.warning("celery-tuning: cannot read queue depths from the broker (%s: %s); "
                                   "celery_tuning_queue_depth is left out until it answers",
                                   type(exc).__name__, _redact(str(exc)))
                self.failing = True
            self.read_at = time.monotonic()
            return self.depths

    def _read(self, app: Any, queues: List[Tuple[str, str]]) -> Dict[str, int]:
        from kombu.transport import virtual

        if self.connection is None:
            connection = app.connection_for_read()
            options = dict(connection.transport_options or {})
            if connection.transport.driver_type == "redis":
                options.setdefault("socket_timeout", BROKER_TIMEOUT)
            elif connection.transport.driver_type == "amqp":
                options.setdefault("read_timeout", BROKER_TIMEOUT)
                options.setdefault("write_timeout", BROKER_TIMEOUT)
            self.connection = connection.clone(connect_timeout=BROKER_TIMEOUT, transport_options=options)
            self.connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, interval_max=0)
        channel = self.connection.default_channel
        depths = {}
        for label, name in queues:
            if isinstance(channel, virtual.Channel):
                depths[label] = int(channel._size(name))  # an empty Redis queue has no key: 0
            else:
                depths[label] = int(channel.queue_declare(queue=name, passive=True).message_count)
        return depths

    def _drop(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception:
                pass


def _redact(text: str) -> str:
    from ..storage.urls import redact_url

    return redact_url(text)


_queue_depths = _QueueDepths()


class _WorkerCollector:
    """``celery_tuning_worker_consuming`` (1 while the worker's consumer runs) and
    ``celery_tuning_queue_depth`` of the queues it consumes, read at scrape time in the main process."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        consumer, problem = _consumer_state()
        up = GaugeMetricFamily("celery_tuning_worker_consuming",
                               "1 while this worker's consumer runs (connected and consuming), else 0.")
        up.add_metric([], 1 if consumer is not None and problem is None else 0)
        yield up
        depth = GaugeMetricFamily("celery_tuning_queue_depth",
                                  "Messages waiting in a queue this worker consumes (not those reserved by "
                                  "workers), read at most every second; absent while the broker does not answer.",
                                  labels=("queue",))
        if consumer is not None and problem is None:
            queues = _consumed_queues(consumer)
            depths = _queue_depths.get(consumer.app, queues) if queues else None
            for label, n in sorted((depths or {}).items()):
                depth.add_metric([label], n)
        yield depth


class _ReapingCollector:
    """MultiProcessCollector that first settles the files of pool processes that have exited.

    In this worker's own directory (``compact`` defaults to that) their series are merged into one
    archive file per kind (:func:`compact`), so a scrape reads the live processes' files and the
    archives, however many children came and went (``max_tasks_per_child``). In a directory the
    operator set, only the live gauges of dead processes are forgotten. Either way a child killed
    by a hard time limit, SIGKILL or the OOM killer (no ``worker_process_shutdown``) stops counting
    in live gauges, and counters and histograms never go backwards.
    """

    def __init__(self, path: str, compact: Optional[bool] = None) -> None:
        from prometheus_client import multiprocess

        self.path = path
        self.compact = path == _state.get("ours") if compact is None else compact
        self._inner = multiprocess.MultiProcessCollector(None, path=path)

    def collect(self) -> Any:
        import glob

        from prometheus_client import multiprocess

        with _compact_lock:  # no merge may move a file between the glob and its read
            if self.compact:
                compact(self.path)
            else:
                for name in glob.glob(os.path.join(self.path, "gauge_live*_*.db")):
                    try:
                        pid = int(name.rsplit("_", 1)[1].split(".")[0])
                    except ValueError:
                        continue
                    if not _pid_alive(pid):
                        multiprocess.mark_process_dead(pid, self.path)
            return list(self._inner.collect())


# -- compaction ----------------------------------------------------------------------------------

#: How often the worker's main process merges exited processes' files when nobody scrapes.
COMPACT_INTERVAL = 30.0
_compact_lock = threading.RLock()
_ARCHIVE = "archive"  # in place of a pid: counter_archive.db, histogram_archive.db...
#: File kinds (prometheus-client's file name before the pid) merged per series, and how.
_MERGED = {"counter": "sum", "histogram": "sum", "summary": "sum", "gauge_sum": "sum", "gauge_max": "max",
           "gauge_min": "min", "gauge_mostrecent": "mostrecent"}


def compact(path: str) -> int:
    """Merge the files of this worker's processes that have exited into one archive per kind.

    Counters, histograms and summaries are added up (as a scrape adds them), ``max``/``min``/``sum``
    gauges keep that, ``mostrecent`` gauges the latest value; live gauges of an exited process are
    dropped, ``all`` gauges (one series per pid) are left alone. A scrape sees the same totals
    before and after. Returns how many files were merged or dropped.
    """
    with _compact_lock:
        merged: Dict[str, List[str]] = {}
        done = 0
        try:
            names = os.listdir(path)
        except OSError:
            return 0
        for name in names:
            if not name.endswith(".db"):
                continue
            kind, _, pid = name[:-3].rpartition("_")
            if not pid.isdigit() or not kind or _pid_alive(int(pid)):
                continue
            if kind.startswith("gauge_live"):
                try:
                    os.remove(os.path.join(path, name))
                    done += 1
                except FileNotFoundError:
                    pass
            elif kind in _MERGED:
                merged.setdefault(kind, []).append(name)
        for kind, files in merged.items():
            done += _merge(path, kind, files)
        return done


def _merge(path: str, kind: str, names: List[str]) -> int:
    from prometheus_client.mmap_dict import MmapedDict

    how = _MERGED[kind]
    archive = os.path.join(path, f"{kind}_{_ARCHIVE}.db")
    # Moved aside first (a name no collector globs): a new process that reuses the pid writes a
    # new file instead of one being merged.
    moved = []
    for name in names:
        source = os.path.join(path, name)
        try:
            os.rename(source, source + ".merging")
        except FileNotFoundError:
            continue
        moved.append(source)
    values: Dict[str, Tuple[float, float]] = {}
    taken = []
    for source in ([archive] if os.path.exists(archive) else []) + [s + ".merging" for s in moved]:
        try:
            rows = list(MmapedDict.read_all_values_from_file(source))
        except Exception:  # unreadable (cut short?): left where a scrape reports it as before
            if source != archive:
                os.replace(source, source[:-len(".merging")])
                continue
            raise
        taken.append(source)
        for key, value, timestamp, _ in rows:
            old = values.get(key)
            if old is None:
                values[key] = (value, timestamp)
            elif how == "sum":
                values[key] = (old[0] + value, 0.0)
            elif how == "max":
                values[key] = (max(old[0], value), 0.0)
            elif how == "min":
                values[key] = (min(old[0], value), 0.0)
            elif timestamp > old[1]:  # mostrecent
                values[key] = (value, timestamp)
    staged = archive + ".new"
    try:
        out = MmapedDict(staged)
        try:
            for key, (value, timestamp) in values.items():
                out.write_value(key, value, timestamp)
        finally:
            out.close()
        os.replace(staged, archive)
    except BaseException:
        for source in taken:
            if source != archive:
                os.replace(source, source[:-len(".merging")])
        raise
    for source in taken:
        if source != archive:
            os.remove(source)
    return sum(1 for source in taken if source != archive)


def _start_compactor(path: str) -> None:
    """Merge exited processes' files every COMPACT_INTERVAL in the main process, scraped or not."""
    if _state.get("compactor"):
        return
    _state["compactor"] = True
    from prometheus_client.mmap_dict import MmapedDict  # noqa: F401  (imported before any fork)

    def loop() -> None:
        while _state.get("ours") == path:
            time.sleep(COMPACT_INTERVAL)
            try:
                if os.path.isdir(path):
                    compact(path)
            except Exception:
                logger.exception("celery-tuning: merging the metrics of exited pool processes failed")

    threading.Thread(target=loop, name="celery-tuning-metrics-compactor", daemon=True).start()


# -- receivers ---------------------------------------------------------------------------------

class _Pending:
    """Observations of one (task, queue) added up in memory since the last flush."""

    __slots__ = ("counts", "cpu", "outcomes", "sums")

    def __init__(self, buckets: int) -> None:
        self.counts = ([0] * buckets, [0] * buckets, [0] * buckets)  # wait, run, total
        self.sums = [0.0, 0.0, 0.0]
        self.cpu = 0.0
        self.outcomes: Dict[str, int] = {}


#: Task-attempt observations are added up in memory and written to the metric files (one mmap
#: write per changed bucket, sum and counter) at most this often, by a thread per process and
#: when a process exits; a SIGKILLed pool child loses at most this much of its figures.
FLUSH_INTERVAL = 0.5



def _on_timed(sender: Any = None, task_id: str = "", queue: str = "", wait: Optional[float] = None,
              run: float = 0.0, total: Optional[float] = None, state: Optional[str] = None, clamped: bool = False,
              cpu: float = 0.0, **_: Any) -> None:
    name = sender.name
    if clamped:
        metrics().clamped.labels(name).inc()
    outcome = None
    if not _deferred.pop(task_id, False) and state is not None:
        # counted as 'deferred' when deferred; a child cut short is counted by the main process
        outcome = state.lower()
    bounds = _state["bounds"]
    process = _process.get()
    with process.lock:
        pending = process.pending.get((name, queue))
        if pending is None:
            pending = process.pending[(name, queue)] = _Pending(len(bounds))
        counts, sums = pending.counts, pending.sums
        if wait is not None:
            counts[0][bisect_left(bounds, wait)] += 1
            sums[0] += wait
        counts[1][bisect_left(bounds, run)] += 1
        sums[1] += run
        if total is not None:
            counts[2][bisect_left(bounds, total)] += 1
            sums[2] += total
        pending.cpu += cpu
        if outcome is not None:
            pending.outcomes[outcome] = pending.outcomes.get(outcome, 0) + 1
    if not process.flusher:
        if settling_lost_attempt():
            # A prefork worker's main process settling a lost child: written now, no thread there
            # (one writing while the pool forks could leave prometheus-client's lock held in the child).
            flush()
            return
        _start_flusher(process)


def _start_flusher(process: _Process) -> None:
    with process.lock:
        if process.flusher:
            return
        process.flusher = True  # a forked child starts its own

    def loop() -> None:
        while True:
            time.sleep(FLUSH_INTERVAL)
            try:
                flush()
            except Exception:  # never let a metrics hiccup end the thread
                logger.exception("celery-tuning: writing task metrics failed")

    threading.Thread(target=loop, name="celery-tuning-metrics", daemon=True).start()


def flush() -> None:
    """Write the observations added up so far (also called at process exit)."""
    process = _process.peek()
    if process is None:
        return
    with process.lock:
        if not process.pending:
            return
        batch, process.pending = process.pending, {}
    for (task, queue), pending in batch.items():
        series = _task_series(task, queue)
        for child, counts, total in zip((series.wait, series.run, series.total), pending.counts, pending.sums):
            if any(counts):
                child.add(counts, total)
        if pending.cpu:
            series.cpu.inc(pending.cpu)
        for outcome, n in pending.outcomes.items():
            _outcome(task, queue, outcome).inc(n)


class _InFlightCollector:
    """``celery_tuning_tasks_in_flight`` from the worker's own state, in its main process.

    The main process knows which requests a pool child (or thread) has accepted and not finished,
    so nothing is written per task and a killed child's task drops out as soon as Celery settles it.
    """

    def collect(self) -> Any:
        from celery.worker import state
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("celery_tuning_tasks_in_flight", "Task attempts running now.",
                                   labels=("task", "queue"))
        counts: Dict[Tuple[str, str], int] = {}
        for _ in range(3):  # the worker may change the set while we copy it
            try:
                requests = list(state.active_requests)
                break
            except RuntimeError:
                requests = []
        for request in requests:
            task = getattr(request, "task", None)
            app = getattr(task, "app", None)
            queue = (queue_label(app, request.delivery_info, getattr(task, "queue", None)) if app is not None
                     else OTHER_QUEUE)
            key = (str(request.task_name), queue)
            counts[key] = counts.get(key, 0) + 1
        for (task, queue), n in sorted(counts.items()):
            family.add_metric([task, queue], n)
        yield family


def _on_deferred(sender: Any = None, task_id: str = "", **_: Any) -> None:
    if timing_connected():  # nothing else takes the id back out
        _deferred[task_id] = True
        while len(_deferred) > _REMEMBERED:
            _deferred.popitem(last=False)
    _outcome(sender.name, _queue_of(sender), "deferred").inc()


def _on_sla(sender: Any = None, queue: str = "", level: str = "", kind: str = "", **_: Any) -> None:
    metrics().sla.labels(sender.name, queue, level, kind).inc()


def _on_sla_checked(task: Any, queue: str) -> None:
    _labelled("sla_checked", task.name, queue).inc()


def _record_limiter(name: str, event: str, seconds: float) -> None:
    _labelled("limiter", name, event).inc()
    if event in ("waited", "reserved") and seconds > 0:
        metrics().limiter_wait.labels(name).inc(seconds)


_BREAKER_LEVEL = {"closed": 0, "half-open": 1, "open": 2}


def _record_breaker(name: str, old: str, new: str, reason: str) -> None:
    m = metrics()
    m.breaker.labels(str(name), new).inc()
    m.breaker_state.labels(str(name)).set(_BREAKER_LEVEL.get(new, 0))


def _record_cache(task: str, event: str) -> None:
    _labelled("cache", task, event).inc()


def _record_deduplicated(task: str) -> None:
    _labelled("deduplicated", task).inc()


def _record_debounced(task: str) -> None:
    _labelled("debounced", task).inc()


def _record_parked(reason: str, name: str) -> None:
    _labelled("parked", reason, name).inc()


def _record_unparked(reason: str, name: str) -> None:
    _labelled("unparked", reason, name).inc()


def _record_park_fallback(reason: str, why: str) -> None:
    _labelled("park_fallbacks", reason, why).inc()


def _record_parked_count(reason: str, name: str, parked: int) -> None:
    _labelled("parked_tasks", reason, name).set(parked)


def _record_fair_queued(queue: str, count: int) -> None:
    _labelled("fair_queued", queue).inc(count)


def _record_fair_released(queue: str, count: int) -> None:
    _labelled("fair_released", queue).inc(count)


def _record_fair_count(queue: str, waiting: int, keys: int, in_window: int) -> None:
    _labelled("fair_waiting", queue).set(waiting)
    _labelled("fair_keys", queue).set(keys)
    _labelled("fair_in_window", queue).set(in_window)


def _count_lost(task: Any, queue: str, state: str) -> None:
    """The outcome of an attempt whose pool process was killed or lost and that was not timed
    (timing off, or no start known); a timed one is counted from its ``task_timed``, with its run
    time (see ``receivers._settle``)."""
    _outcome(task.name, queue, state.lower()).inc()


def _on_child_exit(pid: Optional[int] = None, **_: Any) -> None:
    flush()
    if os.environ.get(_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # live gauges of this child go; counters stay


def _on_child_start(**_: Any) -> None:
    """A pool child closes the metrics listening socket it inherited from the main process: it
    would keep the port open (a restarted worker could not listen) after the main process died."""
    server, _state["server"] = _state.get("server"), None
    if server is not None:
        try:
            server.socket.close()
        except OSError:
            pass


def connect_metric_receivers(buckets: Optional[Tuple[float, ...]] = None) -> None:
    """Record every event celery-tuning emits into Prometheus metrics (once per process)."""
    if buckets:
        _state["buckets"] = buckets
    bounds = tuple(float(b) for b in (_state.get("buckets") or BUCKETS))
    _state["bounds"] = bounds if bounds[-1] == float("inf") else (*bounds, float("inf"))  # as prometheus adds
    # Subscribers of the events sink: a direct call per event, no signal dispatch.
    events.TASK_TIMED.subscribe(_on_timed)
    events.SLA_CHECKED.subscribe(_on_sla_checked)
    events.LIMITER.subscribe(_record_limiter)
    events.CACHE.subscribe(_record_cache)
    events.DEDUPLICATED.subscribe(_record_deduplicated)
    events.DEBOUNCED.subscribe(_record_debounced)
    events.TASK_DEFERRED.subscribe(_on_deferred)
    events.SLA_BREACHED.subscribe(_on_sla)
    events.BREAKER.subscribe(_record_breaker)
    events.TASK_PARKED.subscribe(_record_parked)
    events.TASK_UNPARKED.subscribe(_record_unparked)
    events.PARK_FALLBACK.subscribe(_record_park_fallback)
    events.PARKED_COUNT.subscribe(_record_parked_count)
    events.FAIR_QUEUED.subscribe(_record_fair_queued)
    events.FAIR_RELEASED.subscribe(_record_fair_released)
    events.FAIR_COUNT.subscribe(_record_fair_count)
    connect_loss_receiver(_count_lost)
    celery_signals.worker_process_init.connect(_on_child_start, weak=False,
                                               dispatch_uid="celery_tuning.metrics.child_start")
    celery_signals.worker_process_shutdown.connect(_on_child_exit, weak=False,
                                                   dispatch_uid="celery_tuning.metrics.child_exit")
    celery_signals.worker_shutdown.connect(lambda **_: flush(), weak=False,
                                           dispatch_uid="celery_tuning.metrics.flush")
    atexit.register(flush)
