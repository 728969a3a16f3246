"""Per-queue in-flight caps inside one worker (``tuning_queue_concurrency``).

Celery has one concurrency number per worker. This consumer bootstep gives queues their own cap
inside it: when ``cap`` requests of a queue are in the worker (handed to the pool, waiting for a
pool slot, or running), the worker stops consuming that queue, so its messages stay in the broker
and do not take prefetch slots other queues need. It consumes the queue again as soon as one of
them is done.

How it works, all in the worker's main process and on the consumer's event loop:

* The step wraps ``consumer.on_task_request`` before the ``Tasks`` step builds the task strategies,
  so every request passes through :meth:`QueueGate.handle` right before it would go to the pool.
* The queue of a request is the consumer's own (the consumer tag the broker stamps on a delivery,
  RabbitMQ), or else the queue its exchange and routing key lead to, resolved exactly as the
  metrics label it (:func:`.receivers.queue_label`: a queue named by the key, or bound to it by a
  direct or topic binding, or a fanout exchange's queue). Redis deliveries carry no consumer tag.
* A request of a capped queue goes to the pool while the queue is under its cap. A surplus one (a
  message already on its way when the queue was cancelled, a countdown task that fell due, one
  out of Celery's own rate limit) is *held* on RabbitMQ: reserved and unacknowledged, so a worker
  that dies loses nothing (the broker redelivers it). On Redis it is put back in the broker
  instead: Redis hands an unacknowledged message to a worker again once it is older than the
  transport's ``visibility_timeout``, and a held one would then run twice. Fanout queues on Redis
  are the exception: consumed through pub/sub, which drops what is published while nobody
  listens, they are never cancelled and their surplus is held.
* A timer on the event loop notices finished requests (Celery's worker state drops them when they
  are ready), hands held ones to the pool and starts consuming the queue again. On Redis it also
  ends the channel's pending ``BRPOP`` (``CLIENT UNBLOCK``): that command names the queues it
  waits on, and kombu re-issues it only when it returns (after up to a second).

The cap needs the worker's event loop (Redis and RabbitMQ brokers with the prefork, threads or
solo pool); on a worker without it (gevent, eventlet, transports without async support) the step
logs that the caps are not applied.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set

import redis
from celery import bootsteps
from celery.worker import state as worker_state

from .receivers import queue_label
from .runtime import runtime_for

__all__ = ["BrpopWaker", "QueueCapsStep", "QueueGate"]

logger = logging.getLogger("celery_tuning.worker")

#: How often finished requests are noticed (seconds); a slot is reused at most this late.
POLL_INTERVAL = 0.02


def _alive(request: Any) -> bool:
    """Whether the worker still holds ``request`` (reserved, waiting for the pool or running)."""
    return request in worker_state.active_requests or request in worker_state.reserved_requests


def _address_forms(sock: Any) -> Set[str]:
    """How Redis's ``CLIENT LIST`` writes the peer address of our end of ``sock``."""
    try:
        local = sock.getsockname()
    except OSError:
        return set()
    if not isinstance(local, tuple) or len(local) < 2:
        return set()  # a unix socket: every client shows the same path
    host, port = local[0], local[1]
    return {f"{host}:{port}", f"[{host}]:{port}"}


class BrpopWaker:
    """Ends the kombu Redis channel's pending ``BRPOP`` so the next one waits on a queue added since.

    kombu issues ``BRPOP q1 q2 … timeout`` (timeout 1 s) and the next one only when it returns, so
    a queue consumed again would wait for a message on another queue or for the timeout.
    ``CLIENT UNBLOCK`` (Redis >= 5) makes the pending one return empty at once: nothing is popped,
    and kombu issues the next ``BRPOP`` with the current queues on the event loop's next turn. The
    connection's client id is looked up once per connection in ``CLIENT LIST`` by its address. Where
    that is not possible (an ACL without ``CLIENT``, a proxy or NAT that changes the address, a
    unix socket), it logs so once and the queue waits for the ``BRPOP`` to return as before.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._sock: Any = None
        self._id: Optional[int] = None
        self.disabled = False

    def wake(self) -> bool:
        """Unblock the pending ``BRPOP``; whether one was ended."""
        connection = getattr(self.channel, "_in_poll", None)
        sock = getattr(connection, "_sock", None) if connection else None
        if self.disabled or sock is None:
            return False  # no BRPOP pending: the next one is issued with the current queues
        try:
            with self.channel.conn_or_acquire() as client:
                if sock is not self._sock:
                    self._sock, self._id = sock, self._client_id(client, sock)
                    if self._id is None:
                        self._give_up("its connection is not in CLIENT LIST under its address "
                                      "(a proxy or NAT in between, or a unix socket)")
                        return False
                return bool(client.execute_command("CLIENT", "UNBLOCK", self._id))
        except redis.ResponseError as exc:  # Redis < 5, or an ACL without CLIENT: for good
            self._give_up(f"{exc.__class__.__name__}: {exc}")
        except Exception as exc:  # the broker connection's trouble: the consumer deals with it
            logger.debug("celery-tuning: could not end the pending BRPOP: %r", exc)
            self._sock = None
        return False

    @staticmethod
    def _client_id(client: Any, sock: Any) -> Optional[int]:
        forms = _address_forms(sock)
        if not forms:
            return None
        for entry in client.client_list():
            if entry.get("addr") in forms:
                return int(entry["id"])
        return None

    def _give_up(self, why: str) -> None:
        self.disabled = True
        logger.info("celery-tuning: cannot end the Redis broker's pending BRPOP (%s): a queue below its "
                    "cap is consumed again when that BRPOP returns, within the transport's brpop_timeout "
                    "(1 s)", why)


def _put_back_surplus(channel: Any) -> bool:
    """Whether the broker gives unacknowledged messages to a worker again after a time (Redis)."""
    return hasattr(channel, "visibility_timeout")


def _restore_to_queue(message: Any, queue: str) -> bool:
    """Put an unacknowledged Redis message back at the far end of ``queue`` only (one MULTI, as
    kombu's restore does: out of the unacked set and into the list together). False when the
    channel is not kombu's Redis channel as this version knows it (then kombu requeues it)."""
    from kombu.transport.virtual import QoS as VirtualQoS
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import dumps, loads

    channel: Any = getattr(message, "channel", None)
    qos: Any = getattr(channel, "qos", None)
    needed = (getattr(qos, "unacked_key", None), getattr(qos, "_remove_from_indices", None),
              getattr(channel, "_q_for_pri", None), getattr(channel, "_get_message_priority", None),
              getattr(channel, "conn_or_acquire", None))
    if any(part is None for part in needed):
        return False
    tag = message.delivery_tag

    def restore(pipe: Any) -> None:
        raw = pipe.hget(qos.unacked_key, tag)
        pipe.multi()
        qos._remove_from_indices(tag, pipe)
        if raw:
            payload = loads(bytes_to_str(raw))[0]
            priority = channel._get_message_priority(payload, reverse=False)
            pipe.lpush(channel._q_for_pri(queue, priority), dumps(payload))

    with channel.conn_or_acquire() as client:
        client.transaction(restore, qos.unacked_key)
    VirtualQoS.ack(qos, tag)  # out of the channel's delivered set (kombu's reject does the same)
    return True


def _soft_pause(channel: Any, paused: Set[str]) -> Optional[Callable[[], None]]:
    """On kombu's Redis channel: pause a queue by leaving it out of the BRPOP while its consumer
    stays, and return the function that applies ``paused`` (None on other transports).

    Cancelling the consumer instead raced with the BRPOP in flight: a message it fetched for a
    queue cancelled meanwhile has no consumer, and kombu requeues such a message through its
    exchange, which copies it into every queue bound to its routing key. Kept, the consumer
    takes it and the gate puts it back in its own queue. kombu rebuilds the BRPOP's queue list
    on every consume and cancel, so that rebuild is what leaves the paused queues out."""
    cycle = getattr(channel, "_queue_cycle", None)
    if cycle is None or not hasattr(cycle, "update") or not hasattr(channel, "active_queues"):
        return None

    def apply() -> None:
        cycle.update([q for q in channel.active_queues if q not in paused])

    channel._update_queue_cycle = apply  # kombu calls it after every consume and cancel
    return apply


def _pubsub_queues(channel: Any) -> Set[str]:
    """Queues the channel consumes through pub/sub (kombu's Redis fanout): cancelling drops messages."""
    return {str(name) for name in (getattr(channel, "_fanout_queues", None) or {})}


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
        #: Every consumer tag this task consumer has used -> its queue (a tag stays on deliveries
        #: that were on their way when the queue was cancelled).
        self.tags: Dict[Any, str] = {}
        #: Surplus requests go back to the broker (Redis) rather than being held.
        self.put_back = False
        #: Queues consumed through pub/sub (fanout on Redis): never cancelled (that would drop
        #: their messages), their surplus is held.
        self.hold_only: Set[str] = set()
        self.waker: Optional[BrpopWaker] = None
        #: Redis: pause by leaving the queue out of the BRPOP, the consumer kept (see _soft_pause).
        self._soft: Optional[Callable[[], None]] = None
        self._timer: Any = None

    # -- lifecycle (consumer thread) ---------------------------------------------------------

    def start(self) -> None:
        """The task consumer is (re)created: learn its queues and re-apply the caps."""
        task_consumer = self.consumer.task_consumer
        self.queues = {q.name: q for q in task_consumer.queues}
        self.tags = {}
        self._learn_tags()
        channel = getattr(task_consumer, "channel", None)
        self.put_back = _put_back_surplus(channel)
        self.hold_only = _pubsub_queues(channel)
        self.waker = BrpopWaker(channel) if hasattr(channel, "_in_poll") and hasattr(
            channel, "conn_or_acquire") else None
        self.paused = set()
        self._soft = _soft_pause(channel, self.paused)
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
        self.paused.clear()

    def shutdown(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    # -- admission -----------------------------------------------------------------------------

    def _learn_tags(self) -> None:
        active = getattr(self.consumer.task_consumer, "_active_tags", None) or {}
        for name, tag in active.items():
            self.tags[tag] = str(name)

    def queue_of(self, request: Any) -> Optional[str]:
        """The queue ``request`` came from: its consumer's, or the one its routing leads to."""
        message = getattr(request, "_message", None)
        info = getattr(message, "delivery_info", None) or request.delivery_info or {}
        tag = info.get("consumer_tag")
        if tag is not None:
            if tag not in self.tags:
                self._learn_tags()
            if tag in self.tags:
                return self.tags[tag]
        task = getattr(request, "task", None)
        return queue_label(self.consumer.app, info, getattr(task, "queue", None))

    def handle(self, request: Any) -> Any:
        queue = self.queue_of(request)
        if queue not in self.caps:
            return self.downstream(request)
        self._settle(queue)
        if self.held[queue] or len(self.running[queue]) >= self.caps[queue]:
            if self.put_back and queue not in self.hold_only:
                self._put_back(queue, request)
            else:
                self.held[queue].append(request)
        else:
            self._admit(queue, request)
        self._update_consuming(queue)
        return None

    def _put_back(self, queue: str, request: Any) -> None:
        """Return a surplus request's message to the broker (it comes again once there is room).

        To ``queue`` alone: kombu's own requeue routes the message through its exchange again,
        which copies it into every queue bound to its routing key (a topic audit queue, another
        queue on the same key), and those copies run twice."""
        message = getattr(request, "_message", None) or getattr(request, "message", None)
        if message is not None and _restore_to_queue(message, queue):
            request.acknowledged = True
            message._state = "REJECTED"
            request.send_event("task-rejected", requeue=True)
        else:
            request.reject(requeue=True)
        worker_state.task_ready(request)
        logger.debug("celery-tuning: queue %s at its cap, task %s put back in the broker", queue, request.id)

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
            if queue not in self.paused and queue in self.queues and queue not in self.hold_only:
                self.paused.add(queue)
                if self._soft is not None:
                    self._soft()
                else:
                    self.consumer.task_consumer.cancel_by_queue(queue)
                logger.debug("celery-tuning: queue %s at its cap of %d, not consuming it", queue, self.caps[queue])
        elif queue in self.paused:
            self.paused.discard(queue)
            if self._soft is not None:
                self._soft()
            else:
                task_consumer = self.consumer.task_consumer
                task_consumer.add_queue(self.queues[queue])
                task_consumer.consume()
                self._learn_tags()
            if self.waker is not None:
                self.waker.wake()
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
