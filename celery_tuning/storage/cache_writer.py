"""The cache's write-behind: one background writer per process and connector, pipelining stores."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from ..errors import StorageError
from .process import PerProcess
from .redis import RedisConnector

__all__ = ["StoreWriter", "existing_writer", "flush_writers", "writer_for"]

logger = logging.getLogger("celery_tuning.cache")

#: One deferred store: cache_store.lua's KEYS and ARGV, and who hears of a failure.
_Job = Tuple[List[str], List[Any], Callable[[StorageError], None]]


class _Queue:
    """One process's side of a :class:`StoreWriter`: its jobs, counts, condition and thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.jobs: Deque[_Job] = deque()
        self.bytes = 0
        self.submitted = 0
        self.done = 0
        self.thread: Optional[threading.Thread] = None
        #: The thread waits with no job queued (a submit must wake it).
        self.idle = False
        #: When the oldest queued job was queued (monotonic).
        self.first_at = 0.0
        #: A flush() waits: write what is queued now, without lingering.
        self.urgent = 0


class StoreWriter:
    """Writes the cache's stores from one background thread per process, pipelined in batches.

    A task whose result was computed on a cache miss need not wait for Redis to take the value:
    the value is in L1 already, and the single-flight lock stays held until the store lands, so
    a caller elsewhere waits for the value instead of computing it again. Stores queued while
    the thread is busy, or within ``linger`` seconds of the first, go out together in one
    round trip: in a busy worker that cuts the client CPU per store to a fraction of a round
    trip's, and delays a value's arrival in Redis by at most ``linger``.

    A lookup of this process may carry what is queued (:meth:`take`, then :meth:`taken`): the
    stores go out ahead of it in its own round trip, on its connection, so a busy worker sends
    no round trip and wakes no thread for its stores; the thread writes what no lookup took
    within ``linger`` of being queued (an idle worker), or at once when someone flushes.

    Bounded in jobs and bytes: beyond either, :meth:`submit` answers False and the caller
    stores synchronously. The queue and its thread are a
    :class:`~celery_tuning.storage.process.PerProcess` value, started lazily: a forked child
    drops the jobs it inherited (its parent writes them) and starts its own. Flushed at exit by
    ``atexit`` and, in workers, by the ``worker_process_shutdown`` and ``worker_shutdown`` signals.
    """

    def __init__(self, connector: RedisConnector, *, max_jobs: int = 10_000, max_bytes: int = 64 * 2**20,
                 max_batch: int = 256, linger: float = 0.01) -> None:
        self.connector = connector
        self.linger = linger
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self._queue: PerProcess[_Queue] = PerProcess(_Queue, name="cache-store-writer")

    def submit(self, keys: List[str], args: List[Any], on_error: Callable[[StorageError], None]) -> bool:
        """Queue one ``cache_store`` call; False when full or when no thread can be started
        (the caller then stores itself)."""
        queue = self._queue.get()
        size = len(args[0])
        with queue.cond:
            if queue.thread is None or not queue.thread.is_alive():
                thread = threading.Thread(target=self._run, args=(queue,), name="celery-tuning-cache-writer",
                                          daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # "can't start new thread": out of threads, or at interpreter exit
                    return False
                queue.thread = thread
            if len(queue.jobs) >= self.max_jobs or queue.bytes + size > self.max_bytes:
                return False
            if not queue.jobs:
                queue.first_at = time.monotonic()
            queue.jobs.append((keys, args, on_error))
            queue.bytes += size
            queue.submitted += 1
            if queue.idle:  # else the thread is lingering already, and will look again
                queue.cond.notify()
        return True

    def take(self) -> List[_Job]:
        """Take the queued stores (at most ``max_batch``) for a lookup to send ahead of itself.

        The caller must hand them to :meth:`taken` once they were sent (or failed), so
        :meth:`flush` knows when they are in Redis.
        """
        queue = self._queue.peek()
        if queue is None or not queue.jobs:
            return []
        with queue.cond:
            jobs = queue.jobs
            if len(jobs) <= self.max_batch:
                batch = list(jobs)
                jobs.clear()
                queue.bytes = 0
            else:
                batch = [jobs.popleft() for _ in range(self.max_batch)]
                queue.bytes -= sum(len(args[0]) for _, args, _ in batch)
                queue.first_at = time.monotonic()  # what is left lingers no longer than one more linger
        return batch

    def taken(self, batch: List[_Job], error: Optional[StorageError] = None) -> None:
        """Stores from :meth:`take` were sent; ``error``: they failed (each job's handler hears of it)."""
        if error is not None:
            _report(batch, error)
        queue = self._queue.peek()
        if queue is None:
            return
        with queue.cond:
            queue.done += len(batch)
            if queue.urgent:
                queue.cond.notify_all()

    def pending(self) -> int:
        """Stores queued or being written."""
        queue = self._queue.peek()
        return 0 if queue is None else queue.submitted - queue.done

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every store submitted so far was written (or failed); False on timeout."""
        queue = self._queue.peek()
        if queue is None:
            return True  # nothing was submitted in this process
        deadline = time.monotonic() + timeout
        with queue.cond:
            target = queue.submitted
            if queue.done >= target:
                return True
            queue.urgent += 1
            queue.cond.notify_all()  # the thread writes what is queued now
            try:
                while queue.done < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    queue.cond.wait(remaining)
            finally:
                queue.urgent -= 1
        return True

    def _run(self, queue: _Queue) -> None:
        cond = queue.cond
        while True:
            with cond:
                while True:
                    if not queue.jobs:
                        queue.idle = True
                        cond.wait()
                        queue.idle = False
                        continue
                    if queue.urgent:
                        break
                    # Let a lookup carry them, or a few more stores join this batch (the CPU per
                    # store drops); write what is still here once the oldest has waited ``linger``.
                    remaining = queue.first_at + self.linger - time.monotonic()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
                batch = [queue.jobs.popleft() for _ in range(min(len(queue.jobs), self.max_batch))]
                queue.bytes -= sum(len(args[0]) for _, args, _ in batch)
                if queue.jobs:
                    queue.first_at = time.monotonic()
            try:
                self.connector.evalsha_many("cache_store", [(keys, args) for keys, args, _ in batch])
            except StorageError as exc:
                _report(batch, exc)
            except Exception:  # never let the writer die with jobs behind it
                logger.exception("cache writer failed on a batch of %d stores", len(batch))
            finally:
                with cond:
                    queue.done += len(batch)
                    cond.notify_all()


def _report(batch: List[_Job], exc: StorageError) -> None:
    for _, _, on_error in batch:
        try:
            on_error(exc)
        except Exception:  # a reporting bug must not stop the writer
            logger.exception("cache store error handler failed")


class _Writers:
    """This process's writers, one per connector."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_connector: Dict[int, StoreWriter] = {}


_writers: PerProcess[_Writers] = PerProcess(_Writers, name="cache-store-writers")


def writer_for(connector: RedisConnector) -> StoreWriter:
    """The process-wide :class:`StoreWriter` of this connector (made now if there is none)."""
    writers = _writers.get()
    found = writers.by_connector.get(id(connector))
    if found is not None and found.connector is connector:
        return found
    with writers.lock:
        found = writers.by_connector.get(id(connector))
        if found is None or found.connector is not connector:
            found = StoreWriter(connector)
            writers.by_connector[id(connector)] = found
        return found


def existing_writer(connector: RedisConnector) -> Optional[StoreWriter]:
    """This connector's writer in this process, or None when nothing was deferred through it
    (makes none)."""
    writers = _writers.peek()
    found = None if writers is None else writers.by_connector.get(id(connector))
    return found if found is not None and found.connector is connector else None


def flush_writers(timeout: float = 2.0) -> bool:
    """Wait for every deferred cache store of this process (at exit); False if one timed out."""
    writers = _writers.peek()
    if writers is None:
        return True
    deadline = time.monotonic() + timeout
    ok = True
    for writer in list(writers.by_connector.values()):
        ok = writer.flush(max(0.0, deadline - time.monotonic())) and ok
    return ok


atexit.register(flush_writers)
