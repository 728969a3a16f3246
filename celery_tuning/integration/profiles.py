"""Apply a concurrency profile to a worker before Celery reads its settings."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from celery import bootsteps

from ..errors import ConfigurationError
from ..policy.profiles import (
    PRESETS,
    PROFILE_FIELDS,
    ProfileConflict,
    ProfileError,
    UnknownProfile,
    choose_profile,
    expand_profile,
    known_profiles,
    resolve_profile,
)
from .runtime import is_worker_process

__all__ = [
    "CONF_KEYS", "AutoscaleStep", "apply_profile", "configured_queues", "parse_worker_argv", "profile_table",
    "profiles_apply_here", "validate_profiles", "worker_queues",
]

logger = logging.getLogger("celery_tuning.profiles")

#: Profile field -> Celery setting (from the one table, policy.profiles.PROFILE_FIELDS).
CONF_KEYS: Dict[str, str] = {f.name: f.setting for f in PROFILE_FIELDS if f.setting is not None}

#: Profile field -> the `celery worker` flags that set it explicitly (those always win).
_FLAGS: Dict[str, Tuple[str, ...]] = {f.name: f.flags for f in PROFILE_FIELDS if f.flags}


def _flag_value(argv: Sequence[str], names: Tuple[str, ...]) -> Tuple[bool, Optional[str]]:
    """Whether one of ``names`` is given, and its value: the last one given, as Celery's command
    line keeps it (``-Q a -Q b`` consumes ``b`` only)."""
    found, value = False, None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name:
                found, value = True, (argv[i + 1] if i + 1 < len(argv) else None)
            elif name.startswith("--") and arg.startswith(name + "="):
                found, value = True, arg.split("=", 1)[1]
            elif not name.startswith("--") and arg.startswith(name) and len(arg) > len(name):
                found, value = True, arg[len(name):]
    return found, value


def parse_worker_argv(argv: Sequence[str]) -> Tuple[List[str], Optional[str], Set[str]]:
    """(queues given with -Q, --tuning-profile value, profile fields set by explicit flags)."""
    args = _worker_args(argv)
    _, queues = _flag_value(args, ("-Q", "--queues"))
    _, explicit = _flag_value(args, ("--tuning-profile",))
    given = {field for field, names in _FLAGS.items() if _flag_value(args, names)[0]}
    return _names(queues), explicit, given


def _worker_args(argv: Sequence[str]) -> List[str]:
    args = list(argv)
    return args[args.index("worker") + 1:] if "worker" in args else args


def _names(value: Optional[str]) -> List[str]:
    return [q for q in (value or "").split(",") if q]


def configured_queues(app: Any) -> List[str]:
    """The queues a worker started without -Q consumes: every queue in ``task_queues``, else the default queue."""
    declared = app.conf.task_queues
    if isinstance(declared, Mapping):
        names = [str(name) for name in declared]
    else:
        names = [str(getattr(q, "name", q)) for q in declared or ()]
    return names or [str(app.conf.task_default_queue or "celery")]


def worker_queues(app: Any, argv: Sequence[str]) -> List[str]:
    """The queues a worker started with ``argv`` consumes: its -Q list or :func:`configured_queues`, minus -X."""
    queues, _, _ = parse_worker_argv(argv)
    excluded = set(_names(_flag_value(_worker_args(argv), ("-X", "--exclude-queues"))[1]))
    return [q for q in queues or configured_queues(app) if q not in excluded]


def validate_profiles(config: Any) -> None:
    """Refuse a profile configuration no worker can use (the worker start and ``tuning check`` both call this).

    Every custom profile must resolve (a known ``base``, no cycle; the settings loader checks that
    too) and every profile ``tuning_queue_profiles`` names must exist.

    Raises:
        ConfigurationError: Naming the setting and the profile at fault.
    """
    for name in config.profiles:
        try:
            resolve_profile(name, config.profiles)
        except ProfileError as exc:
            raise ConfigurationError(str(exc)) from None
    for queue, name in config.queue_profiles.items():
        if name not in PRESETS and name not in config.profiles:
            raise ConfigurationError(f"tuning_queue_profiles[{queue!r}]: unknown profile {name!r}; "
                                     f"known: {known_profiles(config.profiles)}")


def apply_profile(app: Any, config: Any, argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """Choose and apply this worker's profile to ``app.conf``; returns what was applied.

    Explicit worker flags win because Celery reads a flag's value before falling back to the
    settings written here. A worker without -Q takes the profile of the queues it consumes then
    (``task_queues``, or the default queue).

    Raises:
        ConfigurationError: On conflicting queue profiles, an unknown profile name or a profile
            configuration :func:`validate_profiles` refuses.
    """
    argv = sys.argv if argv is None else argv
    validate_profiles(config)
    _, explicit, given = parse_worker_argv(argv)
    queues = worker_queues(app, argv)
    try:
        name, why = choose_profile(queues, config.queue_profiles, explicit)
    except ProfileConflict as exc:
        raise ConfigurationError(str(exc)) from None
    if name is None:
        return None
    scale = float(config.concurrency_scale)
    try:
        settings = expand_profile(name, config.profiles, scale)
    except UnknownProfile:
        raise ConfigurationError(f"{why}: unknown profile {name!r}; known: {known_profiles(config.profiles)}") from None
    except ProfileError as exc:
        raise ConfigurationError(str(exc)) from None
    applied: Dict[str, Any] = {"profile": name, "chosen_by": why, "queues": queues, "settings": {}}
    scaled = f" x CELERY_TUNING_CONCURRENCY_SCALE={scale:g}" if scale != 1.0 else ""
    for field, value in settings.items():
        if field not in CONF_KEYS and field != "autoscale":
            continue
        if field in given:
            applied["settings"][field] = ("flag", None)
            continue
        if field == "autoscale":
            if "concurrency" in given:  # an explicit -c wins over the profile's autoscale too
                applied["settings"][field] = ("flag -c", None)
                continue
            applied["autoscale"] = tuple(value)  # applied by AutoscaleStep (no setting exists)
            applied["settings"][field] = (f"profile {name}{scaled}", tuple(value))
            continue
        app.conf[CONF_KEYS[field]] = value
        applied["settings"][field] = (f"profile {name}{scaled if field == 'concurrency' else ''}", value)
    return applied


class AutoscaleStep(bootsteps.Step):
    """Worker step giving the pool the profile's ``autoscale`` (Celery only takes it as a flag).

    Runs right after the Pool step's ``__init__`` read the (absent) flag and before the pool is
    created, so the pool starts at the profile's minimum and Celery's own autoscaler grows it.
    """

    label = "celery-tuning autoscale"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        from .runtime import runtime_for

        profile = runtime_for(w.app).profile or {}
        scale = profile.get("autoscale")
        if not scale or w.autoscale:
            return
        high, low = scale
        w.autoscale = [high, low]
        w.max_concurrency, w.min_concurrency = high, low
        # Celery's autoscaler step decides in its __init__ whether it is enabled: when it was
        # built before this one, tell it now.
        component = w.blueprint.steps.get("celery.worker.autoscale.WorkerComponent")
        if isinstance(component, bootsteps.Step):
            component.enabled = True


def describe(applied: Dict[str, Any]) -> str:
    parts = []
    for field, (source, value) in sorted(applied["settings"].items()):
        if source.startswith("flag"):
            parts.append(f"{field}=<{source}>")
        else:
            parts.append(f"{field}={value!r} ({source})")
    return (f"celery-tuning profile {applied['profile']!r} for queues {','.join(applied['queues'])} "
            f"(chosen by {applied['chosen_by']}): " + ", ".join(parts))


def profile_table(config: Any, default_queue: str) -> List[Tuple[str, str, Dict[str, Any]]]:
    """(queue, profile, settings) for every mapped queue, as a worker started with -Q QUEUE would get."""
    rows: List[Tuple[str, str, Dict[str, Any]]] = []
    queues = sorted(set(config.queue_profiles) | {default_queue})
    for queue in queues:
        name = config.queue_profiles.get(queue)
        if name is None:
            rows.append((queue, "-", {}))
            continue
        try:
            settings = expand_profile(name, config.profiles, float(config.concurrency_scale))
        except UnknownProfile:
            settings = {"error": f"unknown profile {name!r}; known: {known_profiles(config.profiles)}"}
        except ProfileError as exc:
            settings = {"error": str(exc)}
        rows.append((queue, name, settings))
    return rows


def profiles_apply_here(argv: Optional[Sequence[str]] = None) -> bool:
    """Whether this process is a worker that takes a profile (``CELERY_TUNING_PROFILES=0`` turns that off)."""
    return is_worker_process(argv) and os.environ.get("CELERY_TUNING_PROFILES", "1") != "0"
