"""``SharedBreaker``: a pybreaker ``CircuitBreaker`` whose state every process shares through a store.

(The module is ``circuit`` because ``celery_tuning.breaker`` is the public accessor function.)
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Hashable, Iterator, Optional, Sequence, Tuple, Type, TypeVar

import pybreaker

from .errors import StorageError, TuningError
from .storage.breaker import CLOSED, HALF_OPEN, OPEN, BreakerParams, BreakerStore, MemoryBreakerStore, Snapshot

__all__ = ["CircuitOpen", "SharedBreaker"]

logger = logging.getLogger("celery_tuning.breaker")

T = TypeVar("T")

#: Called as (breaker name, old state, new state, reason) on every transition this process sees.
TransitionHook = Callable[[str, str, str, str], None]

_ON_REDIS_ERROR = ("local", "closed", "open")

#: Seconds after which callers turned away by a running half-open trial look again.
HALF_OPEN_RECHECK = 1.0


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


class _SharedStateView(pybreaker.CircuitBreakerStorage):
    """pybreaker's storage interface, answered from the shared breaker's cached view."""

    def __init__(self, breaker: SharedBreaker, name: str) -> None:
        super().__init__(name)
        self._breaker = breaker

    @property
    def state(self) -> str:
        return self._breaker._view().state

    @state.setter
    def state(self, state: str) -> None:
        self._breaker._apply({OPEN: "open", CLOSED: "close"}.get(state, "status"), reason="storage")

    def increment_counter(self) -> None:
        self._breaker._apply("failure", reason="storage")

    def reset_counter(self) -> None:
        self._breaker._apply("success", reason="storage")

    def increment_success_counter(self) -> None:  # pragma: no cover - our call path does not use it
        pass

    def reset_success_counter(self) -> None:  # pragma: no cover - our call path does not use it
        pass

    @property
    def counter(self) -> int:
        return self._breaker._view().failures

    @property
    def success_counter(self) -> int:
        return 0

    @property
    def opened_at(self) -> Optional[datetime]:
        snap = self._breaker._view()
        if snap.state != OPEN:
            return None
        elapsed = self._breaker.reset_timeout - snap.remaining_us / 1_000_000
        return datetime.now(timezone.utc) - timedelta(seconds=elapsed)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:  # pragma: no cover - set by _apply('open')
        pass


class SharedBreaker(pybreaker.CircuitBreaker):
    """A circuit breaker shared by every process that names it.

    Every state change is one atomic store call (a Lua script on the Redis
    server's clock). The state is cached per process for ``refresh_interval``
    seconds, so a successful call through a closed breaker costs no round
    trip; failures are counted centrally, and an open state reaches every
    process within ``refresh_interval``. Calls run concurrently: unlike
    ``pybreaker.CircuitBreaker.call`` no lock is held around the guarded call.
    In half-open exactly one trial call runs across all processes (a lease of
    ``trial_timeout`` seconds in the store); the others see the breaker open.

    Arguments:
        name: Breaker name (hash tag of its Redis key).
        store: Shared store (normally :class:`~celery_tuning.storage.breaker.RedisBreakerStore`).
        fail_max, reset_timeout, success_threshold, exclude, listeners: As pybreaker's.
        trial_timeout: Seconds the half-open trial lease lasts (covers a dead trial worker).
        neutral: Exception types that count neither as failure nor success (control flow).
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
        if on_redis_error not in _ON_REDIS_ERROR:
            raise ValueError(f"breaker {name!r}: on_redis_error={on_redis_error!r}; expected {_ON_REDIS_ERROR}")
        self.store = store
        self.params = BreakerParams.make(prefix, name, reset_timeout=reset_timeout, fail_max=fail_max,
                                         success_threshold=success_threshold, trial_timeout=trial_timeout)
        self.neutral = tuple(neutral)
        self.on_redis_error = on_redis_error
        self.refresh_interval = float(refresh_interval)
        self.on_transition = on_transition
        self._fallback = MemoryBreakerStore()
        self._view_lock = threading.Lock()
        self._snap = Snapshot(CLOSED, 0, 0, -1)
        self._fetched = float("-inf")
        self._epoch: Optional[Hashable] = None  # the store's failure epoch when _snap was read
        self._deadline = 0.0  # monotonic time the cached open state ends
        self._warned = False
        self._local = threading.local()
        self._name = name
        super().__init__(
            fail_max=fail_max, reset_timeout=reset_timeout, success_threshold=success_threshold,
            exclude=list(exclude or []), listeners=list(listeners or []),
            state_storage=_SharedStateView(self, name), name=name,
            throw_new_error_on_trip=throw_new_error_on_trip,
        )

    def __repr__(self) -> str:
        return f"<SharedBreaker {self.name!r} fail_max={self.fail_max} reset_timeout={self.reset_timeout}>"

    # -- shared state ---------------------------------------------------------------------

    def _store_apply(self, op: str, token: str = "") -> Snapshot:
        try:
            snap = self.store.apply(self.params, op, token)
        except StorageError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("breaker %r: tuning Redis failed (%s); applying on_redis_error=%r",
                               self.name, exc, self.on_redis_error)
            if self.on_redis_error == "closed":
                return Snapshot(CLOSED, 0, 0, self._snap.version, op == "trial")
            if self.on_redis_error == "open":
                return Snapshot(OPEN, self._snap.failures, self.params.reset_timeout_us, self._snap.version)
            return self._fallback.apply(self.params, op, token)
        if self._warned:
            self._warned = False
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
        old_obj = self._create_new_state(old, notify=False)
        new_obj = self._create_new_state(new, notify=False)
        self._state = new_obj
        for listener in self.listeners:
            try:
                listener.state_change(self, old_obj, new_obj)
            except Exception:
                logger.exception("breaker listener failed")
        if self.on_transition is not None:
            try:
                self.on_transition(self.name or "", old, new, reason)
            except Exception:
                logger.exception("breaker transition hook failed")

    def _apply(self, op: str, token: str = "", reason: str = "") -> Snapshot:
        # Read before the round trip: a failure the answer does not include changes it later.
        epoch = self.store.failure_epoch(self.params)
        return self._remember(self._store_apply(op, token), reason or op, epoch)

    def _failures_may_be_pending(self) -> bool:
        """Whether some process may have recorded a failure this process's view does not show."""
        if self._warned:
            return False  # Redis is failing: the local fallback's view is exact for this process
        epoch = self.store.failure_epoch(self.params)
        return epoch is None or epoch != self._epoch

    def _view(self) -> Snapshot:
        """The cached state; refreshed with one round trip when older than ``refresh_interval``."""
        if time.monotonic() - self._fetched <= self.refresh_interval:
            return self._snap
        return self._apply("status", reason="observed")

    def refresh(self) -> Snapshot:
        """Read the shared state now (one round trip)."""
        return self._apply("status", reason="observed")

    # -- pybreaker's interface --------------------------------------------------------------

    @property
    def current_state(self) -> str:
        return self._view().state

    @property
    def state(self) -> Any:
        snap = self._view()
        if self._state.name != snap.state:
            self._state = self._create_new_state(snap.state, notify=False)
        return self._state

    @state.setter
    def state(self, state_str: str) -> None:
        self._apply({OPEN: "open", CLOSED: "close", "half-open": "half-open"}[state_str], reason="manual")

    def open(self) -> bool:
        """Open the breaker for every process (pybreaker's ``open``)."""
        self._apply("open", reason="manual")
        return self._throw_new_error_on_trip

    def close(self) -> None:
        """Close the breaker for every process."""
        self._apply("close", reason="manual")

    def half_open(self) -> None:
        """Move to half-open: the next caller anywhere runs the trial."""
        self._apply("half-open", reason="manual")

    def reset(self) -> None:
        """Forget the shared state (closed, no failures)."""
        self._apply("reset", reason="reset")

    def remaining(self) -> float:
        """Seconds until a trial may run (0 when closed)."""
        snap = self._view()
        if snap.state == CLOSED:
            return 0.0
        return max(0.0, self._deadline - time.monotonic())

    # -- calls ----------------------------------------------------------------------------

    def looks_closed(self) -> bool:
        """Whether :meth:`admit` will let a call through without a trial (same cached view)."""
        return self._view().state == CLOSED

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
        snap = self._view()
        if snap.state == CLOSED:
            return None
        if snap.state == OPEN and time.monotonic() < self._deadline:
            raise CircuitOpen(self.name or "", self._deadline - time.monotonic())
        token = secrets.token_hex(8)
        snap = self._apply("trial", token, reason="reset timeout elapsed")
        if snap.granted:
            return token
        if snap.state == CLOSED:
            return None
        wait = snap.remaining_us / 1_000_000
        if snap.state == HALF_OPEN:
            # Another process runs the trial; its lease is only an upper bound (a trial call
            # usually ends in well under a second), so come back soon rather than at its end.
            wait = min(wait, HALF_OPEN_RECHECK)
        raise CircuitOpen(self.name or "", max(wait, 0.05))

    def record_success(self, trial: Optional[str]) -> None:
        """A guarded call succeeded: reset the shared failure count.

        A round trip only when the count may be non-zero: this process's view shows failures,
        or a failure was announced (by any process) since the view was read, or this process
        cannot hear announcements right now. Closed with no failures anywhere: none.
        """
        if trial:
            self._apply("success", trial, reason="trial call succeeded")
        elif self._snap.failures > 0 or self._snap.state != CLOSED or self._failures_may_be_pending():
            self._apply("success", reason="success")
        for listener in self.listeners:
            listener.success(self)

    def record_failure(self, exc: BaseException, trial: Optional[str]) -> bool:
        """A guarded call failed; returns True when this failure opened the breaker."""
        before = self._snap.state
        snap = self._apply("failure", trial or "",
                           reason=f"trial call failed: {type(exc).__name__}" if trial
                           else f"{self.fail_max} consecutive failures, last {type(exc).__name__}")
        for listener in self.listeners:
            listener.failure(self, exc)
        return snap.state == OPEN and before != OPEN

    def classify(self, exc: BaseException) -> Optional[bool]:
        """True: a failure; False: counts as success (pybreaker's excludes); None: neutral."""
        if isinstance(exc, self.neutral):
            return None
        return self.is_system_error(exc)

    def settle_failure(self, exc: BaseException, trial: Optional[str]) -> bool:
        """Account for a guarded call that raised; True when it opened the breaker.

        Control flow (``neutral``) counts as nothing but frees a trial lease; pybreaker's
        excluded exceptions count as success; everything else is a failure.
        """
        verdict = self.classify(exc)
        if verdict is True:
            return self.record_failure(exc, trial)
        if verdict is False:
            self.record_success(trial)
        elif trial:
            self._apply("release", trial, reason="trial ended without a verdict")
        return False

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``func`` through the breaker, concurrently with other callers.

        Raises:
            CircuitOpen: Without calling ``func`` when the breaker is open.
            pybreaker.CircuitBreakerError: When this call's failure opened the breaker
                (``throw_new_error_on_trip``); otherwise ``func``'s own exception.
        """
        trial = self.admit()
        for listener in self.listeners:
            listener.before_call(self, func, *args, **kwargs)
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            if self.settle_failure(exc, trial) and self._throw_new_error_on_trip:
                raise CircuitOpen(self.name or "", self.reset_timeout) from exc
            raise
        self.record_success(trial)
        return result

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """``with breaker.calling():`` (and ``with breaker:``) guard a block of code."""
        trial = self.admit()
        try:
            yield
        except BaseException as exc:
            if self.settle_failure(exc, trial) and self._throw_new_error_on_trip:
                raise CircuitOpen(self.name or "", self.reset_timeout) from exc
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

    def call_async(self, func: Any, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("SharedBreaker does not support tornado coroutines")
