"""One fork-safe holder for everything that must belong to one process: clients, threads, locks.

A prefork pool child inherits its parent's memory but none of its threads, and it must never use
the parent's sockets. Every piece of per-process state therefore lives in a :class:`PerProcess`:
the value is built lazily on first use, and dropped in a forked child by one
``os.register_at_fork`` hook shared by all holders, so the child builds its own on first use.
The hot path (:meth:`PerProcess.get` once built) is one attribute read and one comparison.

Example::

    from celery_tuning.storage.process import PerProcess

    class Renewer:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.thread: Optional[threading.Thread] = None

    # one Renewer per process; a forked child starts with a fresh one (new lock, no thread)
    _renewer = PerProcess(Renewer, name="cache-renewer")

    def renew_later() -> None:
        renewer = _renewer.get()
        with renewer.lock:
            ...

    # a client per process, plus a callback the child runs with the parent's value at fork
    _client = PerProcess(make_client, on_fork=lambda parent_client: None)

Only the forking thread survives ``fork()``, so the hook runs in the child before any other code:
locks held by the parent's threads at that moment are left behind with the parent's value.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from typing import Any, Callable, Generic, Optional, TypeVar, cast

__all__ = ["PerProcess", "after_fork_in_child"]

logger = logging.getLogger("celery_tuning.process")

T = TypeVar("T")

_UNSET: Any = object()


class PerProcess(Generic[T]):
    """A value of this process: built by ``factory()`` on first use, rebuilt in a forked child.

    Arguments:
        factory: Builds the value (called once per process, under the holder's lock; when it
            raises, nothing is kept and the next :meth:`get` tries again).
        on_fork: Called in a forked child with the value the parent had built (never with an
            unbuilt one), after the holder has dropped it: for clean-up that must not touch the
            parent's resources (forget its state; never close its sockets gracefully).
        name: For ``repr`` and logs.
    """

    __slots__ = ("__weakref__", "_factory", "_lock", "_on_fork", "_value", "name")

    def __init__(self, factory: Callable[[], T], *, on_fork: Optional[Callable[[T], None]] = None,
                 name: str = "") -> None:
        self._factory = factory
        self._on_fork = on_fork
        self._lock = threading.Lock()
        self._value: Any = _UNSET
        self.name = name or getattr(factory, "__qualname__", repr(factory))
        _register(self)

    def __repr__(self) -> str:
        state = "built" if self._value is not _UNSET else "unbuilt"
        return f"<PerProcess {self.name} ({state})>"

    def get(self) -> T:
        """This process's value, built now if this process has none yet."""
        value = self._value
        if value is not _UNSET:
            return cast(T, value)
        with self._lock:
            if self._value is _UNSET:
                self._value = self._factory()
            return cast(T, self._value)

    def peek(self) -> Optional[T]:
        """This process's value if it was built, else None (never builds one)."""
        value = self._value
        return None if value is _UNSET else cast(T, value)

    def built(self) -> bool:
        """Whether this process has built its value."""
        return self._value is not _UNSET

    def set(self, value: T) -> None:
        """Make ``value`` this process's value (a forked child still starts without it)."""
        with self._lock:
            self._value = value

    def reset(self) -> Optional[T]:
        """Drop this process's value (the next :meth:`get` builds a new one) and return it, if
        there was one, so the caller can close it."""
        with self._lock:
            value, self._value = self._value, _UNSET
        return None if value is _UNSET else cast(T, value)

    def _forget_after_fork(self) -> None:
        # The parent's threads may have held this lock at fork(): it would never be released here.
        self._lock = threading.Lock()
        value, self._value = self._value, _UNSET
        if value is not _UNSET and self._on_fork is not None:
            try:
                self._on_fork(value)
            except Exception:  # one holder's clean-up must not cost the others theirs
                logger.exception("celery-tuning: after-fork clean-up of %s failed", self.name)


# Holders in creation order (a dict keeps it), weakly: a holder nobody uses any more goes away.
_holders: weakref.WeakValueDictionary[int, PerProcess[Any]] = weakref.WeakValueDictionary()
_callbacks: list[Callable[[], None]] = []
_counter = itertools.count()
_registry_lock = threading.Lock()


def _register(holder: PerProcess[Any]) -> None:
    with _registry_lock:
        _holders[next(_counter)] = holder


def after_fork_in_child(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback()`` in every forked child, after the holders were reset (usable as a
    decorator). For module state that is no :class:`PerProcess` value."""
    with _registry_lock:
        _callbacks.append(callback)
    return callback


def _reset_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # a parent thread may have held it at fork()
    for key in sorted(_holders.keys()):
        holder = _holders.get(key)
        if holder is not None:
            holder._forget_after_fork()
    for callback in list(_callbacks):
        try:
            callback()
        except Exception:
            logger.exception("celery-tuning: after-fork callback %r failed", callback)


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork() to survive
    os.register_at_fork(after_in_child=_reset_in_child)
