"""Prometheus metrics fed by celery-tuning's events sink; one scrape endpoint per worker node.

prometheus-client decides once, when it is first imported, whether values live in per-process
files (multiprocess mode). Under prefork every pool child records into its own file and the
worker's main process serves the sum, so the directory must be set before anything imports
prometheus_client: :func:`prepare_multiprocess` does that from ``install()`` in a worker process,
and this module imports prometheus_client only inside functions.
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
from .receivers import OTHER_QUEUE, _queue_of, queue_label, timing_connected
from .runtime import installed_runtime

__all__ = ["BUCKETS", "flush", "metrics", "prepare_multiprocess", "start_endpoint"]

logger = logging.getLogger("celery_tuning.metrics")

#: Seconds; task queues wait from milliseconds to hours.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
           600.0, 1800.0, 3600.0, 7200.0, float("inf"))

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_state: Dict[str, Any] = {"server": None, "ours": None}
#: Task ids counted as 'deferred', so the timing receiver does not count them again; oldest
#: dropped first past _REMEMBERED (an id whose attempt is never timed would stay for good).
_deferred: OrderedDict[str, bool] = OrderedDict()
_lost: OrderedDict[str, bool] = OrderedDict()
_REMEMBERED = 10_000


def prepare_multiprocess() -> Optional[str]:
    """Point prometheus-client at a per-node directory before it is imported (worker processes only).

    Returns the directory, or None when this is not a worker or the operator set one already.
    """
    from .runtime import is_worker_process

    if not is_worker_process() or os.environ.get(_ENV):
        return os.environ.get(_ENV)
    if "prometheus_client" in sys.modules:
        logger.warning("prometheus_client was imported before the app's settings were read: metrics of prefork "
                       "children cannot be aggregated; set %s before starting the worker", _ENV)
        return None
    path = os.path.join(tempfile.gettempdir(), f"celery-tuning-metrics-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)  # a fresh directory for this node: no stale children
    os.makedirs(path, exist_ok=True)
    os.environ[_ENV] = path
    _state["ours"] = path
    return path


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
    """Serve /metrics for the whole node from the worker's main process."""
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    registry = REGISTRY
    if os.environ.get(_ENV):
        registry = CollectorRegistry()
        registry.register(_ReapingCollector(os.environ[_ENV]))
        registry.register(_InFlightCollector())
    elif not _state.get("in_flight_registered"):
        registry.register(_InFlightCollector())
        _state["in_flight_registered"] = True
    try:
        server, _thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise ConfigurationError(
            f"tuning_metrics_port: cannot listen on {address} port {port}: {exc.strerror or exc}") from None
    _state["server"] = server
    logger.info("celery-tuning: Prometheus metrics on %s:%d/metrics%s", address, server.server_port,
                " (multiprocess)" if os.environ.get(_ENV) else "")
    return server


class _ReapingCollector:
    """MultiProcessCollector that first forgets the live gauges of pool children that died.

    A child killed by a hard time limit, SIGKILL or the OOM killer sends no
    ``worker_process_shutdown``; its in-flight gauge file would count forever.
    Counters and histograms of dead children are kept (they must never go backwards).
    """

    def __init__(self, path: str) -> None:
        from prometheus_client import multiprocess

        self.path = path
        self._inner = multiprocess.MultiProcessCollector(None, path=path)

    def collect(self) -> Any:
        import glob

        from prometheus_client import multiprocess

        for name in glob.glob(os.path.join(self.path, "gauge_live*_*.db")):
            try:
                pid = int(name.rsplit("_", 1)[1].split(".")[0])
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid, self.path)
            except (ValueError, PermissionError):
                continue
        return self._inner.collect()


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
    metrics().outcomes.labels(sender.name, _queue_of(sender), "deferred").inc()


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


def _record_parked(reason: str, name: str) -> None:
    _labelled("parked", reason, name).inc()


def _record_unparked(reason: str, name: str) -> None:
    _labelled("unparked", reason, name).inc()


def _record_park_fallback(reason: str, why: str) -> None:
    _labelled("park_fallbacks", reason, why).inc()


def _record_parked_count(reason: str, name: str, parked: int) -> None:
    _labelled("parked_tasks", reason, name).set(parked)


def _on_failure_outside_child(sender: Any = None, task_id: str = "", exception: Any = None, **_: Any) -> None:
    # Sent by the worker's main process when a child was killed (hard time limit) or lost:
    # the child never reached task_postrun, so its outcome is recorded here.
    from celery.exceptions import TimeLimitExceeded, WorkerLostError

    if sender is None or not isinstance(exception, (TimeLimitExceeded, WorkerLostError)):
        return
    if installed_runtime(sender.app) is None or task_id in _lost:
        return  # Celery sends task_failure twice for a hard time limit
    _lost[task_id] = True
    while len(_lost) > _REMEMBERED:
        _lost.popitem(last=False)
    # When a child is lost or killed, Celery puts the request's context on the task's stack while
    # it sends this signal: label the queue the task came from, like every other outcome (a test
    # routes a hard-time-limited task to another queue). Without it: the declared queue.
    metrics().outcomes.labels(sender.name, _queue_of(sender), "failure").inc()


def _on_child_exit(pid: Optional[int] = None, **_: Any) -> None:
    flush()
    if os.environ.get(_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # live gauges of this child go; counters stay


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
    events.TASK_DEFERRED.subscribe(_on_deferred)
    events.SLA_BREACHED.subscribe(_on_sla)
    events.BREAKER.subscribe(_record_breaker)
    events.TASK_PARKED.subscribe(_record_parked)
    events.TASK_UNPARKED.subscribe(_record_unparked)
    events.PARK_FALLBACK.subscribe(_record_park_fallback)
    events.PARKED_COUNT.subscribe(_record_parked_count)
    celery_signals.task_failure.connect(_on_failure_outside_child, weak=False,
                                        dispatch_uid="celery_tuning.metrics.lost")
    celery_signals.worker_process_shutdown.connect(_on_child_exit, weak=False,
                                                   dispatch_uid="celery_tuning.metrics.child_exit")
    celery_signals.worker_shutdown.connect(lambda **_: flush(), weak=False,
                                           dispatch_uid="celery_tuning.metrics.flush")
    atexit.register(flush)
