"""Per-queue in-flight caps inside one worker (``tuning_queue_concurrency``).

Celery has one concurrency number per worker. This consumer bootstep gives queues their own cap
inside it: when ``cap`` requests of a queue are in the worker (handed to the pool, waiting for a
pool slot, or running), the worker stops consuming that queue, so its messages stay in the broker
and do not take prefetch slots other queues need. It consumes the queue again as soon as one of
them is done.

How it works, all in the worker's main process and on the consumer's event loop:

* The step wraps ``consumer.on_task_request`` before the ``Tasks`` step builds the task strategies,
  so every request passes through :meth:`QueueGate.handle` right before it would go to the pool.
* A request of a capped queue goes to the pool while the queue is under its cap; otherwise it is
  *held* (still reserved and unacknowledged, so a worker that dies loses nothing: the broker
  redelivers it). Holding only happens for the few messages already on their way when the queue
  was cancelled.
* A timer on the event loop notices finished requests (Celery's worker state drops them when they
  are ready), hands held ones to the pool and starts consuming the queue again.

The cap needs the worker's event loop (Redis and RabbitMQ brokers with the prefork, threads or
solo pool); on a worker without it (gevent, eventlet, transports without async support) the step
logs that the caps are not applied.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set

from celery import bootsteps
from celery.worker import state as worker_state

from .runtime import runtime_for

__all__ = ["QueueCapsStep", "QueueGate"]

logger = logging.getLogger("celery_tuning.worker")

#: How often finished requests are noticed (seconds); a slot is reused at most this late.
POLL_INTERVAL = 0.02


def _alive(request: Any) -> bool:
    """Whether the worker still holds ``request`` (reserved, waiting for the pool or running)."""
    return request in worker_state.active_requests or request in worker_state.reserved_requests


class QueueGate:
    """Admission of requests by queue, with per-queue caps.

    Arguments:
        consumer: The worker's :class:`celery.worker.consumer.Consumer`.
        caps: Queue name -> maximum requests of that queue in the worker at once.
        downstream: What a request admitted goes to (the worker's ``on_task_request``).
    """

    def __init__(self, consumer: Any, caps: Mapping[str, int], downstream: Callable[[Any], Any]) -> None:
        self.consumer = consumer
        self.caps = dict(caps)
        self.downstream = downstream
        self.running: Dict[str, List[Any]] = {q: [] for q in caps}
        self.held: Dict[str, Deque[Any]] = {q: deque() for q in caps}
        self.paused: Set[str] = set()
        self.queues: Dict[str, Any] = {}
        self.routes: Dict[Any, str] = {}
        self._timer: Any = None

    # -- lifecycle (consumer thread) ---------------------------------------------------------

    def start(self) -> None:
        """The task consumer is (re)created: learn its queues and re-apply the caps."""
        task_consumer = self.consumer.task_consumer
        self.queues = {q.name: q for q in task_consumer.queues}
        self.routes = {}
        for q in task_consumer.queues:
            exchange = q.exchange.name if q.exchange is not None else ""
            self.routes[(exchange, q.routing_key)] = q.name
            self.routes.setdefault(q.routing_key, q.name)
        self.paused = set()
        missing = sorted(set(self.caps) - set(self.queues))
        if missing:
            logger.info("celery-tuning: tuning_queue_concurrency names queues this worker does not "
                        "consume: %s", ", ".join(missing))
        self.tick()
        self.shutdown()  # a reconnect clears the consumer's timer: schedule afresh
        self._timer = self.consumer.timer.call_repeatedly(POLL_INTERVAL, self.tick)

    def connection_lost(self) -> None:
        """Held requests belong to a dead channel: the broker redelivers them."""
        for queue in self.held:
            self.held[queue].clear()
        self.paused = set()

    def shutdown(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    # -- admission -----------------------------------------------------------------------------

    def queue_of(self, request: Any) -> Optional[str]:
        message = getattr(request, "_message", None)
        info = getattr(message, "delivery_info", None) or request.delivery_info or {}
        tag = info.get("consumer_tag")
        if tag is not None:
            active = getattr(self.consumer.task_consumer, "_active_tags", {}) or {}
            for name, queue_tag in active.items():
                if queue_tag == tag:
                    return str(name)
        routing_key = info.get("routing_key")
        name = self.routes.get((info.get("exchange") or "", routing_key))
        if name is None:
            name = self.routes.get(routing_key)
        return name

    def handle(self, request: Any) -> Any:
        queue = self.queue_of(request)
        if queue not in self.caps:
            return self.downstream(request)
        self._settle(queue)
        if self.held[queue] or len(self.running[queue]) >= self.caps[queue]:
            self.held[queue].append(request)
        else:
            self._admit(queue, request)
        self._update_consuming(queue)
        return None

    def tick(self) -> None:
        """Notice finished requests, admit held ones, pause or resume queues."""
        for queue in self.caps:
            self._settle(queue)
            held, running, cap = self.held[queue], self.running[queue], self.caps[queue]
            while held and len(running) < cap:
                self._admit(queue, held.popleft())
                self._settle(queue)
            self._update_consuming(queue)

    def _admit(self, queue: str, request: Any) -> None:
        self.running[queue].append(request)
        try:
            self.downstream(request)
        finally:
            if not _alive(request):  # the solo pool runs it right here; revoked ones end at once
                self._settle(queue)

    def _settle(self, queue: str) -> None:
        running = self.running[queue]
        if running:
            running[:] = [r for r in running if _alive(r)]

    def _update_consuming(self, queue: str) -> None:
        busy = len(self.running[queue]) + len(self.held[queue])
        if busy >= self.caps[queue]:
            if queue not in self.paused and queue in self.queues:
                self.paused.add(queue)
                self.consumer.task_consumer.cancel_by_queue(queue)
                logger.debug("celery-tuning: queue %s at its cap of %d, not consuming it", queue, self.caps[queue])
        elif queue in self.paused:
            self.paused.discard(queue)
            task_consumer = self.consumer.task_consumer
            task_consumer.add_queue(self.queues[queue])
            task_consumer.consume()
            logger.debug("celery-tuning: queue %s below its cap, consuming it again", queue)


class QueueCapsStep(bootsteps.StartStopStep):
    """Consumer bootstep applying ``tuning_queue_concurrency``."""

    label = "celery-tuning queue caps"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.gate: Optional[QueueGate] = None
        runtime = runtime_for(c.app)
        caps = runtime.config.queue_concurrency
        if not caps or not runtime.enabled:
            return
        if not getattr(c.controller, "use_eventloop", False):
            logger.warning("celery-tuning: tuning_queue_concurrency needs the worker's event loop "
                           "(prefork, threads or solo pool on a Redis or RabbitMQ broker); "
                           "not applied on this worker")
            return
        # Before the Tasks step builds its strategies, which capture on_task_request.
        self.gate = QueueGate(c, caps, c.on_task_request)
        c.on_task_request = self.gate.handle
        c.tuning_queue_gate = self.gate

    def start(self, c: Any) -> None:
        if self.gate is not None:
            self.gate.start()
            logger.info("celery-tuning: per-queue caps %s",
                        ", ".join(f"{q}={n}" for q, n in sorted(self.gate.caps.items())))

    def stop(self, c: Any) -> None:
        if self.gate is not None:
            self.gate.connection_lost()

    def shutdown(self, c: Any) -> None:
        if self.gate is not None:
            self.gate.shutdown()
