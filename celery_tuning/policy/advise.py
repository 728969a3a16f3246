"""Profile advice per queue from observed metrics: how cpu-bound tasks are, how long they wait.

Pure functions over Prometheus samples (name, labels, value), so the CLI can feed them a scrape of
one or more workers' ``/metrics`` pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

__all__ = ["Advice", "QueueObservation", "advise", "observe", "quantile"]

#: CPU time over run time at or above which a queue counts as cpu-bound, and at or below which
#: it counts as io-bound; in between it is mixed.
CPU_BOUND = 0.6
IO_BOUND = 0.25


def quantile(buckets: List[Tuple[float, float]], q: float) -> Optional[float]:
    """Quantile from cumulative (upper bound, count) buckets, interpolated within a bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            span = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / span if span else 1.0)
        lower_bound, lower_count = bound, count
    return None


@dataclass
class QueueObservation:
    """What the metrics say about one queue (summed over tasks and workers)."""

    queue: str
    attempts: float = 0.0
    run_seconds: float = 0.0
    cpu_seconds: float = 0.0
    wait_buckets: Dict[float, float] = field(default_factory=dict)

    @property
    def cpu_ratio(self) -> Optional[float]:
        return min(1.0, self.cpu_seconds / self.run_seconds) if self.run_seconds > 0 else None

    @property
    def mean_run(self) -> Optional[float]:
        return self.run_seconds / self.attempts if self.attempts else None

    @property
    def wait_p95(self) -> Optional[float]:
        return quantile(sorted(self.wait_buckets.items()), 0.95)


@dataclass
class Advice:
    queue: str
    profile: Optional[str]
    current: Optional[str]
    observation: QueueObservation
    reasons: List[str]

    def as_dict(self) -> Dict[str, object]:
        o = self.observation
        return {"queue": self.queue, "profile": self.profile, "current": self.current,
                "attempts": o.attempts, "cpu_ratio": o.cpu_ratio, "mean_run_seconds": o.mean_run,
                "wait_p95_seconds": o.wait_p95, "reasons": list(self.reasons)}


def observe(samples: Iterable[Tuple[str, Mapping[str, str], float]]) -> Dict[str, QueueObservation]:
    """Per-queue totals from metric samples (several scrapes may be concatenated)."""
    queues: Dict[str, QueueObservation] = {}
    for name, labels, value in samples:
        queue = labels.get("queue")
        if queue is None:
            continue
        if name == "celery_tuning_task_run_seconds_count":
            queues.setdefault(queue, QueueObservation(queue)).attempts += value
        elif name == "celery_tuning_task_run_seconds_sum":
            queues.setdefault(queue, QueueObservation(queue)).run_seconds += value
        elif name == "celery_tuning_task_cpu_seconds_total":
            queues.setdefault(queue, QueueObservation(queue)).cpu_seconds += value
        elif name == "celery_tuning_task_queue_wait_seconds_bucket":
            buckets = queues.setdefault(queue, QueueObservation(queue)).wait_buckets
            bound = float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
    return queues


def _secs(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def advise(observations: Mapping[str, QueueObservation], current: Mapping[str, str],
           min_attempts: int = 20) -> List[Advice]:
    """A profile per observed queue, with the reasons in words."""
    out = []
    for queue in sorted(observations):
        o = observations[queue]
        reasons: List[str] = []
        profile: Optional[str] = None
        ratio = o.cpu_ratio
        if o.attempts < min_attempts or ratio is None or o.mean_run is None:
            reasons.append(f"only {o.attempts:.0f} task attempts observed (need {min_attempts}): no advice yet")
        else:
            share = f"CPU time is {ratio * 100:.0f}% of run time (mean run {_secs(o.mean_run)})"
            if ratio >= CPU_BOUND:
                profile = "cpu"
                reasons.append(f"{share}: cpu-bound, one process per core")
            elif ratio <= IO_BOUND:
                profile = "io"
                reasons.append(f"{share}: io-bound, many threads are cheap")
            else:
                profile = "mixed"
                reasons.append(f"{share}: mixed, processes above the core count")
            p95 = o.wait_p95
            if p95 is not None and p95 > max(1.0, 5 * o.mean_run):
                more = "more workers or cores" if profile == "cpu" else "more concurrency"
                reasons.append(f"p95 queue wait {_secs(p95)} is {p95 / o.mean_run:.0f}x the mean run: "
                               f"the queue is short of capacity ({more})")
            if current.get(queue) == profile:
                reasons.append("matches the configured profile")
        out.append(Advice(queue, profile, current.get(queue), o, reasons))
    return out
