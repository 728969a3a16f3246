"""Per-app runtime state: parsed settings, the Redis connector, install bookkeeping."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Callable, Dict, Optional, TypeVar

from ..conf import TuningConfig, load_config
from ..errors import ConfigurationError
from ..storage.redis import RedisConnector, get_connector
from ..storage.urls import redact_url

__all__ = ["TuningRuntime", "env_disabled", "installed_runtime", "runtime_for", "runtime_of"]

T = TypeVar("T")

_runtimes: weakref.WeakKeyDictionary[Any, TuningRuntime] = weakref.WeakKeyDictionary()
_lock = threading.RLock()

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://", "redis+cluster://")


def env_disabled() -> bool:
    """True when ``CELERY_TUNING_ENABLED`` turns celery-tuning off for this process."""
    return os.environ.get("CELERY_TUNING_ENABLED", "").strip().lower() in ("0", "false", "no", "off")


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
        self._components: Dict[str, Dict[str, Any]] = {}
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
        """The tuning Redis URL: ``tuning_redis_url``, else the broker URL if it is Redis.

        Raises:
            ConfigurationError: When neither gives a Redis URL.
        """
        if self._redis_url is None:
            url = self.config.redis_url
            if url is None:
                broker = self.app.conf.broker_url or ""
                if isinstance(broker, str) and broker.lower().startswith(_REDIS_SCHEMES):
                    url = broker.split(";")[0] if broker.startswith("redis") else broker
                else:
                    raise ConfigurationError(
                        "tuning_redis_url: not set and the broker "
                        f"({redact_url(str(broker)) or 'none'}) is not Redis; "
                        "set tuning_redis_url='redis://host:6379/2'"
                    )
            self._redis_url = url
        return self._redis_url

    @property
    def connector(self) -> RedisConnector:
        """The process-wide connector for the tuning Redis."""
        cfg = self.config
        return get_connector(
            self.redis_url,
            socket_timeout=cfg.redis_socket_timeout,
            connect_timeout=cfg.redis_connect_timeout,
            max_connections=cfg.redis_max_connections,
        )

    def component(self, kind: str, name: str, build: Callable[[], T]) -> T:
        """The process's ``kind`` component called ``name``, built once by ``build()``."""
        cache: Dict[str, Any] = self._components.setdefault(kind, {})
        found = cache.get(name)
        if found is None:
            with _lock:
                found = cache.get(name)
                if found is None:
                    found = cache[name] = build()
        return found

    def key(self, *parts: str) -> str:
        """A key under ``tuning_key_prefix``."""
        return ":".join((self.config.key_prefix, *parts))


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
