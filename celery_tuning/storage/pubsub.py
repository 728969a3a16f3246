"""One listener thread per process, connector and channel: the pub/sub the capabilities share.

The cache hears invalidations on its channel and the breakers hear recorded failures on theirs;
both need the same care: a thread started lazily and again after ``fork()`` (threads do not
survive it), a subscription that counts only once the server confirms it, reconnection with
backoff, and a way for callers to know that messages may have been missed meanwhile (a new
``session`` and the ``on_subscribed`` callbacks on every confirmed subscription).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

from ..errors import StorageError
from .process import PerProcess, after_fork_in_child
from .redis import REDIS_ERRORS, RedisConnector

__all__ = ["ChannelListener", "channel_listener"]

logger = logging.getLogger("celery_tuning.pubsub")

_LISTENER_ERRORS: Tuple[Type[BaseException], ...] = (*REDIS_ERRORS, StorageError)


class _Subscription:
    """One process's side of a listener: its thread and what that thread has reached."""

    __slots__ = ("lock", "settled", "subscribed", "thread")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.settled = threading.Event()  # the first subscription attempt ended, either way
        self.thread: Optional[threading.Thread] = None

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class ChannelListener:
    """Hands the raw ``data`` of every message on ``channel`` to each handler, in one thread.

    ``subscribed`` is set while a confirmed subscription is up; ``session`` grows by one with
    each, so a value read under an older session tells its reader that messages published in
    between may be lost. The thread and ``subscribed`` belong to one process (a forked child
    starts unsubscribed, with no thread until it uses the listener); the handlers are kept.
    """

    def __init__(self, connector: RedisConnector, channel: str) -> None:
        self.connector = connector
        self.channel = channel
        self.session = 0
        self._handlers: List[Callable[[Any], None]] = []
        self._on_subscribed: List[Callable[[], None]] = []
        self._process: PerProcess[_Subscription] = PerProcess(_Subscription, name=f"listener on {channel}")

    @property
    def subscribed(self) -> threading.Event:
        """Set while this process's thread holds a confirmed subscription."""
        return self._process.get().subscribed

    def add(self, handler: Callable[[Any], None], on_subscribed: Optional[Callable[[], None]] = None) -> None:
        """Hand each message's data to ``handler``; call ``on_subscribed`` on every confirmed
        subscription (messages sent while none was up are lost)."""
        with self._process.get().lock:
            if handler not in self._handlers:
                self._handlers.append(handler)
            if on_subscribed is not None and on_subscribed not in self._on_subscribed:
                self._on_subscribed.append(on_subscribed)
        self.ensure_running()

    def running(self) -> bool:
        state = self._process.peek()
        return state is not None and state.running()

    def ensure_running(self, wait: float = 0.0) -> None:
        """Start the thread in this process if it is not running; then wait up to ``wait`` seconds
        for its first subscription attempt (a Redis that is down costs at most that, once)."""
        state = self._process.get()
        if not state.running():
            with state.lock:
                if not state.running():
                    state.subscribed.clear()
                    state.settled.clear()
                    state.thread = threading.Thread(target=self._run, args=(state,),
                                                    name=f"celery-tuning-{self.channel}", daemon=True)
                    state.thread.start()
        if wait > 0:
            state.settled.wait(wait)

    def _run(self, state: _Subscription) -> None:
        backoff = 0.1
        while True:
            pubsub = None
            try:
                pubsub = self.connector.client.pubsub()
                pubsub.subscribe(self.channel)
                # SUBSCRIBE takes effect when the server confirms it: only then is a message heard.
                deadline = time.monotonic() + max(1.0, self.connector.connect_timeout)
                while True:
                    message = pubsub.get_message(timeout=0.1)
                    if message and message.get("type") == "subscribe":
                        break
                    if time.monotonic() > deadline:
                        raise StorageError(f"no confirmation for SUBSCRIBE to {self.channel}")
                self.session += 1
                state.subscribed.set()
                state.settled.set()
                for callback in list(self._on_subscribed):
                    self._call(callback)
                backoff = 0.1
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        for handler in list(self._handlers):
                            self._call(handler, message.get("data"))
            except _LISTENER_ERRORS:
                state.subscribed.clear()
                state.settled.set()  # nobody should wait for it any longer
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug must not stop the thread for good
                state.subscribed.clear()
                logger.exception("listener failed on %s; restarting", self.channel)
                time.sleep(backoff)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except REDIS_ERRORS:
                        pass

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        # One handler's trouble with one message must not cost the others theirs, nor the
        # subscription (resubscribing drops whatever is published meanwhile).
        try:
            callback(*args)
        except Exception:
            logger.exception("a handler failed on a message from %s", self.channel)


_listeners: Dict[Tuple[int, str], ChannelListener] = {}
_listeners_lock = threading.Lock()


@after_fork_in_child
def _new_listeners_lock() -> None:
    global _listeners_lock
    _listeners_lock = threading.Lock()  # a parent thread may have held it at fork()


def channel_listener(connector: RedisConnector, channel: str) -> ChannelListener:
    """The process-wide listener for this connector and channel."""
    key = (id(connector), channel)
    with _listeners_lock:
        found = _listeners.get(key)
        if found is None:
            found = _listeners[key] = ChannelListener(connector, channel)
        return found
