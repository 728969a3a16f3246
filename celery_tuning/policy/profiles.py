"""Concurrency profiles: presets, custom profiles and how one is chosen for a worker's queues."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "CPU_FORMS", "POOLS", "PRESETS", "PROFILE_FIELDS", "ProfileConflict", "ProfileError", "ProfileField",
    "UnknownProfile", "choose_profile", "expand_profile", "field_named", "known_profiles", "resolve_profile",
]


@dataclass(frozen=True)
class ProfileField:
    """One field of a concurrency profile: how it is validated, what it sets, which flags win."""

    name: str
    #: How a value is checked: 'pool', 'concurrency', 'count', 'bool', 'seconds' or 'autoscale'.
    kind: str
    #: The Celery setting it writes (None: applied by a worker step, as ``autoscale`` is).
    setting: Optional[str]
    #: The ``celery worker`` flags that set it explicitly (those always win over the profile).
    flags: Tuple[str, ...] = ()


#: Every profile field, in the order they are shown (the one table of profile knowledge).
PROFILE_FIELDS: Tuple[ProfileField, ...] = (
    ProfileField("pool", "pool", "worker_pool", ("-P", "--pool")),
    ProfileField("concurrency", "concurrency", "worker_concurrency", ("-c", "--concurrency")),
    ProfileField("prefetch_multiplier", "count", "worker_prefetch_multiplier", ("--prefetch-multiplier",)),
    ProfileField("acks_late", "bool", "task_acks_late"),
    ProfileField("max_tasks_per_child", "count", "worker_max_tasks_per_child", ("--max-tasks-per-child",)),
    ProfileField("max_memory_per_child", "count", "worker_max_memory_per_child", ("--max-memory-per-child",)),
    ProfileField("time_limit", "seconds", "task_time_limit", ("--time-limit",)),
    ProfileField("soft_time_limit", "seconds", "task_soft_time_limit", ("--soft-time-limit",)),
    ProfileField("autoscale", "autoscale", None, ("--autoscale",)),
    # Celery 5.6+: how many ETA/countdown messages a worker holds (kombu raises its prefetch for
    # each), and a worker that takes a message only when a process is free (no prefetch at all).
    ProfileField("eta_task_limit", "count", "worker_eta_task_limit"),
    ProfileField("disable_prefetch", "bool", "worker_disable_prefetch", ("--disable-prefetch",)),
)

_BY_NAME = {f.name: f for f in PROFILE_FIELDS}

#: Worker pools a profile may name.
POOLS = ("prefork", "threads", "solo", "processes", "eventlet", "gevent")

#: Concurrency given relative to the machine's CPU count.
CPU_FORMS = ("cpus", "2*cpus")


def field_named(name: str) -> Optional[ProfileField]:
    """The profile field ``name`` (None when there is no such field)."""
    return _BY_NAME.get(name)


def _cpus() -> int:
    return os.cpu_count() or 1


#: The presets and why:
#: - io: tasks mostly wait on the network (webhooks, API calls). Threads are cheap, so run
#:   many; prefetch a few so a slow response does not leave slots idle; ack early (default).
#: - cpu: tasks burn CPU (embeddings, image work). One process per core; prefetch 1 so a long
#:   task does not sit on messages other workers could take; ack late so a crash redelivers;
#:   recycle children to cap slow leaks.
#: - mixed: both. Processes at twice the cores so waiting tasks do not idle a core; prefetch 2.
PRESETS: Dict[str, Dict[str, Any]] = {
    "io": {"pool": "threads", "concurrency": 32, "prefetch_multiplier": 4, "acks_late": False},
    "cpu": {"pool": "prefork", "concurrency": "cpus", "prefetch_multiplier": 1, "acks_late": True,
            "max_tasks_per_child": 1000},
    "mixed": {"pool": "prefork", "concurrency": "2*cpus", "prefetch_multiplier": 2, "acks_late": True,
              "max_tasks_per_child": 10000},
}


class ProfileError(ValueError):
    """A profile that cannot be resolved; the message names the setting at fault."""


class UnknownProfile(ProfileError):
    """No preset and no custom profile has this name (the caller says who asked for it)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown profile {name!r}")
        self.name = name


class ProfileConflict(ValueError):
    """The queues of one worker map to different profiles."""


def known_profiles(custom: Mapping[str, Any]) -> str:
    """The profile names a setting may use, for error messages."""
    return ", ".join(sorted(set(PRESETS) | set(custom)))


def resolve_profile(name: str, custom: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """The fields of profile ``name`` with its ``base`` chain applied (not scaled, CPU forms kept).

    A custom profile shadows the preset of the same name; a custom profile whose ``base`` is its
    own name extends the preset of that name (``{"cpu": {"base": "cpu", "concurrency": 3}}``).

    Raises:
        UnknownProfile: When ``name`` is neither a preset nor a custom profile.
        ProfileError: Naming the custom profile whose ``base`` is unknown, or the profiles whose
            bases form a cycle.
    """
    layers: List[Dict[str, Any]] = []
    chain: List[str] = []  # the custom profiles visited, in order
    current, presets_only = name, False
    while True:
        if current in custom and not presets_only:
            if current in chain:
                cycle = " -> ".join([*chain[chain.index(current):], current])
                raise ProfileError(f"tuning_profiles: the bases of these profiles form a cycle ({cycle}); "
                                   "one of them must extend a preset (or have no base)")
            chain.append(current)
            spec = dict(custom[current])
            base = spec.pop("base", None)
            layers.append(spec)
            if base is None:
                break
            if base == current:  # extends the preset it shadows
                if base not in PRESETS:
                    raise ProfileError(f"tuning_profiles[{current!r}]['base']: {base!r} names the profile itself "
                                       f"and there is no preset of that name (presets: {', '.join(PRESETS)})")
                presets_only = True
            elif base not in custom and base not in PRESETS:
                raise ProfileError(f"tuning_profiles[{current!r}]['base']: unknown profile {base!r}; "
                                   f"known: {known_profiles(custom)}")
            current = base
        elif current in PRESETS:
            layers.append(dict(PRESETS[current]))
            break
        else:
            raise UnknownProfile(current)
    settings: Dict[str, Any] = {}
    for layer in reversed(layers):
        settings.update(layer)
    return settings


def _scaled(count: int, scale: float, floor: int) -> int:
    return max(floor, round(count * scale))


def expand_profile(name: str, custom: Mapping[str, Mapping[str, Any]], scale: float = 1.0) -> Dict[str, Any]:
    """Concrete settings of profile ``name``: bases applied, CPU forms counted, ``scale`` applied.

    ``scale`` multiplies ``concurrency`` and both ends of ``autoscale`` (at least 1 process,
    and a minimum above 0 stays above 0).

    Raises:
        UnknownProfile: When the profile does not exist.
        ProfileError: When a ``base`` in its chain is unknown or the bases form a cycle.
    """
    settings = resolve_profile(name, custom)
    concurrency = settings.get("concurrency")
    if concurrency == "cpus":
        concurrency = _cpus()
    elif concurrency == "2*cpus":
        concurrency = 2 * _cpus()
    if concurrency is not None:
        settings["concurrency"] = _scaled(int(concurrency), scale, 1)
    autoscale = settings.get("autoscale")
    if autoscale is not None:
        high, low = (int(v) for v in autoscale)
        high = _scaled(high, scale, 1)
        settings["autoscale"] = (high, min(high, _scaled(low, scale, 1 if low else 0)))
    return settings


def choose_profile(
    queues: Sequence[str], mapping: Mapping[str, str], explicit: Optional[str] = None,
) -> Tuple[Optional[str], str]:
    """The profile for a worker consuming ``queues``, and why it was chosen.

    Raises:
        ProfileConflict: When the queues map to different profiles and none is explicit.
    """
    if explicit:
        return explicit, "--tuning-profile"
    chosen = {q: mapping[q] for q in queues if q in mapping}
    names = set(chosen.values())
    if len(names) > 1:
        detail = ", ".join(f"{q} -> {p}" for q, p in sorted(chosen.items()))
        raise ProfileConflict(
            f"tuning_queue_profiles: this worker's queues map to different profiles ({detail}); "
            "start one worker per profile or pass --tuning-profile NAME")
    if not names:
        return None, "none"
    return names.pop(), "tuning_queue_profiles[" + ", ".join(sorted(chosen)) + "]"
