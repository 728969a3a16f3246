"""The typed table of every ``tuning_*`` setting: default, type, doc and validation."""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import os
from dataclasses import dataclass, fields
from dataclasses import field as dataclass_field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from .errors import ConfigurationError
from .policy.profiles import CPU_FORMS, POOLS, PROFILE_FIELDS, ProfileError, ProfileField, field_named, resolve_profile
from .policy.rates import ACCEPTED as RATE_FORMS
from .policy.rates import Rate, parse_rate

__all__ = [
    "SETTINGS",
    "Arg",
    "BreakerSpec",
    "ConcurrencySpec",
    "LimiterSpec",
    "RateLimitSpec",
    "Setting",
    "Tier",
    "TuningConfig",
    "env_override",
    "load_config",
    "parse_breaker_spec",
    "parse_concurrency_per_key",
    "parse_concurrency_spec",
    "parse_limiter_spec",
    "parse_per_key",
    "parse_tier",
    "render_settings_markdown",
]

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
        """The :class:`TuningConfig` field holding this setting (the name less ``tuning_``)."""
        return self.name[len("tuning_"):]


def known_names(entries: Mapping[str, Any]) -> str:
    """``'a', 'b'`` (or ``none configured``) for errors about a name missing from a setting."""
    return ", ".join(repr(n) for n in sorted(entries)) or "none configured"


# -- validators shared by the settings and the decorators ---------------------------------------
#
# Each takes ``where``: what the value is called in errors. A string is a setting (or a part of
# one, ``tuning_rate_limits['api'].burst``): the message reads ``<where>: <value> is not valid;
# expected ...``, and text is accepted for numbers and booleans (settings come from the
# environment and from settings files). An :class:`Arg` is a decorator argument: the message reads
# ``@decorator(name=value): expected ...`` and values must have their Python type.


@dataclass(frozen=True)
class Arg:
    """A decorator argument named in errors: ``Arg('rate_limit', 'burst')`` -> ``@rate_limit(burst=0)``."""

    decorator: str
    name: str


Where = Union[str, Arg]


def _fail(where: Where, value: Any, accepted: str) -> ConfigurationError:
    if isinstance(where, Arg):
        return ConfigurationError(f"@{where.decorator}({where.name}={value!r}): expected {accepted}")
    return ConfigurationError(f"{where}: {value!r} is not valid; expected {accepted}")


def _bool(where: Where, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if not isinstance(where, Arg):
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    raise _fail(where, value, "a boolean (True/False, or '1'/'0' in the environment)")


def _optional_bool(where: Where, value: Any) -> Optional[bool]:
    return None if value is None else _bool(where, value)


def _number(
    where: Where, value: Any, *, minimum: float = 0.0, strict: bool = False, integer: bool = False,
    unit: str = "",
) -> float:
    kind = "an integer" if integer else "a number"
    if unit:
        kind += f" of {unit}"
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    typed = isinstance(where, Arg)  # a decorator argument: no text, and integers are ints
    if isinstance(value, str) and not typed:
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise _fail(where, value, f"{kind} {bound}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, value, f"{kind} {bound}")
    if integer and (not float(value).is_integer() or (typed and not isinstance(value, int))):
        raise _fail(where, value, f"{kind} {bound}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        finite = "a finite " + kind.split(" ", 1)[1]  # "a finite number", "a finite integer"
        raise _fail(where, value, f"{finite} {bound}" if not math.isfinite(value) else f"{kind} {bound}")
    return value


def seconds(where: Where, value: Any, *, allow_zero: bool = True) -> float:
    """A number of seconds (``>= 0``, or ``> 0`` without ``allow_zero``)."""
    return float(_number(where, value, strict=not allow_zero, unit="seconds"))


def count(where: Where, value: Any, minimum: int = 1) -> int:
    """An integer ``>= minimum``."""
    return int(_number(where, value, minimum=minimum, integer=True))


def choice(where: Where, value: Any, choices: Tuple[str, ...]) -> str:
    """One of ``choices``."""
    if value not in choices:
        quoted = [repr(c) for c in choices]
        accepted = " or ".join(quoted) if len(quoted) <= 2 else "one of " + ", ".join(quoted)
        raise _fail(where, value, accepted)
    return str(value)


def callable_or_none(where: Where, value: Any, accepted: str) -> Any:
    """A callable (or None)."""
    if value is not None and not callable(value):
        raise _fail(where, value, accepted)
    return value


def rate(where: str, value: Any) -> Rate:
    """A rate (``'20/s'``, ``'1200/m'``, ``'5000/h'``) or a :class:`Rate`."""
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


def _positive_float(name: str, value: Any) -> float:
    return float(_number(name, value, strict=True))


def _non_negative_float(name: str, value: Any) -> float:
    return float(_number(name, value))


def _optional_positive_int(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    return int(_number(name, value, minimum=1, integer=True))


#: Largest ``tuning_fair_window``.
WINDOW_MOST = 2**31 - 1


def _optional_window(name: str, value: Any) -> Optional[int]:
    """None, or an integer 1..2**31-1 (Redis scripts count the window in Lua numbers)."""
    if value is None:
        return None
    window = int(_number(name, value, minimum=1, integer=True))
    if window > WINDOW_MOST:
        raise _fail(name, value, f"an integer between 1 and {WINDOW_MOST}")
    return window


def _positive_int(name: str, value: Any) -> int:
    return int(_number(name, value, minimum=1, integer=True))


def _redis_url(name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    from .storage.urls import SUPPORTED_SCHEMES, parse_redis_url

    if not isinstance(value, str):
        raise _fail(name, value, "a Redis URL string")
    if value.strip().lower() == "memory://":
        return "memory://"  # in-process stores: one process only (tests)
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
        return choice(name, value, choices)

    return parse


def _mapping(name: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(name, value, "a dict")
    for key in value:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"{name}: key {key!r} must be a non-empty string")
    return value


def _unknown_options(where: str, spec: Mapping[str, Any], allowed: Tuple[str, ...], shown: str) -> None:
    unknown = set(spec) - set(allowed)
    if unknown:
        raise ConfigurationError(f"{where}: unknown option(s) {sorted(unknown)}; accepted: {shown}")


# -- rate limits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tier:
    """The rate and burst of one key's bucket: an entry of a limiter's ``per_key``."""

    rate: Rate
    burst: int = 1


@dataclass(frozen=True)
class LimiterSpec:
    """A named rate limit from ``tuning_rate_limits``."""

    name: str
    rate: Rate
    burst: int = 1
    adaptive: bool = False
    #: Tiers: key value (``str()`` of what the task's ``key`` returns) -> that key's rate and burst.
    per_key: Mapping[str, Tier] = dataclass_field(default_factory=dict, hash=False)


#: The same type under the capability's name.
RateLimitSpec = LimiterSpec


def parse_tier(where: str, value: Any) -> Tier:
    """One key's rate and burst: ``'100/s'`` (burst 1), a :class:`Rate`, a :class:`Tier`, or a dict
    ``{'rate': '100/s', 'burst': 20}``."""
    if isinstance(value, Tier):
        return value
    if isinstance(value, (str, Rate)):
        value = {"rate": value}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{where}: {value!r} is not valid; expected {RATE_FORMS} "
            "or a dict like {'rate': '100/s', 'burst': 20}")
    _unknown_options(where, value, ("rate", "burst"), "'rate', 'burst'")
    if "rate" not in value:
        raise ConfigurationError(f"{where}: missing 'rate' ({RATE_FORMS})")
    return Tier(rate(f"{where}.rate", value["rate"]), count(f"{where}.burst", value.get("burst", Tier.burst)))


def parse_per_key(where: str, value: Any) -> Dict[str, Tier]:
    """A limiter's ``per_key``: key value -> tier (keys compared as ``str``)."""
    if not isinstance(value, Mapping):
        raise _fail(where, value, "a dict like {'enterprise': {'rate': '100/s', 'burst': 20}}")
    tiers: Dict[str, Tier] = {}
    for key, tier in value.items():
        if key is None:
            raise ConfigurationError(f"{where}: key None names the shared bucket, not a key's; "
                                     "set the limiter's own rate instead")
        tiers[str(key)] = parse_tier(f"{where}[{key!r}]", tier)
    return tiers


def parse_limiter_spec(where: str, name: str, value: Any) -> LimiterSpec:
    """Validate one ``tuning_rate_limits`` entry."""
    if isinstance(value, (str, Rate)):
        value = {"rate": value}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{where}: {value!r} is not valid; expected {RATE_FORMS} "
            "or a dict like {'rate': '20/s', 'burst': 5}"
        )
    _unknown_options(where, value, ("rate", "burst", "adaptive", "per_key"),
                     "'rate', 'burst', 'adaptive', 'per_key'")
    if "rate" not in value:
        raise ConfigurationError(f"{where}: missing 'rate' ({RATE_FORMS})")
    return LimiterSpec(
        name=name,
        rate=rate(f"{where}.rate", value["rate"]),
        burst=count(f"{where}.burst", value.get("burst", LimiterSpec.burst)),
        adaptive=_bool(f"{where}.adaptive", value.get("adaptive", LimiterSpec.adaptive)),
        per_key=parse_per_key(f"{where}['per_key']", value.get("per_key", {})),
    )


def _rate_limits(name: str, value: Any) -> Dict[str, LimiterSpec]:
    return {
        key: parse_limiter_spec(f"{name}[{key!r}]", key, spec)
        for key, spec in _mapping(name, value).items()
    }


# -- circuit breakers -------------------------------------------------------------------------


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


@dataclass(frozen=True)
class BreakerSpec:
    """A circuit breaker's options: an entry of ``tuning_circuit_breakers`` or ``@circuit_breaker(**options)``."""

    fail_max: int = 5
    reset_timeout: float = 60.0
    success_threshold: int = 1
    #: Seconds the half-open trial lease lasts.
    trial_timeout: float = 60.0
    #: Exception classes and predicates that do not count as failures.
    exclude: Tuple[Any, ...] = ()


_BREAKER_OPTIONS = ("fail_max", "reset_timeout", "success_threshold", "exclude", "trial_timeout")


def parse_breaker_spec(where: str, spec: Any) -> BreakerSpec:
    """Validate one ``tuning_circuit_breakers`` entry (also used by ``@circuit_breaker``)."""
    if not isinstance(spec, Mapping):
        raise _fail(where, spec, "a dict like {'fail_max': 5, 'reset_timeout': 60}")
    _unknown_options(where, spec, _BREAKER_OPTIONS, str(sorted(_BREAKER_OPTIONS)))
    exclude = spec.get("exclude", ())
    if not isinstance(exclude, (list, tuple)):
        exclude = (exclude,)
    return BreakerSpec(
        fail_max=_positive_int(f"{where}.fail_max", spec.get("fail_max", BreakerSpec.fail_max)),
        reset_timeout=_positive_float(f"{where}.reset_timeout", spec.get("reset_timeout", BreakerSpec.reset_timeout)),
        success_threshold=_positive_int(f"{where}.success_threshold",
                                        spec.get("success_threshold", BreakerSpec.success_threshold)),
        trial_timeout=_positive_float(f"{where}.trial_timeout", spec.get("trial_timeout", BreakerSpec.trial_timeout)),
        exclude=tuple(_resolve_exclusion(f"{where}.exclude[{i}]", x) for i, x in enumerate(exclude)),
    )


def _breakers(name: str, value: Any) -> Dict[str, BreakerSpec]:
    return {key: parse_breaker_spec(f"{name}[{key!r}]", spec) for key, spec in _mapping(name, value).items()}


# -- SLA --------------------------------------------------------------------------------------

#: What an SLA measures: queue wait, run time, or first publish to finish.
SLA_ON = ("wait", "run", "total")


def sla_thresholds(
    where: str, part: Callable[[str], Where], warning: Any, critical: Any, on: Any,
) -> Tuple[Optional[float], Optional[float], str]:
    """``(warning, critical, on)`` checked for ``tuning_sla`` entries and ``@sla`` alike.

    ``where`` names the whole entry and ``part(field)`` one of its fields in errors.
    """
    on = choice(part("on"), on, SLA_ON)
    levels = [None if v is None else seconds(part(level), v, allow_zero=False)
              for level, v in (("warning", warning), ("critical", critical))]
    low, high = levels
    if low is not None and high is not None and low > high:
        raise ConfigurationError(f"{where}: warning ({low}) must not exceed critical ({high})")
    return low, high, on


def _sla(name: str, value: Any) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for key, spec in _mapping(name, value).items():
        where = f"{name}[{key!r}]"
        if not isinstance(spec, Mapping):
            raise _fail(where, spec, "a dict like {'warning': 10, 'critical': 30}")
        _unknown_options(where, spec, ("warning", "critical", "on"), "'warning', 'critical', 'on'")
        warning, critical, on = sla_thresholds(where, lambda part: f"{where}.{part}",  # noqa: B023 - called at once
                                               spec.get("warning"), spec.get("critical"), spec.get("on", "total"))
        parsed: Dict[str, Any] = {"on": on}
        if warning is not None:
            parsed["warning"] = warning
        if critical is not None:
            parsed["critical"] = critical
        out[key] = parsed
    return out


# -- concurrency profiles ---------------------------------------------------------------------


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


def _profile_field(where: str, field: ProfileField, value: Any) -> Any:
    name = f"{where}[{field.name!r}]"
    if field.kind == "pool":
        if value not in POOLS:
            raise _fail(name, value, "one of " + ", ".join(POOLS))
        return value
    if field.kind == "bool":
        return _bool(name, value)
    if field.kind == "seconds":
        return _number(name, value, strict=True)
    if field.kind == "autoscale":
        return _autoscale(name, value)
    if field.kind == "concurrency" and value in CPU_FORMS:
        return value
    return _positive_int(name, value)


def _profiles(name: str, value: Any) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    names = ", ".join(f.name for f in PROFILE_FIELDS)
    for key, spec in _mapping(name, value).items():
        where = f"{name}[{key!r}]"
        if not isinstance(spec, Mapping):
            raise _fail(where, spec, "a dict of " + names)
        _unknown_options(where, spec, (*(f.name for f in PROFILE_FIELDS), "base"), names)
        parsed: Dict[str, Any] = {}
        for option, v in spec.items():
            if option == "base":
                if not isinstance(v, str) or not v:
                    raise _fail(f"{where}['base']", v, "the name of a preset or of another custom profile")
                parsed[option] = v
                continue
            profile_field = field_named(option)
            parsed[option] = v if profile_field is None else _profile_field(where, profile_field, v)
        out[key] = parsed
    for key in out:  # every base chain ends at a known profile, without a cycle
        try:
            resolve_profile(key, out)
        except ProfileError as exc:
            raise ConfigurationError(str(exc)) from None
    return out


def _queue_profiles(name: str, value: Any) -> Dict[str, str]:
    out = {}
    for queue, profile in _mapping(name, value).items():
        if not isinstance(profile, str) or not profile:
            raise _fail(f"{name}[{queue!r}]", profile, "a profile name such as 'io', 'cpu' or 'mixed'")
        out[queue] = profile
    return out


# -- the rest ---------------------------------------------------------------------------------


def _int_caps(name: str, value: Any) -> Dict[str, int]:
    return {
        key: _positive_int(f"{name}[{key!r}]", cap) for key, cap in _mapping(name, value).items()
    }


# -- cluster-wide concurrency limits ------------------------------------------------------------


@dataclass(frozen=True)
class ConcurrencySpec:
    """A concurrency limit: ``tuning_concurrency_limits`` entry, or a task's inline limit."""

    name: str
    #: Holders at once (per caller key when the task gives ``key=``).
    limit: int
    #: Per-key caps: key value (``str()`` of what the task's ``key`` returns) -> that key's cap.
    per_key: Mapping[str, int] = dataclass_field(default_factory=dict, hash=False)
    _by_digest: Mapping[str, int] = dataclass_field(default_factory=dict, init=False, repr=False,
                                                    compare=False, hash=False)

    def __post_init__(self) -> None:
        from .storage.keys import key_digest

        object.__setattr__(self, "_by_digest", {key_digest(k): cap for k, cap in self.per_key.items()})

    def cap_for(self, key: Any) -> int:
        """The cap of caller key ``key`` (None: the limit's shared cap)."""
        return self.limit if key is None else self.per_key.get(str(key), self.limit)

    def cap_for_digest(self, key_hash: Optional[str]) -> int:
        """The cap of the caller key whose digest is ``key_hash`` (the mover knows only the digest)."""
        return self.limit if key_hash is None else self._by_digest.get(key_hash, self.limit)


def parse_concurrency_per_key(where: Where, value: Any) -> Dict[str, int]:
    """A concurrency limit's ``per_key``: key value -> cap (keys compared as ``str``)."""
    if not isinstance(value, Mapping):
        raise _fail(where, value, "a dict of key -> cap like {'acme': 10}")
    caps: Dict[str, int] = {}
    for key, cap in value.items():
        if key is None:
            raise ConfigurationError(f"{_where_text(where)}: key None names the shared cap, not a key's; "
                                     "set the limit's own 'limit' instead")
        caps[str(key)] = _positive_int(f"{_where_text(where)}[{key!r}]", cap)
    return caps


def _where_text(where: Where) -> str:
    return f"@{where.decorator}({where.name}=...)" if isinstance(where, Arg) else where


def parse_concurrency_spec(where: str, name: str, value: Any) -> ConcurrencySpec:
    """Validate one ``tuning_concurrency_limits`` entry: ``2`` or ``{'limit': 2, 'per_key': {'acme': 10}}``."""
    from .storage.keys import split_keyed_spot

    if split_keyed_spot(name)[1] is not None:
        raise ConfigurationError(f"{where}: a name ending in ':k:' and 24 hex digits is reserved for per-key "
                                 "parking spots; choose another name")
    if isinstance(value, Mapping):
        _unknown_options(where, value, ("limit", "per_key"), "'limit', 'per_key'")
        if "limit" not in value:
            raise ConfigurationError(f"{where}: missing 'limit' (an integer >= 1)")
        return ConcurrencySpec(name, _positive_int(f"{where}['limit']", value["limit"]),
                               parse_concurrency_per_key(f"{where}['per_key']", value.get("per_key", {})))
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _fail(where, value, "an integer >= 1 or a dict like {'limit': 2, 'per_key': {'acme': 10}}")
    return ConcurrencySpec(name, _positive_int(where, value))


def _concurrency_limits(name: str, value: Any) -> Dict[str, ConcurrencySpec]:
    return {key: parse_concurrency_spec(f"{name}[{key!r}]", key, spec)
            for key, spec in _mapping(name, value).items()}


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
            "Named rate limits: {'openai': '20/s'} or {'openai': {'rate': '20/s', 'burst': 5}}; "
            "'per_key': {'enterprise': {'rate': '100/s', 'burst': 20}} gives listed keys a tier of their own.",
            _rate_limits),
    Setting("tuning_rate_limit_on_redis_error", "'local' | 'allow' | 'deny'", "local",
            "What a limiter does when Redis is unreachable.", _choice("local", "allow", "deny")),
    Setting("tuning_rate_limit_slot_grace", "float (s)", 1.0,
            "How late a deferred task may come back for the rate-limit slot reserved for it and run at "
            "once. Later (it queued behind a backlog), the late ones take turns at the limiter's rate: a "
            "turn at most max(max_wait, grace) away is slept for in the worker, a later one deferred to. "
            "A backlog's deferred tasks come back together and would otherwise run back to back.",
            _positive_float),
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
    Setting("tuning_cache_write_behind", "bool", True,
            "True: a task that computed a cached value returns without waiting for Redis to take it; the "
            "store rides the process's next lookup, or a background thread writes it within 10 ms when no "
            "lookup comes (the single-flight lock is held until the value lands). False: each store is a "
            "round trip inside the task.", _bool),
    Setting("tuning_sla", "dict[str, dict]", {},
            "Per-queue SLA thresholds in seconds: {'webhooks': {'warning': 10, 'critical': 30}}; "
            "'*' applies to every other queue.",
            _sla),
    Setting("tuning_profiles", "dict[str, dict]", {},
            "Custom concurrency profiles beside the presets io, cpu and mixed; 'base' extends a preset or "
            "another custom profile, and a profile named like a preset extends that preset with "
            "{'cpu': {'base': 'cpu', ...}}.", _profiles),
    Setting("tuning_queue_profiles", "dict[str, str]", {},
            "Queue name to profile name: {'webhooks': 'io', 'embeddings': 'cpu'}.",
            _queue_profiles),
    Setting("tuning_queue_concurrency", "dict[str, int]", {},
            "Per-queue in-flight caps inside one worker.", _int_caps),
    Setting("tuning_concurrency_limits", "dict[str, int | dict]", {},
            "Cluster-wide caps on tasks running at once, by name: {'sync': 2}, or "
            "{'sync': {'limit': 2, 'per_key': {'acme': 10}}}. With @concurrency_limit('sync', key=...) the "
            "cap holds per key (keys hashed, idle ones expire); 'per_key' gives listed keys a cap of their own.",
            _concurrency_limits),
    Setting("tuning_concurrency_lease_ttl", "float (s)", 30.0,
            "Lifetime of a concurrency-limit lease or a cache single-flight lock without renewal: how soon "
            "a dead worker's slot or lock returns.",
            _positive_float),
    Setting("tuning_concurrency_standby", "float (s)", 10.0,
            "With tuning_defer_via='park': how long a woken concurrency waiter that found no free slot "
            "may hold on in its worker as the limit's one standby, taking the next slot a release frees "
            "(about 1 ms instead of a mover and broker round trip); it then parks again at its place. "
            "It holds a worker process meanwhile. Only limits whose tasks are all acks_late without time "
            "limits (no slot is kept for a standby otherwise), and never a per-key limit's caller-key "
            "waiters (they would hold processes other tenants need). "
            "0: no standby.", _non_negative_float),
    Setting("tuning_concurrency_scale", "float", 1.0,
            "Multiplies profile concurrency (operators set it from the environment).",
            _positive_float, env="CELERY_TUNING_CONCURRENCY_SCALE"),
    Setting("tuning_dedupe_ttl", "float (s)", 3600.0,
            "Upper bound on the life of a @dedupe lock whose decorator gives no ttl: a queued call's "
            "lock lasts at most this long (a message still queued after it no longer keeps identical "
            "calls out), a running call's is renewed up to it. A dead worker's lock goes within "
            "tuning_concurrency_lease_ttl, not this. Also how long a published @debounce run (not yet "
            "started) holds its key, so the next run waits behind a queue backlog.", _positive_float),
    Setting("tuning_defer_via", "'park' | 'countdown'", "park",
            "How a task that cannot run now (rate limit, concurrency limit, open breaker) waits: 'park' "
            "keeps it in the tuning Redis and a mover in the workers publishes it back when due (no ETA "
            "message held by a worker; see docs/parking.md); 'countdown' re-publishes it with a countdown.",
            _choice("park", "countdown")),
    Setting("tuning_park_claim_ttl", "float (s)", 30.0,
            "How long a mover holds the parked entries it claimed before they count as due again (a mover "
            "killed while publishing loses nothing).", _positive_float),
    Setting("tuning_park_ticket_ttl", "float (s)", 86400.0,
            "How long a published parked entry's ticket is kept, so a duplicate re-published by a mover that "
            "died before acknowledging is dropped instead of run twice.", _positive_float),
    Setting("tuning_park_mover", "bool", True,
            "Run a mover thread in this worker's main process (several workers' movers cooperate through "
            "an atomic claim).", _bool),
    Setting("tuning_fair_window", "int | None", None,
            "Most @fair messages of one queue released into the broker and not yet started (see "
            "docs/fair.md). None: the sum of concurrency x prefetch multiplier of the workers consuming "
            "the queue (each worker's dispatcher registers its own; none running: nothing is released). "
            "At most 2**31-1.",
            _optional_window),
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
    Setting("tuning_opentelemetry", "bool | None", None,
            "Record rate-limit waits, deferrals, parks, breaker rejections and cache hits as events on the "
            "current OpenTelemetry span (the task's run span; see docs/opentelemetry.md). None: on when "
            "opentelemetry-api is installed; True: an error at start when it is not; False: off.",
            _optional_bool),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class TuningConfig:
    """Parsed, validated settings of one app: one typed field per row of :data:`SETTINGS`.

    A field is named after its setting less ``tuning_`` (``config.rate_limits`` holds
    ``tuning_rate_limits``); a test holds the fields against the table. Made by
    :func:`load_config`, which fills every field from the config, the environment or the default.
    """

    enabled: bool
    redis_url: Optional[str]
    key_prefix: str
    redis_socket_timeout: float
    redis_connect_timeout: float
    redis_max_connections: Optional[int]
    rate_limits: Mapping[str, LimiterSpec]
    rate_limit_on_redis_error: str
    rate_limit_slot_grace: float
    circuit_breakers: Mapping[str, BreakerSpec]
    breaker_on_redis_error: str
    breaker_refresh_interval: float
    cache_l1_maxsize: int
    cache_l1_max_bytes: int
    cache_write_behind: bool
    #: Queue (or '*') -> {'on': ..., 'warning': s, 'critical': s} (levels only when given).
    sla: Mapping[str, Mapping[str, Any]]
    #: Custom profile name -> its validated fields (and 'base').
    profiles: Mapping[str, Mapping[str, Any]]
    queue_profiles: Mapping[str, str]
    queue_concurrency: Mapping[str, int]
    concurrency_limits: Mapping[str, ConcurrencySpec]
    concurrency_lease_ttl: float
    concurrency_standby: float
    concurrency_scale: float
    dedupe_ttl: float
    defer_via: str
    park_claim_ttl: float
    park_ticket_ttl: float
    park_mover: bool
    fair_window: Optional[int]
    timing: Optional[bool]
    metrics_buckets: Optional[Tuple[float, ...]]
    metrics_port: Optional[int]
    metrics_address: str
    opentelemetry: Optional[bool]
    #: Setting name -> where its value came from ('default', 'config' or 'env').
    sources: Mapping[str, str]

    @property
    def values(self) -> Dict[str, Any]:
        """Field name -> value for every setting (a copy)."""
        return {s.attr: getattr(self, s.attr) for s in SETTINGS}

    def value_of(self, setting: Setting) -> Any:
        """The value of ``setting``."""
        return getattr(self, setting.attr)

    def given(self, name: str) -> bool:
        """Whether setting ``name`` was set (in the config or the environment), not defaulted."""
        return self.sources.get(name, "default") != "default"


#: The fields of :class:`TuningConfig` that hold settings (all but ``sources``).
CONFIG_FIELDS = tuple(f.name for f in fields(TuningConfig) if f.name != "sources")


def env_override(name: str, environ: Optional[Mapping[str, str]] = None) -> Any:
    """The parsed environment override of setting ``name`` (None when the variable is unset or empty).

    Raises:
        ConfigurationError: Naming the variable, when its value is invalid.
    """
    setting = _BY_NAME[name]
    environ = os.environ if environ is None else environ
    if not setting.env or environ.get(setting.env, "") == "":
        return None
    return setting.parse(setting.env, environ[setting.env])


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
        override = env_override(setting.name, environ)
        if override is not None:
            values[setting.attr] = override
            sources[setting.name] = "env"
        elif setting.name in raw:
            values[setting.attr] = setting.parse(setting.name, raw[setting.name])
            sources[setting.name] = "config"
        else:
            values[setting.attr] = copy.copy(setting.default)  # a dict default is the config's own
            sources[setting.name] = "default"
    return TuningConfig(sources=sources, **values)


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
