"""Worker bootstep: reports the effective tuning setup, checks Redis at worker start, and runs the
parking mover (``tuning_defer_via="park"``, ``tuning_park_mover``) in the main process."""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from celery import bootsteps

from ..errors import ConfigurationError, StorageError
from .runtime import runtime_for

__all__ = ["TuningWorkerStep"]

logger = logging.getLogger("celery_tuning.worker")


class _StartGate(threading.Event):
    """Stands in for the ``_on_started`` event of Celery's embedded test worker
    (``celery.contrib.testing.worker``), which ``start_worker`` waits on with no timeout: a worker
    that dies while starting also opens it, and the waiting thread then raises why."""

    def __init__(self, original: threading.Event) -> None:
        super().__init__()
        self.failure: Optional[BaseException] = None
        if original.is_set():
            self.set()

    def fail(self, failure: BaseException) -> None:
        if not self.is_set():
            self.failure = failure
            self.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        started = super().wait(timeout)
        failure = self.failure
        if failure is not None:
            from celery.result import _set_task_join_will_block

            _set_task_join_will_block(False)  # as start_worker does once started: later .get() calls work
            raise failure
        return started


def _gate_test_worker(worker: Any) -> Optional[_StartGate]:
    """Make a test worker's start fail loudly instead of hanging: ``start_worker`` runs
    ``worker.start`` in a thread and waits for ``_on_started``, which a worker that stopped while
    starting (an error in any bootstep: Celery logs it and stops) never sets."""
    original = getattr(worker, "_on_started", None)
    if not isinstance(original, threading.Event) or not hasattr(worker, "ensure_started"):
        return None  # a real worker: Celery reports a failed start itself
    gate = original if isinstance(original, _StartGate) else _StartGate(original)
    worker._on_started = gate
    start = worker.start
    if getattr(start, "_tuning_gated", False):
        return gate

    def gated_start(*args: Any, **kwargs: Any) -> Any:
        try:
            return start(*args, **kwargs)
        finally:
            gate.fail(RuntimeError("the worker stopped before it started (see the error logged by "
                                   "celery.worker above)"))

    gated_start._tuning_gated = True  # type: ignore[attr-defined]
    worker.start = gated_start
    return gate


class TuningWorkerStep(bootsteps.StartStopStep):
    """Runs in the worker's main process before the pool starts."""

    label = "celery-tuning"

    def __init__(self, worker: Any, without_tuning: bool = False, tuning_profile: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        runtime = runtime_for(worker.app)
        if without_tuning:
            runtime.enabled = False
        self.runtime = runtime
        self.mover: Any = None
        #: With the mover off: what registers the worker's capacity for its fair queues.
        self.fair_registration: Any = None
        self._gate = _gate_test_worker(worker)

    def start(self, worker: Any) -> None:
        try:
            self._start(worker)
        except BaseException as exc:
            if self._gate is not None:
                self._gate.fail(exc)  # start_worker raises this, rather than waiting forever
            raise

    def _start(self, worker: Any) -> None:
        runtime = self.runtime
        applied = runtime.profile
        if applied:
            from .profiles import describe

            logger.info(describe(applied))
        if runtime.config.metrics_port is not None and runtime.installed:
            from .metrics import start_endpoint

            start_endpoint(runtime.config.metrics_port, runtime.config.metrics_address)
        if not runtime.enabled:
            logger.warning("celery-tuning is disabled on this worker: tuned tasks run as plain tasks")
            return
        if runtime.in_memory:
            logger.warning("celery-tuning: the tuning store is memory:// (this process only: other workers "
                           "and producers share no limits, breakers or cache with it)")
            self._start_mover(worker)
            return
        try:
            url = runtime.connector.safe_url
        except ConfigurationError:
            if runtime.needs_redis():
                raise
            # Installed on an app that neither sets tuning_redis_url nor has a Redis broker, with
            # nothing that keeps state: its tasks run as plain tasks, so the worker starts as usual.
            logger.info("celery-tuning: no tuning Redis (tuning_redis_url not set, broker not Redis); "
                        "no task or setting here needs one")
            return
        try:
            rtt = runtime.connector.ping()
        except StorageError as exc:
            logger.warning("celery-tuning: tuning Redis unreachable at start (%s); "
                           "capabilities follow their Redis-error policies", exc)
            self._start_mover(worker)  # it backs off until the tuning Redis answers
            return
        logger.info("celery-tuning: tuning Redis %s answered in %.2f ms (prefix %r)",
                    url, rtt * 1000, runtime.config.key_prefix)
        self._start_mover(worker)

    def _start_mover(self, worker: Any) -> None:
        config = self.runtime.config
        if config.defer_via != "park" or not self.runtime.needs_redis():
            return
        if not config.park_mover:
            from .steps.fair import start_consumer_registration

            self.fair_registration = start_consumer_registration(worker.app)
            return
        from .mover import Mover

        self.mover = Mover(worker.app).start()
        logger.info("celery-tuning: parking mover started (claim TTL %gs)", config.park_claim_ttl)

    def stop(self, worker: Any) -> None:
        mover, self.mover = self.mover, None
        if mover is not None:
            mover.stop()
        registration, self.fair_registration = self.fair_registration, None
        if registration is not None:
            registration.stop()

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)

    def terminate(self, worker: Any) -> None:
        # A warm or cold shutdown ends here too (bootsteps call terminate, not stop, when the
        # worker terminates): a mover left running would keep publishing after its worker is gone.
        self.stop(worker)
