"""Shared circuit breakers: ``SharedCircuit`` (the breaker) and ``SharedBreaker`` (its pybreaker face).

``SharedCircuit`` keeps a per-process view of the state every process shares through a store,
admits calls and settles them; it knows nothing of pybreaker. ``SharedBreaker`` is a thin
``pybreaker.CircuitBreaker`` around one: what ``celery_tuning.breaker(name)`` returns, so
pybreaker's listeners, ``call``, ``with breaker:`` and ``isinstance`` checks keep working. It
hands pybreaker a storage object that answers from the shared view and writes none of
pybreaker's private state.

(The module is ``circuit`` because ``celery_tuning.breaker`` is the public accessor function.)
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, Hashable, Iterator, Optional, Sequence, Tuple, Type, TypeVar

import pybreaker

from .errors import StorageError, TuningError
from .policy.breaker import CLOSED, HALF_OPEN, OPEN, Snapshot
from .storage.breaker import BreakerParams, BreakerStore, MemoryBreakerStore

__all__ = ["CircuitEvents", "CircuitOpen", "SharedBreaker", "SharedCircuit"]

logger = logging.getLogger("celery_tuning.breaker")

T = TypeVar("T")

#: Called as (breaker name, old state, new state, reason) on every transition this process sees.
TransitionHook = Callable[[str, str, str, str], None]

_ON_REDIS_ERROR = ("local", "closed", "open")

#: Seconds after which callers turned away by a running half-open trial look again.
HALF_OPEN_RECHECK = 1.0

#: What a manual state assignment (``breaker.state = 'open'``) asks the store to do.
_MANUAL_OPS = {OPEN: "open", CLOSED: "close", HALF_OPEN: "half-open"}


class CircuitOpen(pybreaker.CircuitBreakerError, TuningError):
    """The breaker is open (or another worker is running the half-open trial).

    A :class:`pybreaker.CircuitBreakerError`, so existing ``except`` clauses keep working.

    Arguments:
        name: Breaker name.
        retry_after: Seconds until a trial call may be attempted.
    """

    def __init__(self, name: str, retry_after: float) -> None:
        self.name = name
        self.retry_after = float(retry_after)
        super().__init__(name, self.retry_after)

    def __str__(self) -> str:
        return f"circuit breaker {self.name!r} is open; retry after {self.retry_after:.3f}s"


class CircuitEvents:
    """What a :class:`SharedCircuit` tells its owner; every method does nothing by default.

    ``state_changed`` runs for every transition this process makes or notices (its exceptions
    are logged, not raised); the others run around guarded calls, in the caller's thread.
    """

    def state_changed(self, old: str, new: str, reason: str) -> None:
        """The shared state went from ``old`` to ``new``."""

    def before_call(self, func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """:meth:`SharedCircuit.call` admitted ``func`` and is about to call it."""

    def succeeded(self) -> None:
        """A guarded call counted as a success."""

    def failed(self, exc: BaseException) -> None:
        """A guarded call counted as a failure."""


class SharedCircuit:
    """A circuit breaker shared by every process that names it.

    Every state change is one atomic store call (a Lua script on the Redis server's clock).
    The state is cached per process for ``refresh_interval`` seconds, so a successful call
    through a closed breaker costs no round trip; failures are counted centrally, and an open
    state reaches every process within ``refresh_interval``. Calls run concurrently: no lock
    is held around the guarded call. In half-open exactly one trial call runs across all
    processes (a lease of ``trial_timeout`` seconds in the store); the others see it open.

    Arguments:
        name: Breaker name.
        store: Shared store (normally :class:`~celery_tuning.storage.breaker.RedisBreakerStore`).
        params: Its key and numbers (:meth:`BreakerParams.make`).
        neutral: Exception types that count neither as failure nor success (control flow).
        is_failure: Whether a (non-neutral) exception is a failure; False counts it as a
            success (pybreaker's excluded exceptions). Default: every exception fails.
        on_redis_error: ``'local'`` (per-process state), ``'closed'`` or ``'open'``.
        refresh_interval: Seconds a cached state is trusted.
        on_transition: Called for every transition this process makes or notices.
        events: Told of transitions, calls, successes and failures (:class:`CircuitEvents`).
        throw_new_error_on_trip: A guarded call whose failure opens the breaker raises
            :class:`CircuitOpen` (from the call's exception) instead of that exception.
    """

    def __init__(
        self,
        name: str,
        *,
        store: BreakerStore,
        params: BreakerParams,
        neutral: Tuple[Type[BaseException], ...] = (),
        is_failure: Optional[Callable[[BaseException], bool]] = None,
        on_redis_error: str = "local",
        refresh_interval: float = 0.5,
        on_transition: Optional[TransitionHook] = None,
        events: Optional[CircuitEvents] = None,
        throw_new_error_on_trip: bool = True,
    ) -> None:
        if on_redis_error not in _ON_REDIS_ERROR:
            raise ValueError(f"breaker {name!r}: on_redis_error={on_redis_error!r}; expected {_ON_REDIS_ERROR}")
        self.name = name
        self.store = store
        self.params = params
        self.neutral = tuple(neutral)
        self.is_failure: Callable[[BaseException], bool] = is_failure or (lambda exc: True)
        self.on_redis_error = on_redis_error
        self.refresh_interval = float(refresh_interval)
        self.on_transition = on_transition
        self.events = events or CircuitEvents()
        self.throw_new_error_on_trip = throw_new_error_on_trip
        self._fallback = MemoryBreakerStore()
        self._view_lock = threading.Lock()
        self._snap = Snapshot(CLOSED, 0, 0, -1)
        self._fetched = float("-inf")
        self._epoch: Optional[Hashable] = None  # the store's failure epoch when _snap was read
        self._deadline = 0.0  # monotonic time the cached open state ends
        self._degraded = False
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<SharedCircuit {self.name!r} fail_max={self.fail_max} reset_timeout={self.reset_timeout}>"

    @property
    def fail_max(self) -> int:
        return self.params.fail_max

    @property
    def reset_timeout(self) -> float:
        """Seconds the breaker stays open before a trial."""
        return self.params.reset_timeout_us / 1_000_000

    @property
    def degraded(self) -> bool:
        """True while the tuning Redis is failing for this breaker and ``on_redis_error`` decides
        (its last store call failed); False again after the next one that succeeds."""
        return self._degraded

    # -- shared state ---------------------------------------------------------------------

    def _store_apply(self, op: str, token: str = "") -> Snapshot:
        try:
            snap = self.store.apply(self.params, op, token)
        except StorageError as exc:
            if not self._degraded:
                self._degraded = True
                logger.warning("breaker %r: tuning Redis failed (%s); applying on_redis_error=%r",
                               self.name, exc, self.on_redis_error)
            if self.on_redis_error == "closed":
                return Snapshot(CLOSED, 0, 0, self._snap.version, op == "trial")
            if self.on_redis_error == "open":
                return Snapshot(OPEN, self._snap.failures, self.params.reset_timeout_us, self._snap.version)
            return self._fallback.apply(self.params, op, token)
        if self._degraded:
            self._degraded = False
            logger.info("breaker %r: tuning Redis is back", self.name)
        return snap

    def _remember(self, snap: Snapshot, reason: str, epoch: Optional[Hashable]) -> Snapshot:
        with self._view_lock:
            old = self._snap
            self._snap = snap
            self._epoch = epoch
            self._fetched = time.monotonic()
            self._deadline = self._fetched + snap.remaining_us / 1_000_000
        if old.version >= 0 and snap.state != old.state:
            self._transition(old.state, snap.state, reason)
        return snap

    def _transition(self, old: str, new: str, reason: str) -> None:
        level = logging.WARNING if reason not in ("observed",) else logging.INFO
        logger.log(level, "circuit breaker %r: %s -> %s (%s)", self.name, old, new, reason)
        try:
            self.events.state_changed(old, new, reason)
        except Exception:
            logger.exception("breaker listener failed")
        if self.on_transition is not None:
            try:
                self.on_transition(self.name, old, new, reason)
            except Exception:
                logger.exception("breaker transition hook failed")

    def apply(self, op: str, token: str = "", reason: str = "") -> Snapshot:
        """Run one store operation (see ``breaker.lua``) and remember its answer."""
        # Read before the round trip: a failure the answer does not include changes it later.
        epoch = self.store.failure_epoch(self.params)
        return self._remember(self._store_apply(op, token), reason or op, epoch)

    def _failures_may_be_pending(self) -> bool:
        """Whether some process may have recorded a failure this process's view does not show."""
        if self._degraded:
            return False  # Redis is failing: the local fallback's view is exact for this process
        epoch = self.store.failure_epoch(self.params)
        return epoch is None or epoch != self._epoch

    def view(self) -> Snapshot:
        """The cached state; refreshed with one round trip when older than ``refresh_interval``."""
        if time.monotonic() - self._fetched <= self.refresh_interval:
            return self._snap
        return self.apply("status", reason="observed")

    def refresh(self) -> Snapshot:
        """Read the shared state now (one round trip)."""
        return self.apply("status", reason="observed")

    def remaining(self) -> float:
        """Seconds until a trial may run (0 when closed)."""
        snap = self.view()
        if snap.state == CLOSED:
            return 0.0
        return max(0.0, self._deadline - time.monotonic())

    # -- admission and settlement -----------------------------------------------------------

    def looks_closed(self) -> bool:
        """Whether :meth:`admit` will let a call through without a trial (same cached view)."""
        return self.view().state == CLOSED

    def admit(self) -> Optional[str]:
        """Decide whether a call may run now.

        Returns:
            None for an ordinary call; for the half-open trial, the trial's token (a random id
            the store keeps with the lease): hand it back to :meth:`record_success`,
            :meth:`record_failure` or :meth:`settle_failure`, which settle the trial only while
            this caller still holds it.

        Raises:
            CircuitOpen: When the breaker is open or another process holds the trial.
        """
        snap = self.view()
        if snap.state == CLOSED:
            return None
        if snap.state == OPEN and time.monotonic() < self._deadline:
            raise CircuitOpen(self.name, self._deadline - time.monotonic())
        token = secrets.token_hex(8)
        snap = self.apply("trial", token, reason="reset timeout elapsed")
        if snap.granted:
            return token
        if snap.state == CLOSED:
            return None
        wait = snap.remaining_us / 1_000_000
        if snap.state == HALF_OPEN:
            # Another process runs the trial; its lease is only an upper bound (a trial call
            # usually ends in well under a second), so come back soon rather than at its end.
            wait = min(wait, HALF_OPEN_RECHECK)
        raise CircuitOpen(self.name, max(wait, 0.05))

    def classify(self, exc: BaseException) -> Optional[bool]:
        """True: a failure; False: counts as success (excluded exceptions); None: neutral."""
        if isinstance(exc, self.neutral):
            return None
        return self.is_failure(exc)

    def settle(self, trial: Optional[str], exc: Optional[BaseException] = None) -> bool:
        """Account for one admitted call by its outcome; True when this settlement opened the breaker.

        Arguments:
            trial: What :meth:`admit` returned.
            exc: What the call raised; None when it returned.
        """
        return self._settle(False, trial, None) if exc is None else self._settle(self.classify(exc), trial, exc)

    def _settle(self, verdict: Optional[bool], trial: Optional[str], exc: Optional[BaseException]) -> bool:
        """The one place a call's outcome reaches the store and the events.

        ``verdict``: True a failure (``exc``), False a success, None neither (control flow),
        which only frees the trial lease so that another caller can run the trial.
        """
        if verdict is None:
            if trial:
                self.apply("release", trial, reason="trial ended without a verdict")
            return False
        if verdict:
            assert exc is not None, "a failure has an exception"
            before = self._snap.state
            snap = self.apply("failure", trial or "",
                              reason=f"trial call failed: {type(exc).__name__}" if trial
                              else f"{self.fail_max} consecutive failures, last {type(exc).__name__}")
            self.events.failed(exc)
            return snap.state == OPEN and before != OPEN
        # A round trip only when the count may be non-zero: this process's view shows failures,
        # or a failure was announced (by any process) since the view was read, or this process
        # cannot hear announcements right now. Closed with no failures anywhere: none.
        if trial:
            self.apply("success", trial, reason="trial call succeeded")
        elif self._snap.failures > 0 or self._snap.state != CLOSED or self._failures_may_be_pending():
            self.apply("success", reason="success")
        self.events.succeeded()
        return False

    def record_success(self, trial: Optional[str]) -> None:
        """A guarded call succeeded: reset the shared failure count when it may be non-zero."""
        self._settle(False, trial, None)

    def record_failure(self, exc: BaseException, trial: Optional[str]) -> bool:
        """A guarded call failed; returns True when this failure opened the breaker."""
        return self._settle(True, trial, exc)

    def settle_failure(self, exc: BaseException, trial: Optional[str]) -> bool:
        """Account for a guarded call that raised; True when it opened the breaker.

        Control flow (``neutral``) counts as nothing but frees a trial lease; excluded
        exceptions count as success; everything else is a failure.
        """
        return self.settle(trial, exc)

    def _raised(self, exc: BaseException, trial: Optional[str]) -> None:
        """Settle a guarded call that raised ``exc``; the caller re-raises it."""
        if self.settle_failure(exc, trial) and self.throw_new_error_on_trip:
            raise CircuitOpen(self.name, self.reset_timeout) from exc

    # -- guarded calls ----------------------------------------------------------------------

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``func`` through the breaker, concurrently with other callers.

        Raises:
            CircuitOpen: Without calling ``func`` when the breaker is open; and when this call's
                failure opened the breaker (``throw_new_error_on_trip``).
        """
        trial = self.admit()
        self.events.before_call(func, args, kwargs)
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            self._raised(exc, trial)
            raise
        self.record_success(trial)
        return result

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """``with circuit.calling():`` (and ``with circuit:``) guard a block of code."""
        trial = self.admit()
        try:
            yield
        except BaseException as exc:
            self._raised(exc, trial)
            raise
        self.record_success(trial)

    def __enter__(self) -> None:
        # One breaker object is shared by every thread: keep each thread's blocks apart.
        stack = self._local.__dict__.setdefault("stack", [])
        cm = self.calling()
        cm.__enter__()
        stack.append(cm)

    def __exit__(self, *exc_info: Any) -> Any:
        return self._local.stack.pop().__exit__(*exc_info)


# -- the pybreaker face ---------------------------------------------------------------------

_STATE_CLASSES: Dict[str, Any] = {
    CLOSED: pybreaker.CircuitClosedState,
    OPEN: pybreaker.CircuitOpenState,
    HALF_OPEN: pybreaker.CircuitHalfOpenState,
}


class _SharedStateView(pybreaker.CircuitBreakerStorage):
    """pybreaker's storage interface, answered from the shared circuit's cached view."""

    def __init__(self, circuit: SharedCircuit, name: str) -> None:
        super().__init__(name)
        self._circuit = circuit

    @property
    def state(self) -> str:
        return self._circuit.view().state

    @state.setter
    def state(self, state: str) -> None:
        self._circuit.apply({OPEN: "open", CLOSED: "close"}.get(state, "status"), reason="storage")

    def increment_counter(self) -> None:
        self._circuit.apply("failure", reason="storage")

    def reset_counter(self) -> None:
        self._circuit.apply("success", reason="storage")

    def increment_success_counter(self) -> None:  # pragma: no cover - our call path does not use it
        pass

    def reset_success_counter(self) -> None:  # pragma: no cover - our call path does not use it
        pass

    @property
    def counter(self) -> int:
        return self._circuit.view().failures

    @property
    def success_counter(self) -> int:
        return 0

    @property
    def opened_at(self) -> Optional[datetime]:
        snap = self._circuit.view()
        if snap.state != OPEN:
            return None
        elapsed = self._circuit.reset_timeout - snap.remaining_us / 1_000_000
        return datetime.now(timezone.utc) - timedelta(seconds=elapsed)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:  # pragma: no cover - the store keeps opened_at
        pass


class _ListenerEvents(CircuitEvents):
    """Tells a :class:`SharedBreaker`'s pybreaker listeners what its circuit does."""

    def __init__(self, breaker: SharedBreaker) -> None:
        self.breaker = breaker

    def _state(self, name: str) -> Any:
        return _STATE_CLASSES[name](self.breaker, prev_state=None, notify=False)

    def state_changed(self, old: str, new: str, reason: str) -> None:
        listeners = self.breaker.listeners
        if not listeners:
            return
        old_obj, new_obj = self._state(old), self._state(new)
        for listener in listeners:
            try:
                listener.state_change(self.breaker, old_obj, new_obj)
            except Exception:
                logger.exception("breaker listener failed")

    def before_call(self, func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        for listener in self.breaker.listeners:
            listener.before_call(self.breaker, func, *args, **kwargs)

    def succeeded(self) -> None:
        for listener in self.breaker.listeners:
            listener.success(self.breaker)

    def failed(self, exc: BaseException) -> None:
        for listener in self.breaker.listeners:
            listener.failure(self.breaker, exc)


def _through(name: str) -> Any:
    """A property of :class:`SharedBreaker` that reads and writes its circuit's attribute ``name``."""

    def get(self: Any) -> Any:
        return getattr(self.circuit, name)

    def set_(self: Any, value: Any) -> None:
        setattr(self.circuit, name, value)

    return property(get, set_, doc=f"The circuit's ``{name}`` (read and written through).")


class SharedBreaker(pybreaker.CircuitBreaker):
    """A ``pybreaker.CircuitBreaker`` whose state every process shares: a :class:`SharedCircuit`.

    Everything is the circuit's (``.circuit``); this class only speaks pybreaker: its
    listeners hear every transition this process makes or notices, ``current_state``,
    ``state``, ``open()``/``close()``/``half_open()``, ``call``, ``calling`` and ``with``.
    Unlike ``pybreaker.CircuitBreaker.call`` no lock is held around the guarded call.

    Arguments:
        name: Breaker name (hash tag of its Redis key).
        store: Shared store (normally :class:`~celery_tuning.storage.breaker.RedisBreakerStore`).
        fail_max, reset_timeout, success_threshold, exclude, listeners: As pybreaker's.
        trial_timeout: Seconds the half-open trial lease lasts (covers a dead trial worker).
        neutral: Exception types that count neither as failure nor success (control flow).
        prefix: ``tuning_key_prefix``.
        on_redis_error: ``'local'`` (per-process state), ``'closed'`` or ``'open'``.
        refresh_interval: Seconds a cached state is trusted.
        on_transition: Called for every transition this process makes or notices.
    """

    def __init__(
        self,
        name: str,
        *,
        store: BreakerStore,
        fail_max: int = 5,
        reset_timeout: float = 60.0,
        success_threshold: int = 1,
        exclude: Optional[Sequence[Any]] = None,
        listeners: Optional[Sequence[pybreaker.CircuitBreakerListener]] = None,
        trial_timeout: float = 60.0,
        neutral: Tuple[Type[BaseException], ...] = (),
        prefix: str = "tuning",
        on_redis_error: str = "local",
        refresh_interval: float = 0.5,
        on_transition: Optional[TransitionHook] = None,
        throw_new_error_on_trip: bool = True,
    ) -> None:
        self.circuit = SharedCircuit(
            name, store=store,
            params=BreakerParams.make(prefix, name, reset_timeout=reset_timeout, fail_max=fail_max,
                                      success_threshold=success_threshold, trial_timeout=trial_timeout),
            neutral=neutral, is_failure=self.is_system_error, on_redis_error=on_redis_error,
            refresh_interval=refresh_interval, on_transition=on_transition, events=_ListenerEvents(self),
            throw_new_error_on_trip=throw_new_error_on_trip,
        )
        super().__init__(
            fail_max=fail_max, reset_timeout=reset_timeout, success_threshold=success_threshold,
            exclude=list(exclude or []), listeners=list(listeners or []),
            state_storage=_SharedStateView(self.circuit, name), name=name,
            throw_new_error_on_trip=throw_new_error_on_trip,
        )

    def __repr__(self) -> str:
        return f"<SharedBreaker {self.name!r} fail_max={self.fail_max} reset_timeout={self.reset_timeout}>"

    # -- the circuit's settings, read and written through (plain attributes before the split) --

    store = _through("store")
    params = _through("params")
    neutral = _through("neutral")
    on_redis_error = _through("on_redis_error")
    refresh_interval = _through("refresh_interval")
    on_transition = _through("on_transition")

    @property
    def degraded(self) -> bool:
        """True while the tuning Redis is failing for this breaker and ``on_redis_error`` decides
        (its last store call failed); False again after the next one that succeeds."""
        return self.circuit.degraded

    # -- pybreaker's interface --------------------------------------------------------------

    @property
    def current_state(self) -> str:
        return self.circuit.view().state

    @property
    def state(self) -> Any:
        """pybreaker's state object for the shared state (listeners heard of any change)."""
        return _STATE_CLASSES[self.circuit.view().state](self, prev_state=None, notify=False)

    @state.setter
    def state(self, state_str: str) -> None:
        self.circuit.apply(_MANUAL_OPS[state_str], reason="manual")

    def refresh(self) -> Snapshot:
        """Read the shared state now (one round trip)."""
        return self.circuit.refresh()

    def open(self) -> bool:
        """Open the breaker for every process (pybreaker's ``open``)."""
        self.circuit.apply("open", reason="manual")
        return self.circuit.throw_new_error_on_trip

    def close(self) -> None:
        """Close the breaker for every process."""
        self.circuit.apply("close", reason="manual")

    def half_open(self) -> None:
        """Move to half-open: the next caller anywhere runs the trial."""
        self.circuit.apply("half-open", reason="manual")

    def reset(self) -> None:
        """Forget the shared state (closed, no failures)."""
        self.circuit.apply("reset", reason="reset")

    def remaining(self) -> float:
        """Seconds until a trial may run (0 when closed)."""
        return self.circuit.remaining()

    # -- calls (see SharedCircuit) ------------------------------------------------------------

    def looks_closed(self) -> bool:
        return self.circuit.looks_closed()

    def admit(self) -> Optional[str]:
        return self.circuit.admit()

    def record_success(self, trial: Optional[str]) -> None:
        self.circuit.record_success(trial)

    def record_failure(self, exc: BaseException, trial: Optional[str]) -> bool:
        return self.circuit.record_failure(exc, trial)

    def classify(self, exc: BaseException) -> Optional[bool]:
        return self.circuit.classify(exc)

    def settle_failure(self, exc: BaseException, trial: Optional[str]) -> bool:
        return self.circuit.settle_failure(exc, trial)

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``func`` through the breaker, concurrently with other callers.

        Raises:
            CircuitOpen: Without calling ``func`` when the breaker is open.
            pybreaker.CircuitBreakerError: When this call's failure opened the breaker
                (``throw_new_error_on_trip``); otherwise ``func``'s own exception.
        """
        return self.circuit.call(func, *args, **kwargs)

    def calling(self) -> Any:
        """``with breaker.calling():`` (and ``with breaker:``) guard a block of code."""
        return self.circuit.calling()

    def __enter__(self) -> None:
        self.circuit.__enter__()

    def __exit__(self, *exc_info: Any) -> Any:
        return self.circuit.__exit__(*exc_info)

    def call_async(self, func: Any, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("SharedBreaker does not support tornado coroutines")
