"""Concurrency profiles: presets, custom profiles and how one is chosen for a worker's queues."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

__all__ = [
    "CPU_FORMS", "POOLS", "PRESETS", "PROFILE_FIELDS", "ProfileConflict", "ProfileField", "choose_profile",
    "expand_profile", "field_named",
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


class ProfileConflict(ValueError):
    """The queues of one worker map to different profiles."""


def expand_profile(name: str, custom: Mapping[str, Mapping[str, Any]], scale: float = 1.0) -> Dict[str, Any]:
    """Concrete settings of profile ``name`` (custom profiles may name a preset as ``base``).

    Raises:
        KeyError: When the profile does not exist.
    """
    if name in custom:
        spec = dict(custom[name])
        base = spec.pop("base", None)
        settings = dict(expand_profile(base, custom, 1.0)) if base else {}
        settings.update(spec)
    elif name in PRESETS:
        settings = dict(PRESETS[name])
    else:
        raise KeyError(name)
    concurrency = settings.get("concurrency")
    if concurrency == "cpus":
        concurrency = _cpus()
    elif concurrency == "2*cpus":
        concurrency = 2 * _cpus()
    if concurrency is not None:
        settings["concurrency"] = max(1, round(int(concurrency) * scale))
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
