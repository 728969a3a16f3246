"""The floor under each feature: plain Celery tasks that make bare Redis round trips of their own.

A feature that keeps its state in Redis and answers inside the task cannot beat a plain task
making the same number of round trips itself. Issue #16's targets are measured against that
floor, in one run, interleaved:

- pass-through (TunedTask, nothing enabled) against plain: >= 0.97;
- limiter + breaker + SLA (``guarded``: everything on but the cache; the limiter's one round
  trip, the breaker answering from its cached view) against a plain task making one bare
  round trip: >= 0.90;
- everything on with a cache that misses every time (the lookup carrying the limiter's
  decision, then the store) against a plain task making two: >= 0.90.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List, Tuple

VARIANTS = ("plain", "tuned", "trip1", "guarded", "trip2", "everything")
#: (variant, the floor it is held against, target ratio)
TARGETS: Tuple[Tuple[str, str, float], ...] = (
    ("tuned", "plain", 0.97), ("guarded", "trip1", 0.90), ("everything", "trip2", 0.90))


def run(url: str, run_worker_once: Callable[..., Dict[str, float]], pools: List[str], tasks: int,
        runs: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for pool in pools:
        rates: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        cpu: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        for _ in range(runs):
            for variant in VARIANTS:  # interleaved so drift hits all alike
                one = run_worker_once(url, variant, pool, tasks)
                rates[variant].append(one["tasks_per_s"])
                cpu[variant].append(one["cpu_us_per_task"])
        plain = statistics.median(rates["plain"])
        entry: Dict[str, Any] = {
            v: {"median": statistics.median(r), "min": min(r), "max": max(r),
                "ratio": statistics.median(r) / plain, "cpu_us_per_task": statistics.median(cpu[v])}
            for v, r in rates.items()}
        entry["targets"] = {f"{v}/{floor}": {"ratio": entry[v]["median"] / entry[floor]["median"], "target": t}
                            for v, floor, t in TARGETS}
        out[pool] = entry
    return out


def render(result: Dict[str, Any], tasks: int, runs: int) -> str:
    lines = [
        f"Floor: plain Celery no-op tasks that make bare Redis round trips of their own, {tasks} tasks, "
        f"median of {runs} runs (min-max), tasks/s; each feature against its floor in the same run",
        "",
        "| pool | plain | pass-through | ratio (>= 0.97) | 1 round trip | limiter + breaker + SLA "
        "| ratio to 1 trip (>= 0.90) | 2 round trips | everything on, cache missing | ratio to 2 trips (>= 0.90) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pool, e in result.items():
        c = {v: f"{e[v]['median']:.0f} ({e[v]['min']:.0f}-{e[v]['max']:.0f})" for v in VARIANTS}
        t = e["targets"]
        lines.append(f"| {pool} | {c['plain']} | {c['tuned']} | {t['tuned/plain']['ratio']:.3f}"
                     f" | {c['trip1']} | {c['guarded']} | {t['guarded/trip1']['ratio']:.3f}"
                     f" | {c['trip2']} | {c['everything']} | {t['everything/trip2']['ratio']:.3f} |")
    lines += [
        "",
        "Worker CPU per task (main process + pool children, median, µs)",
        "",
        "| pool | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    for pool, e in result.items():
        lines.append(f"| {pool} | " + " | ".join(f"{e[v]['cpu_us_per_task']:.0f}" for v in VARIANTS) + " |")
    return "\n".join(lines)
