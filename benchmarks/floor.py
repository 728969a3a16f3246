"""The floor under "everything on": plain Celery tasks that make bare Redis round trips of their own.

A cached task's miss path has to ask Redis who computes the value (single flight across workers)
and, unless the store is deferred, tell Redis the result: two round trips that no implementation
can skip. Running plain Celery with a no-op task that makes one or two bare EVALSHA round trips,
next to plain and everything-on in the same run, shows how much of the everything-on ratio is
Redis's round trip on this machine and how much is celery-tuning's own work.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List

VARIANTS = ("plain", "trip1", "trip2", "everything")


def run(url: str, run_worker_once: Callable[..., Dict[str, float]], pools: List[str], tasks: int,
        runs: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for pool in pools:
        rates: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        for _ in range(runs):
            for variant in VARIANTS:  # interleaved so drift hits all alike
                rates[variant].append(run_worker_once(url, variant, pool, tasks)["tasks_per_s"])
        plain = statistics.median(rates["plain"])
        out[pool] = {v: {"median": statistics.median(r), "min": min(r), "max": max(r),
                         "ratio": statistics.median(r) / plain} for v, r in rates.items()}
    return out


def render(result: Dict[str, Any], tasks: int, runs: int) -> str:
    lines = [
        f"Floor: plain Celery no-op tasks that make bare Redis round trips of their own, {tasks} tasks, "
        f"median of {runs} runs (min-max), ratio to plain in the same run",
        "",
        "| pool | plain tasks/s | 1 round trip per task | ratio | 2 round trips per task | ratio "
        "| everything on | ratio (target >= 0.80) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pool, e in result.items():
        cells = [f"{x['median']:.0f} ({x['min']:.0f}-{x['max']:.0f})" for x in (e[v] for v in VARIANTS)]
        lines.append(f"| {pool} | {cells[0]} | {cells[1]} | {e['trip1']['ratio']:.3f}"
                     f" | {cells[2]} | {e['trip2']['ratio']:.3f}"
                     f" | {cells[3]} | {e['everything']['ratio']:.3f} |")
    return "\n".join(lines)
