"""The registry of one app's shared components: limiters, breakers and concurrency limiters.

Every named component a process uses is built here, once, from its setting (or from a task's
inline policy) and kept on the app's runtime (``runtime.registry``). One error says a name is
missing from its setting: ``no such limiter 'x' in tuning_rate_limits (known: 'a', 'b')``. Room is
left for more kinds (caches, leases): a :class:`Kind` and a ``build`` callable is all it takes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, TypeVar, Union

from .. import events
from ..conf import BreakerSpec, ConcurrencySpec, known_names, parse_breaker_spec
from ..errors import ConfigurationError
from ..policy.rates import Rate

if TYPE_CHECKING:  # pragma: no cover
    from ..circuit import SharedBreaker
    from ..concurrency import ConcurrencyLimiter
    from ..ratelimit import GcraLimiter
    from ..storage.park import ParkStore
    from .runtime import TuningRuntime

__all__ = [
    "BREAKERS",
    "CONCURRENCY_LIMITS",
    "KINDS",
    "LIMITERS",
    "Kind",
    "Registry",
    "breaker",
    "breaker_for",
    "concurrency_limiter_for",
    "limiter",
    "limiter_for",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Kind:
    """A kind of named component and the setting that names them."""

    #: Key of the kind in the registry (also the policy kind it serves).
    key: str
    #: What one is called in errors: ``no such <what> 'x' in <setting>``.
    what: str
    #: The setting whose keys are the configured names.
    setting: str

    @property
    def attr(self) -> str:
        """The :class:`~celery_tuning.conf.TuningConfig` field holding the setting."""
        return self.setting[len("tuning_"):]


LIMITERS = Kind("limiter", "limiter", "tuning_rate_limits")
BREAKERS = Kind("breaker", "breaker", "tuning_circuit_breakers")
CONCURRENCY_LIMITS = Kind("concurrency", "concurrency limit", "tuning_concurrency_limits")
#: Registry key of the app's park store (one per runtime).
PARK_STORE = "park"
#: Registry key of the inline concurrency limits' specs (name -> ConcurrencySpec).
INLINE_CONCURRENCY = "concurrency-inline"
#: Concurrency limit name -> whether every task using it can hold on as its standby.
STANDBY_ABLE = "standby_able"
KINDS: Dict[str, Kind] = {k.key: k for k in (LIMITERS, BREAKERS, CONCURRENCY_LIMITS)}


class Registry:
    """The components of one app in this process, each built once and shared by every thread.

    Arguments:
        runtime: The app's :class:`~celery_tuning.integration.runtime.TuningRuntime`.
    """

    def __init__(self, runtime: TuningRuntime) -> None:
        self.runtime = runtime
        self._built: Dict[str, Dict[str, Any]] = {}
        self._lock = threading.RLock()

    # -- the one build path and the one error --------------------------------------------------

    def get(self, kind: str, name: str, build: Callable[[], T]) -> T:
        """The ``kind`` component called ``name``, built by ``build()`` on first use."""
        built: Dict[str, Any] = self._built.setdefault(kind, {})
        found = built.get(name)
        if found is None:
            with self._lock:
                found = built.get(name)
                if found is None:
                    found = built[name] = build()
        return found

    def configured(self, kind: Kind) -> Mapping[str, Any]:
        """The entries of ``kind``'s setting: name -> spec."""
        entries: Mapping[str, Any] = getattr(self.runtime.config, kind.attr)
        return entries

    def no_such(self, kind: Kind, name: str, by: Optional[str] = None) -> ConfigurationError:
        """The error for a name missing from its setting; ``by`` names who asked (``@rate_limit('x')``)."""
        known = known_names(self.configured(kind))
        head = f"{by}: " if by else ""
        return ConfigurationError(f"{head}no such {kind.what} {name!r} in {kind.setting} (known: {known})")

    def spec(self, kind: Kind, name: str, by: Optional[str] = None) -> Any:
        """The configured spec of ``name``.

        Raises:
            ConfigurationError: When ``name`` is not in the setting (see :meth:`no_such`).
        """
        found = self.configured(kind).get(name)
        if found is None:
            raise self.no_such(kind, name, by)
        return found

    def built(self, kind: Kind) -> Dict[str, Any]:
        """The components of ``kind`` built so far in this process (a copy)."""
        return dict(self._built.get(kind.key, {}))

    # -- the kinds ------------------------------------------------------------------------------

    def limiter(self, name: str, *, rate: Optional[Rate] = None, burst: Optional[int] = None,
                adaptive: bool = False, per_key: Optional[Mapping[Any, Any]] = None) -> GcraLimiter:
        """Limiter ``name`` from ``tuning_rate_limits`` (with its ``per_key`` tiers); with ``rate``,
        an inline limiter of that name (``per_key``: its tiers)."""

        def build() -> GcraLimiter:
            from ..ratelimit import GcraLimiter
            from ..storage.gcra import AdaptiveSpec, RedisGcraStore

            nonlocal rate, burst, adaptive, per_key
            if rate is None:
                spec = self.spec(LIMITERS, name)
                rate, burst, adaptive, per_key = spec.rate, spec.burst, spec.adaptive, spec.per_key
            runtime = self.runtime
            return GcraLimiter(
                name, rate, burst or 1,
                store=runtime.memory.gcra if runtime.in_memory else RedisGcraStore(runtime.connector),
                prefix=runtime.config.key_prefix,
                on_redis_error=runtime.config.rate_limit_on_redis_error,
                adaptive=AdaptiveSpec() if adaptive else None,
                per_key=per_key,
                observer=_limiter_observer,
            )

        return self.get(LIMITERS.key, name, build)

    def breaker(self, name: str, options: Union[BreakerSpec, Mapping[str, Any], None] = None) -> SharedBreaker:
        """Breaker ``name`` from ``tuning_circuit_breakers``, else from ``options`` (a task's inline ones)."""

        def build() -> SharedBreaker:
            from ..circuit import SharedBreaker
            from ..storage.breaker import RedisBreakerStore
            from .interactions import NOT_A_FAILURE

            spec = self.configured(BREAKERS).get(name) or _breaker_spec(name, options)
            if spec is None:
                raise self.no_such(BREAKERS, name)
            runtime = self.runtime
            return SharedBreaker(
                name,
                store=runtime.memory.breaker if runtime.in_memory else RedisBreakerStore(runtime.connector),
                fail_max=spec.fail_max, reset_timeout=spec.reset_timeout,
                success_threshold=spec.success_threshold, trial_timeout=spec.trial_timeout,
                exclude=spec.exclude, neutral=NOT_A_FAILURE,
                prefix=runtime.config.key_prefix,
                on_redis_error=runtime.config.breaker_on_redis_error,
                refresh_interval=runtime.config.breaker_refresh_interval,
                on_transition=_on_transition,
            )

        return self.get(BREAKERS.key, name, build)

    def concurrency_limiter(self, name: str, spec: Optional[ConcurrencySpec] = None) -> ConcurrencyLimiter:
        """Concurrency limiter ``name`` from ``tuning_concurrency_limits`` (with its ``per_key``
        caps); with ``spec``, a task's inline limit of that name."""
        if spec is not None:
            self.inline_concurrency(spec)

        def build() -> ConcurrencyLimiter:
            from ..concurrency import ConcurrencyLimiter

            found = spec if spec is not None else self.spec(CONCURRENCY_LIMITS, name)
            runtime = self.runtime
            store = runtime.memory.lease if runtime.in_memory else runtime.connector
            limiter = ConcurrencyLimiter(name, found.limit, store, prefix=runtime.config.key_prefix,
                                         ttl=runtime.config.concurrency_lease_ttl, per_key=found.per_key)
            if runtime.config.defer_via == "park":
                from ..storage.park import Spot

                limiter.wake_waiters_with(self.park_store(), Spot("concurrency", name))
            return limiter

        return self.get(CONCURRENCY_LIMITS.key, name, build)

    def inline_concurrency(self, spec: ConcurrencySpec) -> None:
        """Note a task's inline concurrency limit (the mover reads its caps by name)."""
        with self._lock:
            self._built.setdefault(INLINE_CONCURRENCY, {})[spec.name] = spec

    def note_standby(self, limit: str, able: bool) -> None:
        """Note whether a task using concurrency limit ``limit`` can hold on as its standby (its
        waiters are ``acks_late`` with no time limit); the limit has a standby only when all can."""
        with self._lock:
            seen = self._built.setdefault(STANDBY_ABLE, {})
            seen[limit] = seen.get(limit, True) and able

    def standby_able(self, limit: str) -> bool:
        """Whether every task noted for concurrency limit ``limit`` can stand by (False when none was)."""
        return bool(self._built.get(STANDBY_ABLE, {}).get(limit, False))

    def concurrency_spec(self, name: str) -> Optional[ConcurrencySpec]:
        """Concurrency limit ``name``: from ``tuning_concurrency_limits``, else a noted inline one
        (None: neither)."""
        found: Optional[ConcurrencySpec] = self.configured(CONCURRENCY_LIMITS).get(name)
        if found is None:
            found = self._built.get(INLINE_CONCURRENCY, {}).get(name)
        return found

    def park_store(self) -> ParkStore:
        """Where this app's deferred calls park (``tuning_defer_via="park"``): the tuning Redis."""

        def build() -> ParkStore:
            from ..storage.park import RedisParkStore

            runtime = self.runtime
            if runtime.in_memory:
                return runtime.memory.park
            config = runtime.config
            return RedisParkStore(runtime.connector, prefix=config.key_prefix,
                                  ticket_ttl_us=int(config.park_ticket_ttl * 1_000_000))

        return self.get(PARK_STORE, "store", build)

    def mover_park_store(self) -> ParkStore:
        """The park store the mover uses: the app's, on a connection of its own (client name
        ``celery-tuning-mover``), so the thread never holds a connection a task needs."""

        def build() -> ParkStore:
            shared = self.park_store()
            from ..storage.park import RedisParkStore
            from ..storage.redis import MOVER_CLIENT_NAME

            if not isinstance(shared, RedisParkStore):
                return shared  # a store a test put in place
            runtime = self.runtime
            config = runtime.config
            return RedisParkStore(runtime.connector_named(MOVER_CLIENT_NAME), prefix=config.key_prefix,
                                  ticket_ttl_us=int(config.park_ticket_ttl * 1_000_000))

        return self.get(PARK_STORE, "mover", build)

    def use_park_store(self, store: ParkStore) -> None:
        """Park in ``store`` from now on (tests: a :class:`~celery_tuning.storage.park.MemoryParkStore`)."""
        with self._lock:
            built = self._built.setdefault(PARK_STORE, {})
            built["store"] = built["mover"] = store


def _breaker_spec(name: str, options: Union[BreakerSpec, Mapping[str, Any], None]) -> Optional[BreakerSpec]:
    if options is None or isinstance(options, BreakerSpec):
        return options
    return parse_breaker_spec(f"breaker {name!r}", options)  # a plain dict from older callers


def _limiter_observer(event: str, name: str, seconds: float) -> None:
    events.limiter_event(name, event, seconds)  # metrics, the limiter_event signal


def _on_transition(name: str, old: str, new: str, reason: str) -> None:
    events.breaker_transition(name, old, new, reason)  # metrics, the circuit_state_changed signal


# -- the functions the steps, the CLI and users call -------------------------------------------


def limiter_for(runtime: TuningRuntime, name: str, *, rate: Optional[Rate] = None,
                burst: Optional[int] = None, adaptive: bool = False,
                per_key: Optional[Mapping[Any, Any]] = None) -> GcraLimiter:
    """The process's limiter ``name`` for this app (created once).

    Named limiters come from ``tuning_rate_limits``; passing ``rate`` makes an
    inline limiter of that name (``per_key``: its tiers, key value -> rate and burst).

    Raises:
        ConfigurationError: When ``name`` is not configured and no rate is given.
    """
    return runtime.registry.limiter(name, rate=rate, burst=burst, adaptive=adaptive, per_key=per_key)


def breaker_for(runtime: TuningRuntime, name: str,
                options: Union[BreakerSpec, Mapping[str, Any], None] = None) -> SharedBreaker:
    """The process's breaker ``name`` for this app (created once).

    Raises:
        ConfigurationError: When ``name`` is not configured and no options are given.
    """
    return runtime.registry.breaker(name, options)


def concurrency_limiter_for(runtime: TuningRuntime, name: str,
                            spec: Optional[ConcurrencySpec] = None) -> ConcurrencyLimiter:
    """The process's limiter for ``tuning_concurrency_limits[name]`` (created once); with
    ``spec``, a task's inline limit of that name.

    Raises:
        ConfigurationError: When ``name`` is not configured and no spec is given.
    """
    return runtime.registry.concurrency_limiter(name, spec)


def _app_runtime(app: Any) -> TuningRuntime:
    from .runtime import runtime_for

    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    return runtime_for(app)


def limiter(name: str, app: Any = None) -> GcraLimiter:
    """The shared limiter ``name`` from ``tuning_rate_limits``, for use around single calls.

    Example::

        celery_tuning.limiter("openai").acquire(timeout=10)

    Arguments:
        name: A key of ``tuning_rate_limits``.
        app: The Celery app (default: the current app).
    """
    return limiter_for(_app_runtime(app), name)


def breaker(name: str, app: Any = None) -> SharedBreaker:
    """The shared breaker ``name`` from ``tuning_circuit_breakers``, for use around single calls.

    Example::

        with celery_tuning.breaker("payments"):
            charge()

    Arguments:
        name: A key of ``tuning_circuit_breakers``.
        app: The Celery app (default: the current app).
    """
    return breaker_for(_app_runtime(app), name)
