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

__all__ = ["TuningRuntime", "env_disabled", "runtime_for"]

T = TypeVar("T")

_runtimes: weakref.WeakKeyDictionary[Any, TuningRuntime] = weakref.WeakKeyDictionary()
_lock = threading.RLock()

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://", "redis+cluster://")


def env_disabled() -> bool:
    """True when ``CELERY_TUNING_ENABLED`` turns celery-tuning off for this process."""
    return os.environ.get("CELERY_TUNING_ENABLED", "").strip().lower() in ("0", "false", "no", "off")


class TuningRuntime:
    """Everything celery-tuning keeps for one Celery app in one process.

    Arguments:
        app: The Celery app.
        config: Its parsed settings.
    """

    def __init__(self, app: Any, config: TuningConfig) -> None:
        self.app = app
        self.config = config
        #: Set by install(); receivers and steps only act for installed apps.
        self.installed = False
        #: Flipped off by the kill switch or ``celery worker --without-tuning``.
        self.enabled = bool(config.enabled)
        self._redis_url: Optional[str] = None
        self._components: Dict[str, Dict[str, Any]] = {}
        #: The concurrency profile applied to this worker process, if any (see integration.profiles).
        self.profile: Optional[Dict[str, Any]] = None

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


def runtime_for(app: Any) -> TuningRuntime:
    """The runtime of ``app``, parsing its settings on first use (once per app).

    Raises:
        ConfigurationError: When a ``tuning_*`` setting is invalid.
    """
    runtime = _runtimes.get(app)
    if runtime is not None:
        return runtime
    with _lock:
        runtime = _runtimes.get(app)
        if runtime is None:
            runtime = TuningRuntime(app, load_config(app.conf))
            _runtimes[app] = runtime
        return runtime


def installed_runtime(app: Any) -> Optional[TuningRuntime]:
    """The runtime of ``app`` if ``install(app)`` ran, else None (never parses)."""
    runtime = _runtimes.get(app)
    return runtime if runtime is not None and runtime.installed else None
