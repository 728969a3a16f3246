"""The typed table of every ``tuning_*`` setting: default, type, doc and validation."""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .errors import ConfigurationError
from .policy.rates import ACCEPTED as RATE_FORMS
from .policy.rates import Rate, parse_rate

__all__ = ["SETTINGS", "Setting", "TuningConfig", "load_config", "render_settings_markdown"]

Parser = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    #: Full setting name as written in ``app.conf`` (lower case).
    name: str
    #: Human-readable type, shown in the docs and in errors.
    type: str
    #: Value used when the setting is absent.
    default: Any
    #: One-line description for the generated reference.
    doc: str
    #: Validates and normalizes a raw value; raises :class:`ConfigurationError`.
    parse: Parser
    #: Environment variable that overrides the config value, if any.
    env: Optional[str] = None

    @property
    def attr(self) -> str:
        return self.name[len("tuning_"):]


def known_names(entries: Mapping[str, Any]) -> str:
    """``'a', 'b'`` (or ``none configured``) for errors about a name missing from a setting."""
    return ", ".join(repr(n) for n in sorted(entries)) or "none configured"


def _fail(name: str, value: Any, accepted: str) -> ConfigurationError:
    return ConfigurationError(f"{name}: {value!r} is not valid; expected {accepted}")


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _fail(name, value, "a boolean (True/False, or '1'/'0' in the environment)")


def _optional_bool(name: str, value: Any) -> Optional[bool]:
    return None if value is None else _bool(name, value)


def _number(
    name: str, value: Any, *, minimum: float = 0.0, strict: bool = False, integer: bool = False
) -> float:
    kind = "an integer" if integer else "a number"
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise _fail(name, value, f"{kind} {bound}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, value, f"{kind} {bound}")
    if integer and not float(value).is_integer():
        raise _fail(name, value, f"{kind} {bound}")
    if value < minimum or (strict and value == minimum):
        raise _fail(name, value, f"{kind} {bound}")
    return value


def _positive_float(name: str, value: Any) -> float:
    return float(_number(name, value, strict=True))


def _non_negative_float(name: str, value: Any) -> float:
    return float(_number(name, value))


def _optional_positive_int(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    return int(_number(name, value, minimum=1, integer=True))


def _positive_int(name: str, value: Any) -> int:
    return int(_number(name, value, minimum=1, integer=True))


def _redis_url(name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    from .storage.urls import SUPPORTED_SCHEMES, parse_redis_url

    if not isinstance(value, str):
        raise _fail(name, value, "a Redis URL string")
    try:
        parse_redis_url(value)
    except ValueError as exc:
        raise ConfigurationError(f"{name}: {exc}; accepted schemes: {SUPPORTED_SCHEMES}") from None
    return value


def _key_prefix(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in " {}\n"):
        raise _fail(name, value, "a non-empty string without spaces or braces")
    return value


def _choice(*choices: str) -> Parser:
    def parse(name: str, value: Any) -> str:
        if value not in choices:
            raise _fail(name, value, " or ".join(repr(c) for c in choices))
        return str(value)

    return parse


def _mapping(name: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(name, value, "a dict")
    for key in value:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"{name}: key {key!r} must be a non-empty string")
    return value


@dataclass(frozen=True)
class LimiterSpec:
    """A named rate limit from ``tuning_rate_limits``."""

    name: str
    rate: Rate
    burst: int = 1
    adaptive: bool = False


def parse_limiter_spec(where: str, name: str, value: Any) -> LimiterSpec:
    """Validate one ``tuning_rate_limits`` entry (also used by ``@rate_limit``)."""
    if isinstance(value, (str, Rate)):
        value = {"rate": value}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{where}: {value!r} is not valid; expected {RATE_FORMS} "
            "or a dict like {'rate': '20/s', 'burst': 5}"
        )
    unknown = set(value) - {"rate", "burst", "adaptive"}
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown option(s) {sorted(unknown)}; accepted: 'rate', 'burst', 'adaptive'"
        )
    if "rate" not in value:
        raise ConfigurationError(f"{where}: missing 'rate' ({RATE_FORMS})")
    try:
        rate = parse_rate(value["rate"])
    except ValueError as exc:
        raise ConfigurationError(f"{where}.rate: {exc}") from None
    burst = int(_number(f"{where}.burst", value.get("burst", 1), minimum=1, integer=True))
    adaptive = _bool(f"{where}.adaptive", value.get("adaptive", False))
    return LimiterSpec(name=name, rate=rate, burst=burst, adaptive=adaptive)


def _rate_limits(name: str, value: Any) -> Dict[str, LimiterSpec]:
    return {
        key: parse_limiter_spec(f"{name}[{key!r}]", key, spec)
        for key, spec in _mapping(name, value).items()
    }


def _resolve_exclusion(where: str, item: Any) -> Any:
    """An exception class, a dotted path to one, or a predicate ``exc -> bool``."""
    if isinstance(item, str):
        path = item
        module, _, attr = path.rpartition(".")
        try:
            item = getattr(importlib.import_module(module), attr) if module else None
        except (ImportError, AttributeError, ValueError):
            item = None
        if item is None:
            raise ConfigurationError(f"{where}: cannot import {path!r}; expected 'package.module.ExceptionClass'")
    if isinstance(item, type) and issubclass(item, BaseException):
        return item
    if callable(item) and not isinstance(item, type):
        return item
    raise ConfigurationError(
        f"{where}: {item!r} is not an exception class, a dotted path to one, or a predicate")


def parse_breaker_spec(where: str, spec: Any) -> Dict[str, Any]:
    """Validate one ``tuning_circuit_breakers`` entry (also used by ``@circuit_breaker``)."""
    if not isinstance(spec, Mapping):
        raise _fail(where, spec, "a dict like {'fail_max': 5, 'reset_timeout': 60}")
    allowed = {"fail_max", "reset_timeout", "success_threshold", "exclude", "trial_timeout"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown option(s) {sorted(unknown)}; accepted: {sorted(allowed)}"
        )
    exclude = spec.get("exclude", ())
    if not isinstance(exclude, (list, tuple)):
        exclude = (exclude,)
    return {
        "fail_max": _positive_int(f"{where}.fail_max", spec.get("fail_max", 5)),
        "reset_timeout": _positive_float(f"{where}.reset_timeout", spec.get("reset_timeout", 60)),
        "success_threshold": _positive_int(f"{where}.success_threshold", spec.get("success_threshold", 1)),
        "trial_timeout": _positive_float(f"{where}.trial_timeout", spec.get("trial_timeout", 60)),
        "exclude": tuple(_resolve_exclusion(f"{where}.exclude[{i}]", x) for i, x in enumerate(exclude)),
    }


def _breakers(name: str, value: Any) -> Dict[str, Dict[str, Any]]:
    return {key: parse_breaker_spec(f"{name}[{key!r}]", spec) for key, spec in _mapping(name, value).items()}


def _sla(name: str, value: Any) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for key, spec in _mapping(name, value).items():
        where = f"{name}[{key!r}]"
        if not isinstance(spec, Mapping):
            raise _fail(where, spec, "a dict like {'warning': 10, 'critical': 30}")
        unknown = set(spec) - {"warning", "critical", "on"}
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown option(s) {sorted(unknown)}; accepted: 'warning', 'critical', 'on'"
            )
        parsed: Dict[str, Any] = {"on": _choice("wait", "run", "total")(f"{where}.on", spec.get("on", "total"))}
        for level in ("warning", "critical"):
            if spec.get(level) is not None:
                parsed[level] = _positive_float(f"{where}.{level}", spec[level])
        if "warning" in parsed and "critical" in parsed and parsed["warning"] > parsed["critical"]:
            raise ConfigurationError(
                f"{where}: warning ({parsed['warning']}) must not exceed critical ({parsed['critical']})"
            )
        out[key] = parsed
    return out


PROFILE_FIELDS = (
    "pool", "concurrency", "prefetch_multiplier", "acks_late", "max_tasks_per_child",
    "max_memory_per_child", "time_limit", "soft_time_limit", "autoscale",
)
PRESET_PROFILES = ("io", "cpu", "mixed")
POOLS = ("prefork", "threads", "solo", "processes", "eventlet", "gevent")


def _autoscale(name: str, value: Any) -> Tuple[int, int]:
    accepted = "(max, min) or 'max,min' with max >= 1 and 0 <= min <= max"
    parts: Any = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        raise _fail(name, value, accepted)
    try:
        high = int(_number(name, parts[0], minimum=1, integer=True))
        low = int(_number(name, parts[1], minimum=0, integer=True))
    except ConfigurationError:
        raise _fail(name, value, accepted) from None
    if low > high:
        raise _fail(name, value, accepted)
    return high, low


def _profile_field(where: str, field: str, value: Any) -> Any:
    name = f"{where}[{field!r}]"
    if field == "pool":
        if value not in POOLS:
            raise _fail(name, value, "one of " + ", ".join(POOLS))
        return value
    if field == "acks_late":
        return _bool(name, value)
    if field in ("time_limit", "soft_time_limit"):
        return _number(name, value, strict=True)
    if field == "autoscale":
        return _autoscale(name, value)
    if field == "concurrency" and value in ("cpus", "2*cpus"):
        return value
    return _positive_int(name, value)


def _profiles(name: str, value: Any) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for key, spec in _mapping(name, value).items():
        where = f"{name}[{key!r}]"
        if not isinstance(spec, Mapping):
            raise _fail(where, spec, "a dict of " + ", ".join(PROFILE_FIELDS))
        unknown = set(spec) - set(PROFILE_FIELDS) - {"base"}
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown option(s) {sorted(unknown)}; accepted: {', '.join(PROFILE_FIELDS)}"
            )
        out[key] = {field: v if field == "base" else _profile_field(where, field, v) for field, v in spec.items()}
    return out


def _queue_profiles(name: str, value: Any) -> Dict[str, str]:
    out = {}
    for queue, profile in _mapping(name, value).items():
        if not isinstance(profile, str) or not profile:
            raise _fail(f"{name}[{queue!r}]", profile, "a profile name such as 'io', 'cpu' or 'mixed'")
        out[queue] = profile
    return out


def _int_caps(name: str, value: Any) -> Dict[str, int]:
    return {
        key: _positive_int(f"{name}[{key!r}]", cap) for key, cap in _mapping(name, value).items()
    }


def _buckets(name: str, value: Any) -> Optional[Tuple[float, ...]]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise _fail(name, value, "a non-empty list of increasing numbers of seconds")
    out = tuple(float(_number(f"{name}[{i}]", v, strict=True)) for i, v in enumerate(value))
    if list(out) != sorted(set(out)):
        raise _fail(name, value, "a list of strictly increasing numbers of seconds")
    return out


def _metrics_port(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    port = int(_number(name, value, minimum=0, integer=True))
    if port > 65535:
        raise _fail(name, value, "a TCP port 0-65535, or None to disable the endpoint")
    return port


def _bind_address(name: str, value: Any) -> str:
    import ipaddress

    if isinstance(value, str):
        if value == "localhost":
            return value
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    raise _fail(name, value, "an IP address to listen on, such as '0.0.0.0', '127.0.0.1' or '::'")


SETTINGS: Tuple[Setting, ...] = (
    Setting("tuning_enabled", "bool", True,
            "Kill switch: False makes TunedTask behave exactly like celery.Task.",
            _bool, env="CELERY_TUNING_ENABLED"),
    Setting("tuning_redis_url", "str | None", None,
            "Redis holding the shared state (redis://, rediss://, unix://, sentinel://, "
            "redis+cluster://). Default: the broker URL when the broker is Redis.",
            _redis_url),
    Setting("tuning_key_prefix", "str", "tuning",
            "Prefix of every Redis key celery-tuning writes.", _key_prefix),
    Setting("tuning_redis_socket_timeout", "float (s)", 0.5,
            "Socket read/write timeout so a dead Redis never hangs a task.", _positive_float),
    Setting("tuning_redis_connect_timeout", "float (s)", 0.5,
            "Socket connect timeout.", _positive_float),
    Setting("tuning_redis_max_connections", "int | None", None,
            "Upper bound of the per-process connection pool (None: unbounded).",
            _optional_positive_int),
    Setting("tuning_rate_limits", "dict[str, str | dict]", {},
            "Named rate limits: {'openai': '20/s'} or {'openai': {'rate': '20/s', 'burst': 5}}.",
            _rate_limits),
    Setting("tuning_rate_limit_on_redis_error", "'local' | 'allow' | 'deny'", "local",
            "What a limiter does when Redis is unreachable.", _choice("local", "allow", "deny")),
    Setting("tuning_circuit_breakers", "dict[str, dict]", {},
            "Named breakers: {'payments': {'fail_max': 5, 'reset_timeout': 60}}; also success_threshold, "
            "trial_timeout (s) and exclude (exception classes, dotted paths or predicates).", _breakers),
    Setting("tuning_breaker_on_redis_error", "'local' | 'closed' | 'open'", "local",
            "What a breaker does when Redis is unreachable ('local': per-process state).",
            _choice("local", "closed", "open")),
    Setting("tuning_breaker_refresh_interval", "float (s)", 0.5,
            "How long a process trusts its cached breaker state; bounds how fast an open state spreads "
            "(0: ask Redis on every call).", _non_negative_float),
    Setting("tuning_cache_l1_maxsize", "int", 1024,
            "Entries kept in each process's in-memory (L1) result cache.", _positive_int),
    Setting("tuning_cache_l1_max_bytes", "int", 16 * 2**20,
            "Bytes (encoded values) kept in each process's L1 result cache, per task; an entry "
            "counts at least this divided by tuning_cache_l1_maxsize.", _positive_int),
    Setting("tuning_cache_write_behind", "bool", False,
            "True: a task that computed a cached value returns without waiting for Redis to take it; a "
            "background thread per process writes stores in batches (the single-flight lock is held "
            "until the value lands). Costs a second pool connection per process while stores and "
            "tasks overlap. False: each store is a round trip inside the task.", _bool),
    Setting("tuning_sla", "dict[str, dict]", {},
            "Per-queue SLA thresholds in seconds: {'webhooks': {'warning': 10, 'critical': 30}}; "
            "'*' applies to every other queue.",
            _sla),
    Setting("tuning_profiles", "dict[str, dict]", {},
            "Custom concurrency profiles beside the presets io, cpu and mixed.", _profiles),
    Setting("tuning_queue_profiles", "dict[str, str]", {},
            "Queue name to profile name: {'webhooks': 'io', 'embeddings': 'cpu'}.",
            _queue_profiles),
    Setting("tuning_queue_concurrency", "dict[str, int]", {},
            "Per-queue in-flight caps inside one worker.", _int_caps),
    Setting("tuning_concurrency_limits", "dict[str, int]", {},
            "Cluster-wide caps on tasks running at once, by name.", _int_caps),
    Setting("tuning_concurrency_lease_ttl", "float (s)", 30.0,
            "Lifetime of a concurrency-limit lease or a cache single-flight lock without renewal: how soon "
            "a dead worker's slot or lock returns.",
            _positive_float),
    Setting("tuning_concurrency_scale", "float", 1.0,
            "Multiplies profile concurrency (operators set it from the environment).",
            _positive_float, env="CELERY_TUNING_CONCURRENCY_SCALE"),
    Setting("tuning_timing", "bool | None", None,
            "Worker-side timing (task_timed signal, SLA checks). None: on when tuning_sla, an @sla "
            "task or tuning_metrics_port needs it, so pass-through workers pay nothing.",
            _optional_bool),
    Setting("tuning_metrics_buckets", "list[float] | None", None,
            "Histogram buckets in seconds for the task timing metrics (None: 5 ms to 2 h).", _buckets),
    Setting("tuning_metrics_port", "int | None", None,
            "Port of the worker's Prometheus endpoint (None: no endpoint).", _metrics_port),
    Setting("tuning_metrics_address", "str", "0.0.0.0",
            "Address the metrics endpoint listens on: every interface by default, so a Prometheus "
            "server on another host can scrape it; '127.0.0.1' keeps it to a local agent.", _bind_address),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class TuningConfig:
    """Parsed, validated settings of one app (attribute = setting name less ``tuning_``)."""

    values: Dict[str, Any] = field(default_factory=dict)
    #: Setting name -> where its value came from ('default', 'config' or 'env').
    sources: Dict[str, str] = field(default_factory=dict)

    def __getattr__(self, attr: str) -> Any:
        try:
            return self.values[attr]
        except KeyError:
            raise AttributeError(attr) from None


def _normalize_key(key: str) -> Optional[str]:
    low = key.lower()
    if low.startswith("celery_tuning_"):
        low = low[len("celery_"):]
    return low if low.startswith("tuning_") else None


def load_config(
    conf: Mapping[str, Any],
    environ: Optional[Mapping[str, str]] = None,
) -> TuningConfig:
    """Validate every ``tuning_*`` key of a Celery config.

    Arguments:
        conf: ``app.conf`` or any mapping; Django-style ``CELERY_TUNING_*``
            keys are accepted too.
        environ: Environment to read overrides from (default ``os.environ``).

    Returns:
        The parsed settings.

    Raises:
        ConfigurationError: Naming the first bad or unknown setting.
    """
    environ = os.environ if environ is None else environ
    raw: Dict[str, Any] = {}
    for key in list(conf.keys()):
        name = _normalize_key(str(key))
        if name is None:
            continue
        if name not in _BY_NAME:
            # Compare without the shared 'tuning_' prefix, which would make everything look close.
            stems = {n[len("tuning_"):]: n for n in _BY_NAME}
            close = difflib.get_close_matches(name[len("tuning_"):], stems, n=1, cutoff=0.6)
            hint = f"; did you mean {stems[close[0]]!r}?" if close else ""
            raise ConfigurationError(f"{key}: unknown celery-tuning setting{hint}")
        raw[name] = conf[key]
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for setting in SETTINGS:
        if setting.env and environ.get(setting.env, "") != "":
            values[setting.attr] = setting.parse(setting.env, environ[setting.env])
            sources[setting.name] = "env"
        elif setting.name in raw:
            values[setting.attr] = setting.parse(setting.name, raw[setting.name])
            sources[setting.name] = "config"
        else:
            values[setting.attr] = setting.default
            sources[setting.name] = "default"
    return TuningConfig(values=values, sources=sources)


def render_settings_markdown() -> str:
    """Render the settings reference page (docs/settings.md) from :data:`SETTINGS`."""
    lines = [
        "# Settings reference",
        "",
        "Generated from `celery_tuning/conf.py` by `python docs/generate_settings.py`; "
        "a test fails when this page is out of date.",
        "",
        "Set these in the Celery config you already have (`app.conf.update(...)`); with "
        "Django's `namespace='CELERY'` write them as `CELERY_TUNING_*`. They are read when Celery "
        "configures the app, so settings given after `celery_tuning.install(app)` count. Invalid values "
        "raise `celery_tuning.ConfigurationError`, naming the setting, where the settings are first "
        "needed: binding a task with policy, worker start, `celery tuning`, `limiter()`/`breaker()` "
        "(or at `install(app)` on an app already configured).",
        "",
        "| setting | type | default | environment | description |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        env = f"`{s.env}`" if s.env else ""
        lines.append(f"| `{s.name}` | {s.type} | `{s.default!r}` | {env} | {s.doc} |")
    return "\n".join(lines) + "\n"
