"""The cache's single-flight locks as leases: one renewer thread per process keeps its leaders' locks alive."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from ..errors import StorageError
from .process import PerProcess
from .redis import RedisConnector

__all__ = ["LockRenewer", "lock_renewer"]

logger = logging.getLogger("celery_tuning.cache")


class _HeldLock(NamedTuple):
    connector: RedisConnector
    group: str  # the key's hash tag: on a Cluster, locks of one group share a slot
    key: str
    token: str
    lease_ms: int
    deadline: float  # LockRenewer.clock(): the lock's life ends here whatever happens


class _Renewals:
    """What one process of a :class:`LockRenewer` holds: its locks, its thread, its condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.held: Dict[Tuple[str, str], _HeldLock] = {}
        self.thread: Optional[threading.Thread] = None
        #: The lease (ms) the thread's timed wait is paced for, None while it waits for a first
        #: lock: a lock held with a lease no shorter than this needs no wake-up.
        self.paced_for: Optional[int] = None


class LockRenewer:
    """Keeps this process's single-flight locks alive while their leaders compute.

    A lock is taken for one short lease, not for the longest a leader may take: a leader
    killed mid-compute (OOM, SIGKILL, a lost host) stops renewing, and its followers take over
    within one lease. A live leader keeps its lock for as long as it computes, up to its
    ``deadline`` (``lock_timeout`` after it asked), where the lock runs out whatever happens:
    the last renewal sets no more than what is left.

    One thread per process renews every held lock each third of a lease, in one round trip per
    connector (one per hash tag on a Cluster, where the keys live in different slots), through
    ``cache_renew.lua``, which extends a lock only while it holds our token. A lock lost
    meanwhile (a stall longer than the lease, a flush, a failover) is dropped, not taken back: a
    follower polls every 200 ms at most, so it has taken the lock or will before any renewal
    could, and taking it back could revive a lock its leader has just released.

    The thread waits on a condition while nothing is held: a process that holds no lock sends
    nothing, and when it does hold one the renewal borrows the pool's idle connection (the
    task's own thread is busy computing), so no second pool connection is needed. The held
    locks, the thread and the condition are a :class:`~celery_tuning.storage.process.PerProcess`
    value: a forked child starts with none of its parent's locks (they are the parent's to
    renew) and starts its own thread on first use.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._state: PerProcess[_Renewals] = PerProcess(_Renewals, name="cache-lock-renewals")
        self._warned = False

    def hold(self, connector: RedisConnector, group: str, key: str, token: str, lease_ms: int,
             deadline: float) -> None:
        """Renew ``key`` (held with ``token`` for ``lease_ms``) until :meth:`drop` or ``deadline``."""
        state = self._state.get()
        with state.cond:
            state.held[(key, token)] = _HeldLock(connector, group, key, token, lease_ms, deadline)
            if state.thread is None or not state.thread.is_alive():
                thread = threading.Thread(target=self._run, args=(state,), name="celery-tuning-cache-locks",
                                          daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # out of threads, or at interpreter exit: the lock lives one lease
                    del state.held[(key, token)]
                    return
                state.thread = thread
            paced_for = state.paced_for
            if paced_for is None or lease_ms < paced_for:
                state.cond.notify()  # else its timed wait renews this lock soon enough already

    def drop(self, key: str, token: str) -> None:
        """Stop renewing ``key`` (its leader is done; the store or release that follows frees it)."""
        state = self._state.peek()
        if state is None:
            return
        with state.cond:
            state.held.pop((key, token), None)

    def held(self) -> int:
        """Locks this process renews now."""
        state = self._state.peek()
        if state is None:
            return 0
        with state.cond:
            return len(state.held)

    def renew_once(self) -> int:
        """Renew every held lock now; returns how many were still ours. Never raises because Redis
        is away: the locks then run out one lease after their last renewal, as a dead leader's do."""
        state = self._state.peek()
        if state is None:
            return 0
        now = self.clock()
        with state.cond:
            held = list(state.held.values())
            for lock in held:
                if lock.deadline <= now:
                    del state.held[(lock.key, lock.token)]  # its last renewal set no more than this
        calls: Dict[Tuple[int, str], List[_HeldLock]] = {}
        for lock in held:
            if lock.deadline > now:
                group = lock.group if lock.connector.target.kind == "cluster" else ""
                calls.setdefault((id(lock.connector), group), []).append(lock)
        renewed = 0
        for locks in calls.values():
            args: List[Any] = []
            for lock in locks:
                args += [lock.token, max(1, min(lock.lease_ms, int((lock.deadline - now) * 1000)))]
            try:
                replies = locks[0].connector.evalsha("cache_renew", [lock.key for lock in locks], args)
            except StorageError as exc:
                if not self._warned:
                    self._warned = True
                    logger.warning("cache: could not renew single-flight locks (%s); followers may compute "
                                   "again once they run out", exc)
                continue
            self._warned = False
            with state.cond:
                for lock, ours in zip(locks, replies):
                    if int(ours):
                        renewed += 1
                    else:
                        state.held.pop((lock.key, lock.token), None)
        return renewed

    def _run(self, state: _Renewals) -> None:
        # While leaders come and go (a busy worker: a lock held for each miss), the thread keeps
        # a timed wait paced for their lease, so holding a lock wakes nothing; it waits for a
        # first lock again only after a whole interval in which nothing was held.
        last = self.clock()
        while True:
            with state.cond:
                while True:
                    now = self.clock()
                    if state.held:
                        lease = min(lock.lease_ms for lock in state.held.values())
                    else:
                        lease = state.paced_for or 0
                        if not lease or now >= last + _interval(lease):
                            state.paced_for = None
                            state.cond.wait()
                            last = self.clock()
                            continue
                    remaining = last + _interval(lease) - now
                    if remaining <= 0:
                        break
                    state.paced_for = lease
                    state.cond.wait(remaining)
                renew = bool(state.held)
            if renew:
                try:
                    self.renew_once()
                except Exception:  # the renewer must outlive any one bad round
                    logger.exception("cache: single-flight lock renewal failed")
            last = self.clock()


def _interval(lease_ms: int) -> float:
    """Seconds between renewals of locks held for ``lease_ms``: a third of the lease."""
    return max(lease_ms / 3000, 0.05)


_renewer = LockRenewer()


def lock_renewer() -> LockRenewer:
    """This process's :class:`LockRenewer` (its locks and thread are per process)."""
    return _renewer
