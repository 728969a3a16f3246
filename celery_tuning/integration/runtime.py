"""Per-app runtime state: parsed settings, the Redis connector, install bookkeeping."""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, TypeVar

from ..conf import TuningConfig, env_override, load_config
from ..errors import ConfigurationError
from ..storage.keys import prefixed_key
from ..storage.redis import CLIENT_NAME, RedisConnector, get_connector
from ..storage.urls import SUPPORTED_SCHEMES, redact_url

if TYPE_CHECKING:  # pragma: no cover
    from .registry import Registry

__all__ = [
    "MEMORY_URL", "STATEFUL_POLICIES", "STATEFUL_SETTINGS", "MemoryStores", "TuningRuntime", "env_disabled",
    "installed_runtime", "is_memory_url", "is_redis_url", "is_worker_process", "reset_stores_everywhere",
    "runtime_for", "runtime_of", "use_memory_everywhere",
]

T = TypeVar("T")

logger = logging.getLogger("celery_tuning")

#: The tuning "URL" of in-process stores: limits, breakers, leases, parked calls and the cache
#: live in this one process's memory (tests, and apps on Celery's ``memory://`` broker).
MEMORY_URL = "memory://"

#: The attributes in which pipeline steps keep the component they built (dropped by
#: :meth:`TuningRuntime.reset_stores` so the next call builds it again on the current stores).
_STEP_COMPONENTS = ("_limiter", "_limiters", "_breaker", "_cache", "_carries", "_dedupe_store")

# Every app of this process on memory://, whatever its settings (the pytest plugin's ``tuning_memory``).
_memory_everywhere = False


def use_memory_everywhere(on: bool = True) -> None:
    """Put every app of this process, those installed later included, on in-process stores
    (``on``) or back on the stores their settings name; every app's components start afresh."""
    global _memory_everywhere
    with _lock:
        _memory_everywhere = bool(on)
        reset_stores_everywhere()


def reset_stores_everywhere() -> None:
    """Every app of this process drops the components it built (limiters, breakers, caches with
    their L1...): the next use builds them again (the pytest plugin, between tests)."""
    with _lock:
        for runtime in list(_runtimes.values()):
            runtime.reset_stores()

_runtimes: weakref.WeakKeyDictionary[Any, TuningRuntime] = weakref.WeakKeyDictionary()
_lock = threading.RLock()

#: URL schemes of a Redis celery-tuning can use (the one list: storage.urls.SUPPORTED_SCHEMES).
_REDIS_SCHEMES = tuple(scheme.strip() for scheme in SUPPORTED_SCHEMES.split(","))

#: Settings whose entries keep state in the tuning Redis.
STATEFUL_SETTINGS = ("tuning_rate_limits", "tuning_circuit_breakers", "tuning_concurrency_limits")
#: Policy kinds whose state lives in the tuning Redis (``sla`` is timed in the worker alone).
STATEFUL_POLICIES = ("cache", "breaker", "rate_limit", "concurrency", "dedupe", "debounce", "fair")


def env_disabled() -> bool:
    """True when ``CELERY_TUNING_ENABLED`` turns celery-tuning off for this process.

    Read through the ``tuning_enabled`` setting's own parser (the one place the variable is
    understood); a value it refuses does not disable anything here and is reported, naming the
    variable, when the settings are read.
    """
    try:
        return env_override("tuning_enabled") is False
    except ConfigurationError:
        return False


def is_redis_url(url: Any) -> bool:
    """Whether ``url`` (a broker URL, say) names a Redis celery-tuning can use."""
    return isinstance(url, str) and url.lower().startswith(_REDIS_SCHEMES)


def is_memory_url(url: Any) -> bool:
    """Whether ``url`` (a broker or tuning URL) is ``memory://``: one process's memory."""
    return isinstance(url, str) and url.strip().lower().startswith(MEMORY_URL)


class MemoryStores:
    """One app's in-process stores (``memory://``): shared by its limiters, breakers, leases and
    parked calls, so state set through one handle is seen through every other in this process."""

    def __init__(self) -> None:
        from ..storage.breaker import MemoryBreakerStore
        from ..storage.gcra import MemoryGcraStore
        from ..storage.lease import MemoryLeaseStore
        from ..storage.park import MemoryParkStore

        self.gcra = MemoryGcraStore()
        self.breaker = MemoryBreakerStore()
        self.lease = MemoryLeaseStore()
        self.park = MemoryParkStore(leases=self.lease)
        from ..storage.dedupe import MemoryDedupeStore

        self.dedupe = MemoryDedupeStore()


def is_worker_process(argv: Optional[Sequence[str]] = None) -> bool:
    """Whether this process runs ``celery worker`` (judged from ``sys.argv``)."""
    argv = sys.argv if argv is None else argv
    return "worker" in list(argv)[1:]


class TuningRuntime:
    """Everything celery-tuning keeps for one Celery app in one process.

    Settings are parsed when first needed (or by ``install()`` when Celery
    configures the app), never when the runtime is made: Celery apps are lazy.

    Arguments:
        app: The Celery app.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        #: Set by install(); receivers and steps only act for installed apps.
        self.installed = False
        self._config: Optional[TuningConfig] = None
        # A bad setting found when the app was configured, raised again wherever settings are needed
        # (Celery's signal dispatch would only have logged it).
        self._error: Optional[ConfigurationError] = None
        # None: follow tuning_enabled; False once the kill switch or --without-tuning turned it off.
        self._enabled: Optional[bool] = None
        self._switched_off = False
        self._redis_url: Optional[str] = None
        self._registry: Optional[Registry] = None
        # True while a test (the pytest plugin's ``tuning_memory``) put this app on memory://.
        self._forced_memory = False
        self._memory: Optional[MemoryStores] = None
        self._warned_memory = False
        #: The concurrency profile applied to this worker process, if any (see integration.profiles).
        self.profile: Optional[Dict[str, Any]] = None

    @property
    def config(self) -> TuningConfig:
        """The parsed ``tuning_*`` settings; reading them configures the app if it is not yet.

        Raises:
            ConfigurationError: Naming the first invalid or unknown setting.
        """
        config = self._config
        if config is None:
            config = self._load()
        return config

    def _load(self) -> TuningConfig:
        if not getattr(self.app, "configured", True):
            # Any read makes Celery configure the app; when install() ran, its receiver parses then.
            self.app.conf.get("tuning_enabled")
        with _lock:
            if self._error is not None:
                raise ConfigurationError(str(self._error))
            config = self._config
            if config is None:
                config = self.configure(self.app.conf)
            return config

    def configure(self, conf: Any) -> TuningConfig:
        """Parse ``conf`` as this app's settings (Celery configured, or configured again, the app).

        Raises:
            ConfigurationError: Naming the first invalid or unknown setting (kept, see :meth:`reject`).
        """
        with _lock:
            self._config, self._error, self._redis_url = None, None, None
            if not self._switched_off:
                self._enabled = None
            try:
                self._config = load_config(conf)
            except ConfigurationError as exc:
                self.reject(exc)
                raise
            return self._config

    def reject(self, error: ConfigurationError) -> None:
        """Keep ``error`` as this app's configuration error: every later use of the settings raises it."""
        with _lock:
            self._config, self._error = None, error

    @property
    def enabled(self) -> bool:
        """False under the kill switch (``tuning_enabled``, ``CELERY_TUNING_ENABLED``) or ``--without-tuning``."""
        enabled = self._enabled
        if enabled is None:
            enabled = self._enabled = bool(self.config.enabled)
        return enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self._switched_off = not value

    @property
    def redis_url(self) -> str:
        """The tuning Redis URL: ``tuning_redis_url``, else the broker URL if it is Redis, else
        ``memory://`` (in-process stores, with a warning) when the broker is ``memory://``.

        Raises:
            ConfigurationError: When none of these gives a URL.
        """
        if self._forced_memory or _memory_everywhere:
            return MEMORY_URL
        if self._redis_url is None:
            url = self.config.redis_url
            if url is None:
                broker = self.app.conf.broker_url or ""
                if is_redis_url(broker):
                    url = broker.split(";")[0] if broker.startswith("redis") else broker
                elif is_memory_url(broker):
                    url = MEMORY_URL
                    if not self._warned_memory:
                        self._warned_memory = True
                        logger.warning(
                            "celery-tuning: tuning_redis_url not set and the broker is memory://: rate "
                            "limits, breakers, leases and the cache live in this process's memory "
                            "(memory://, one process only); set tuning_redis_url to share them")
                else:
                    raise ConfigurationError(
                        "tuning_redis_url: not set and the broker "
                        f"({redact_url(str(broker)) or 'none'}) is not Redis; "
                        "set tuning_redis_url='redis://host:6379/2'"
                    )
            self._redis_url = url
        return self._redis_url

    @property
    def in_memory(self) -> bool:
        """Whether this app keeps its tuning state in this process (``memory://``), not in Redis."""
        if self._forced_memory or _memory_everywhere:
            return True
        try:
            return is_memory_url(self.redis_url)
        except ConfigurationError:
            return False

    @property
    def memory(self) -> MemoryStores:
        """The in-process stores used while :attr:`in_memory`."""
        memory = self._memory
        if memory is None:
            with _lock:
                memory = self._memory
                if memory is None:
                    memory = self._memory = MemoryStores()
        return memory

    def use_memory(self, on: bool = True) -> None:
        """Keep this app's tuning state in this process (``on``) whatever ``tuning_redis_url`` says,
        or go back to the configured store; either way every component starts afresh."""
        with _lock:
            self._forced_memory = bool(on)
            self.reset_stores()

    def reset_stores(self) -> None:
        """Forget every component built so far (limiters, breakers, caches...) and the in-process
        stores: the next use builds them again, on the store the settings now name."""
        with _lock:
            self._registry = None
            self._memory = None
            tasks = getattr(self.app, "_tasks", None) or {}  # never finalize the app here
            for task in list(tasks.values()):
                for step in getattr(type(task), "_tuning_steps", None) or ():
                    for attr in _STEP_COMPONENTS:
                        if attr in vars(step):
                            setattr(step, attr, None)

    @property
    def connector(self) -> RedisConnector:
        """The process-wide connector for the tuning Redis.

        Raises:
            ConfigurationError: When the app keeps its state in memory (``memory://``): there is no Redis.
        """
        return self.connector_named(CLIENT_NAME)

    def connector_named(self, client_name: str) -> RedisConnector:
        """A process-wide connector for the tuning Redis whose connections carry ``client_name``
        (the parking mover has its own, so it never takes a task's connection)."""
        cfg = self.config
        if self.in_memory:
            raise ConfigurationError("the tuning store is memory:// (in this process only): there is no tuning Redis")
        return get_connector(
            self.redis_url,
            socket_timeout=cfg.redis_socket_timeout,
            connect_timeout=cfg.redis_connect_timeout,
            max_connections=cfg.redis_max_connections,
            client_name=client_name,
        )

    @property
    def registry(self) -> Registry:
        """The process's limiters, breakers and concurrency limiters of this app, each built once."""
        registry = self._registry
        if registry is None:
            from .registry import Registry

            with _lock:
                registry = self._registry
                if registry is None:
                    registry = self._registry = Registry(self)
        return registry

    def component(self, kind: str, name: str, build: Callable[[], T]) -> T:
        """The process's ``kind`` component called ``name``, built once by ``build()``."""
        return self.registry.get(kind, name, build)

    def needs_redis(self, tasks: bool = True) -> bool:
        """Whether this app keeps state in the tuning Redis: a stateful setting is given, or (with
        ``tasks``) a registered task has a policy that keeps state there (``sla`` does not).

        Pass ``tasks=False`` while Celery configures the app: reading ``app.tasks`` finalizes it.
        """
        config = self.config
        if any(config.given(name) for name in STATEFUL_SETTINGS):
            return True
        if not tasks:
            return False
        for task in list(self.app.tasks.values()):
            policies = getattr(type(task), "_tuning_policies", None) or {}
            if any(kind in policies for kind in STATEFUL_POLICIES):
                return True
        return False

    def key(self, *parts: str) -> str:
        """A key under ``tuning_key_prefix``."""
        return prefixed_key(self.config.key_prefix, *parts)


def runtime_of(app: Any) -> TuningRuntime:
    """The runtime of ``app``, made on first use; reads no settings, so the app stays lazy."""
    runtime = _runtimes.get(app)
    if runtime is not None:
        return runtime
    with _lock:
        runtime = _runtimes.get(app)
        if runtime is None:
            runtime = _runtimes[app] = TuningRuntime(app)
        return runtime


def runtime_for(app: Any) -> TuningRuntime:
    """The runtime of ``app`` with its settings parsed (configuring the app if it is not yet).

    Raises:
        ConfigurationError: When a ``tuning_*`` setting is invalid.
    """
    runtime = runtime_of(app)
    if runtime._config is None:
        runtime._load()
    return runtime


def installed_runtime(app: Any) -> Optional[TuningRuntime]:
    """The runtime of ``app`` if ``install(app)`` ran, else None (never parses)."""
    runtime = _runtimes.get(app)
    return runtime if runtime is not None and runtime.installed else None
