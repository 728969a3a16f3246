"""Parking (issue #17): a burst against a shared rate limit, and a cluster-wide concurrency cap,
with ``tuning_defer_via="park"`` and ``"countdown"`` side by side in one run.

- **Burst**: ``tasks`` no-op tasks appear in the queue at once (published beforehand, then the
  list is renamed into place) for 2 prefork workers (-c 2, default prefetch) behind a shared
  200/s limit. Each run is recorded in Redis (``HINCRBY runs <task id>``, its time), so the
  section counts runs per task id, the admitted rate (steady part, whole run, max over 1 s
  windows), what each worker holds (``inspect scheduled / reserved`` every ~2 s, and the broker's
  unacked table every 0.25 s), worker RSS (start vs peak) and the tuning Redis's memory per
  parked task (``used_memory`` delta at the peak parked count, and ``MEMORY USAGE`` of the spot's
  keys) against the message's size.
- **Cap**: ``cap_tasks`` tasks of 50 ms under ``tuning_concurrency_limits = {"bench": 4}``, 2
  workers -c 4: throughput against the cap's ideal (4 / 0.05 s = 80/s) and the most bodies seen
  running at once.

The broker and the tuning store are two private redis-servers (nothing persisted), so the
tuning server's ``used_memory`` counts only what parks.
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psutil
import redis

from celery_tuning.testing import RedisServer, stop_process_groups

ROOT = Path(__file__).resolve().parents[1]
QUEUE = "bench"
HOLD = "bench.hold"
RATE = 200.0
CAP = 4
TASK_SECONDS = 0.05
MODES = ("park", "countdown")
#: The cap's floor: plain Celery handing each freed slot to the next task by one publish.
RELAY = "relay"
#: The burst with the default on_limit="auto" (tuning_defer_via="park").
AUTO = "park, on_limit auto (default)"


def _env(variant: str, broker: str, tuning: str, record: str) -> Dict[str, str]:
    return {**os.environ, "BENCH_VARIANT": variant, "BENCH_REDIS_URL": broker, "BENCH_TUNING_URL": tuning,
            "BENCH_RECORD_URL": record, "BENCH_RATE": f"{RATE:g}/s", "BENCH_CAP": str(CAP),
            "PYTHONPATH": str(ROOT)}


def _publish(env: Dict[str, str], n: int, successors: int = 0) -> None:
    args = f"({successors},)" if successors else "()"
    code = (
        "from benchmarks.apps import parked, parking_app\n"
        "with parking_app.producer_or_acquire() as p:\n"
        f"    for _ in range({n}): parked.apply_async({args}, producer=p)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(ROOT), capture_output=True)


def _rss(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _spot_keys(client: redis.Redis) -> List[bytes]:
    return sorted(client.scan_iter(match="*park:{*", count=1000))


def _parked(client: redis.Redis, spot_keys: List[bytes]) -> int:
    pipe = client.pipeline(transaction=False)
    zsets = [k for k in spot_keys if k.endswith((b":due", b":wait", b":claim"))]
    for key in zsets:
        pipe.zcard(key)
    return sum(int(x) for x in pipe.execute()) if zsets else 0


def _memory_usage(client: redis.Redis, spot_keys: List[bytes]) -> int:
    total = 0
    for key in spot_keys:
        total += int(client.memory_usage(key, samples=0) or 0)
    return total


def _payload_bytes(client: redis.Redis, spot_keys: List[bytes]) -> Optional[float]:
    msg = [k for k in spot_keys if k.endswith(b":msg")]
    if not msg:
        return None
    sample = client.hrandfield(msg[0], 50, withvalues=True) or []
    values = sample[1::2]
    return sum(len(v) for v in values) / len(values) if values else None


class _Inspector(threading.Thread):
    """``inspect scheduled / reserved / active`` every ~2 s: messages each worker holds."""

    def __init__(self, broker: str, names: List[str], period: float = 2.0) -> None:
        super().__init__(daemon=True)
        from celery import Celery

        self.app = Celery("bench_parking_inspect", broker=broker, set_as_current=False)
        self.names = names
        self.period = period
        self.stop = threading.Event()
        #: per sample: {worker: (scheduled, reserved, active)}
        self.samples: List[Dict[str, Tuple[int, int, int]]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            begun = time.monotonic()
            try:
                inspect = self.app.control.inspect(timeout=1.5, destination=self.names)
                scheduled = inspect.scheduled() or {}
                reserved = inspect.reserved() or {}
                active = inspect.active() or {}
                # Only workers that answered all three: a lost reply is no sample, not an empty worker.
                self.samples.append({name: (len(scheduled[name] or []), len(reserved[name] or []),
                                            len(active[name] or [])) for name in self.names
                                     if name in scheduled and name in reserved and name in active})
            except Exception:  # a lost reply is a missing sample, not a failed run
                pass
            self.stop.wait(max(0.0, self.period - (time.monotonic() - begun)))


def _ping(broker: str, names: List[str], timeout: float, procs: List[subprocess.Popen], log: Path) -> None:
    from celery import Celery

    app = Celery("bench_parking_ping", broker=broker, set_as_current=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        replies = app.control.ping(destination=names, timeout=1.0) or []
        if {name for reply in replies for name in reply} >= set(names):
            return
    raise RuntimeError(f"workers did not start: {log.read_text()[-3000:]}")


def _windows(times: List[float], width: float = 1.0) -> Tuple[int, int]:
    """Most and fewest runs in a ``width``-second window starting at a run, over windows that fit."""
    most, fewest = 0, len(times)
    for i, t in enumerate(times):
        if t + width > times[-1]:
            break
        count = bisect.bisect_left(times, t + width) - i
        most, fewest = max(most, count), min(fewest, count)
    return most, (fewest if most else 0)


def _running_at_once(starts: List[float], ends: List[float]) -> int:
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends], key=lambda e: (e[0], e[1]))
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def run_once(kind: str, mode: str, n: int, broker_url: str, record_url: str, tuning: RedisServer,
             workers: int = 2, concurrency: int = 2, on_limit: str = "defer") -> Dict[str, Any]:
    """One burst (``kind="rl"``) or cap (``"cc"``) run of ``n`` tasks with ``tuning_defer_via=mode``
    (the burst's task with ``@rate_limit(on_limit=on_limit)``)."""
    broker, record, store = redis.Redis.from_url(broker_url), redis.Redis.from_url(record_url), tuning.client()
    broker.flushdb()
    record.flushdb()
    store.flushall()
    env = {**_env(f"{mode}-{kind}", broker_url, tuning.url, record_url), "BENCH_ON_LIMIT": on_limit}
    first = CAP if mode == RELAY else n  # relay: CAP chains, each run publishing the next
    _publish(env, first, successors=n // CAP - 1 if mode == RELAY else 0)
    if broker.llen(QUEUE) != first:
        raise RuntimeError(f"published {broker.llen(QUEUE)} of {first}")
    message_bytes = len(broker.lindex(QUEUE, 0) or b"")
    broker.rename(QUEUE, HOLD)  # out of the workers' sight until they are up and measured
    log = Path(tempfile.NamedTemporaryFile(prefix="bench-parking-", suffix=".log", delete=False).name)
    names = [f"parking{i}@bench" for i in range(workers)]
    with log.open("ab") as out:
        procs = [subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.apps:parking_app", "worker", "-P", "prefork",
             "-c", str(concurrency), "-Q", QUEUE, "-n", name, "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-l", "WARNING"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
            for name in names]
    inspector: Optional[_Inspector] = None
    try:
        _ping(broker_url, names, 60, procs, log)
        time.sleep(1.0)  # settle: pool children up, first imports done
        rss_start = [_rss(p.pid) for p in procs]
        memory_start = int(store.info("memory")["used_memory"])
        scripts_start = int(store.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
        inspector = _Inspector(broker_url, names)
        released = time.time()
        broker.rename(HOLD, QUEUE)
        inspector.start()
        rss_peak = list(rss_start)
        held_max = 0  # the broker's unacked table: every message delivered and not yet acked, all workers
        parked_peak, memory_at_peak, usage_at_peak, payload = 0, 0, 0, None
        usage_at = 0.0
        keys: List[bytes] = []
        budget = (n / RATE if kind == "rl" else n / CAP * TASK_SECONDS) * 3 + 120
        deadline = time.monotonic() + budget
        last_count, last_progress = -1, time.monotonic()
        drained: Optional[float] = None  # when the fresh backlog had left the queue
        while time.monotonic() < deadline:
            if drained is None and not broker.llen(QUEUE):
                drained = time.time() - released
            done = int(record.hlen("runs"))
            if done != last_count:
                last_count, last_progress = done, time.monotonic()
            if done >= n and not broker.llen(QUEUE) and not broker.hlen("unacked"):
                break
            if time.monotonic() - last_progress > 300:
                break  # stalled (a fresh backlog can take minutes to leave the queue): report what ran
            held_max = max(held_max, int(broker.hlen("unacked")))
            rss_peak = [max(a, _rss(p.pid)) for a, p in zip(rss_peak, procs)]
            if mode == "park" and len(keys) < 6:
                keys = _spot_keys(store)
            parked = _parked(store, keys)
            if parked > parked_peak:
                parked_peak = parked
                memory_at_peak = int(store.info("memory")["used_memory"]) - memory_start
                if time.monotonic() - usage_at >= 1.0:
                    usage_at_peak = _memory_usage(store, keys) if keys else 0
                    payload = _payload_bytes(store, keys) or payload
                    usage_at = time.monotonic()
            time.sleep(0.25)
        time.sleep(2.0)  # a late duplicate would show here
        inspector.stop.set()
        inspector.join(5)
        memory_after = int(store.info("memory")["used_memory"]) - memory_start
        scripts = int(store.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)) - scripts_start
        alive = [p.poll() is None for p in procs]
    finally:
        if inspector is not None:
            inspector.stop.set()
        stop_process_groups(procs)
    text = log.read_text(errors="replace")
    log.unlink()
    counts = [int(v) for v in record.hvals("runs")]
    starts = sorted(float(t) for t in record.lrange("starts", 0, -1))
    ends = sorted(float(t) for t in record.lrange("ends", 0, -1))
    samples = inspector.samples
    per_worker = {name: {"samples": sum(1 for s in samples if name in s),
                         "scheduled_max": max((s[name][0] for s in samples if name in s), default=0),
                         "reserved_max": max((s[name][1] for s in samples if name in s), default=0),
                         "held_max": max((s[name][0] + s[name][1] for s in samples if name in s), default=0),
                         "active_max": max((s[name][2] for s in samples if name in s), default=0)}
                  for name in names}
    deferrals = [int(v) for v in record.hvals("deferrals")]
    result: Dict[str, Any] = {
        "tasks": n, "ran": len(counts), "missing": n - len(counts),
        "ran_twice_or_more": sum(1 for c in counts if c > 1), "extra_runs": sum(c - 1 for c in counts if c > 1),
        "workers_alive_at_end": all(alive), "log_errors": text.count("ERROR") + text.count("Traceback"),
        "log_tail": text[-1500:] if ("ERROR" in text or "Traceback" in text) else "",
        "message_bytes": message_bytes, "payload_bytes": payload,
        "rss_start_mb": rss_start, "rss_peak_mb": rss_peak,
        "rss_growth": max(peak / start - 1 for start, peak in zip(rss_start, rss_peak)),
        "unacked_max": held_max, "per_worker": per_worker,
        "inspect_samples": min((w["samples"] for w in per_worker.values()), default=0),
        "deferred": sum(1 for d in deferrals if d), "deferrals_max": max(deferrals, default=0),
        "deferrals_per_task": sum(deferrals) / n,
        "held_max": max((w["held_max"] for w in per_worker.values()), default=0),
        "scheduled_max": max((w["scheduled_max"] for w in per_worker.values()), default=0),
        "parked_peak": parked_peak, "memory_delta_at_peak": memory_at_peak,
        "memory_usage_at_peak": usage_at_peak, "memory_after_run": memory_after,
        "scripts_per_task": scripts / n, "drained_s": drained,
        "fresh_per_s": n / drained if drained else None,
    }
    if starts:
        span = starts[-1] - starts[0]
        lo, hi = starts[len(starts) // 10], starts[len(starts) * 9 // 10 - 1] if len(starts) > 10 else starts[-1]
        steady = bisect.bisect_right(starts, hi) - bisect.bisect_left(starts, lo)
        most, fewest = _windows(starts)
        result.update({
            "first_run_after_s": starts[0] - released,
            "last_run_after_s": (ends[-1] if ends else starts[-1]) - released,
            "rate_whole": (len(starts) - 1) / span if span > 0 else 0.0,
            "rate_steady": (steady - 1) / (hi - lo) if hi > lo else 0.0,
            "rate_from_release": len(starts) / ((ends[-1] if ends else starts[-1]) - released),
            "max_1s": most, "min_1s": fewest,
            "running_at_once_max": _running_at_once(starts, ends),
            "throughput": len(starts) / (ends[-1] - starts[0]) if ends and ends[-1] > starts[0] else 0.0,
        })
        if kind == "cc" and len(ends) > CAP:
            # Hand-over: the k-th start after the first CAP waited for the (k - CAP)-th end.
            last = min(len(starts), len(ends) + CAP)
            gaps = sorted(max(0.0, starts[k] - ends[k - CAP]) * 1000 for k in range(CAP, last))
            result.update({"handover_ms_p50": gaps[len(gaps) // 2], "handover_ms_p90": gaps[len(gaps) * 9 // 10]})
    if parked_peak:
        result["memory_per_parked"] = memory_at_peak / parked_peak
        result["usage_per_parked"] = usage_at_peak / parked_peak if usage_at_peak else None
    return result


def run(broker_url: str, record_url: str, tasks: int = 20000, cap_tasks: int = 2000,
        modes: Tuple[str, ...] = MODES) -> Dict[str, Any]:
    """Both parts, each mode side by side; a private tuning redis-server of its own."""
    tuning = RedisServer().start()
    try:
        burst = {mode: run_once("rl", mode, tasks, broker_url, record_url, tuning, concurrency=2) for mode in modes}
        # What users get by default: on_limit="auto" sleeps in the worker for a slot under 1 s away.
        burst[AUTO] = run_once("rl", "park", tasks, broker_url, record_url, tuning, concurrency=2, on_limit="auto")
        cap = {mode: run_once("cc", mode, cap_tasks, broker_url, record_url, tuning, concurrency=4)
               for mode in (*modes, RELAY)}
    finally:
        tuning.close()
    return {"burst": burst, "cap": cap, "rate": RATE, "cap_limit": CAP, "task_seconds": TASK_SECONDS}


def _f(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(result: Dict[str, Any]) -> str:
    burst, cap = result["burst"], result["cap"]
    modes = [m for m in burst if m != AUTO] + [m for m in burst if m == AUTO]
    first = burst[modes[0]]
    lines = [
        f"Parking, burst: {first['tasks']} no-op tasks in the queue at once, shared limit {result['rate']:g}/s, "
        "2 prefork workers -c 2 (default prefetch 4: 8 messages each)",
        "",
        "| measure | " + " | ".join(modes) + " | target |",
        "|---|" + "---|" * len(modes) + "---|",
    ]

    def row(label: str, fn: Any, target: str = "") -> None:
        lines.append(f"| {label} | " + " | ".join(fn(burst[m]) for m in modes) + f" | {target} |")

    row("ran / missing / ran twice", lambda e: f"{e['ran']} / {e['missing']} / {e['ran_twice_or_more']}",
        "all once")
    row("admitted tasks/s, steady (10th-90th percentile of runs)", lambda e: _f(e.get("rate_steady"), "{:.2f}"),
        f"{result['rate']:g} ± 2 %")
    row("admitted tasks/s, first run to last", lambda e: _f(e.get("rate_whole"), "{:.2f}"), "")
    row("tasks/s from release to last run", lambda e: _f(e.get("rate_from_release"), "{:.2f}"), "")
    row("most / fewest runs in a 1 s window", lambda e: f"{e.get('max_1s', 0)} / {e.get('min_1s', 0)}", "")
    row("first run after release (s)", lambda e: _f(e.get("first_run_after_s"), "{:.2f}"), "")
    row("fresh backlog out of the queue after (s) / fresh tasks per s", lambda e: (
        f"{_f(e.get('drained_s'))} / {_f(e.get('fresh_per_s'), '{:.0f}')}"), "")
    row("most messages a worker held (inspect: scheduled + reserved)", lambda e: str(e["held_max"]), "<= 8")
    row("most ETA messages a worker held (inspect scheduled)", lambda e: str(e["scheduled_max"]), "0")
    row("most unacked messages, both workers (broker)", lambda e: str(e["unacked_max"]), "")
    row("inspect samples (fewest answered by a worker)", lambda e: str(e["inspect_samples"]), "")
    row("tasks deferred / most deferrals of one task", lambda e: f"{e['deferred']} / {e['deferrals_max']}", "")
    row("worker RSS MB, start -> peak (worst worker's growth)",
        lambda e: " / ".join(f"{a:.0f}->{b:.0f}" for a, b in zip(e["rss_start_mb"], e["rss_peak_mb"]))
        + f" ({e['rss_growth'] * 100:+.1f} %)", "<= +10 %")
    row("peak parked", lambda e: str(e["parked_peak"]), "")
    row("tuning Redis used_memory delta at peak / parked (bytes)", lambda e: _f(e.get("memory_per_parked"), "{:.0f}"),
        "<= message + 512")
    row("MEMORY USAGE of the spot's keys / parked (bytes)", lambda e: _f(e.get("usage_per_parked"), "{:.0f}"), "")
    row("broker message / parked payload (bytes)",
        lambda e: f"{e['message_bytes']} / {_f(e.get('payload_bytes'), '{:.0f}')}", "")
    row("tuning Redis used_memory left after the run / task (bytes)",
        lambda e: f"{e['memory_after_run'] / e['tasks']:.0f}", "")
    row("tuning Redis scripts per task", lambda e: f"{e['scripts_per_task']:.2f}", "")
    row("worker log errors", lambda e: str(e["log_errors"]), "0")
    c0 = cap[modes[0]]
    ideal = result["cap_limit"] / result["task_seconds"]
    cap_modes = [m for m in cap if m in modes] + [m for m in cap if m not in modes]
    lines += [
        "",
        f"Parking, concurrency cap: {c0['tasks']} tasks of {result['task_seconds'] * 1000:.0f} ms, cluster-wide cap "
        f"{result['cap_limit']}, 2 prefork workers -c 4; ideal {ideal:.0f} tasks/s",
        "",
        "| measure | " + " | ".join(m if m != RELAY else "floor: plain Celery relay" for m in cap_modes)
        + " | target |",
        "|---|" + "---|" * len(cap_modes) + "---|",
    ]
    for label, fn, target in (
        ("ran / missing / ran twice", lambda e: f"{e['ran']} / {e['missing']} / {e['ran_twice_or_more']}", "all once"),
        ("tasks/s, first start to last end", lambda e: _f(e.get("throughput"), "{:.1f}"), f">= {0.95 * ideal:.0f}"),
        ("/ ideal", lambda e: _f((e.get("throughput") or 0) / ideal, "{:.3f}"), ">= 0.95"),
        ("tasks/s from release to last end", lambda e: _f(e.get("rate_from_release"), "{:.1f}"), ""),
        ("deferrals per task / most of one task", lambda e: f"{e['deferrals_per_task']:.2f} / {e['deferrals_max']}",
         ""),
        ("most bodies running at once", lambda e: str(e.get("running_at_once_max", 0)), f"<= {result['cap_limit']}"),
        ("hand-over, an end to the start it freed a slot for: p50 / p90 (ms)",
         lambda e: f"{_f(e.get('handover_ms_p50'))} / {_f(e.get('handover_ms_p90'))}", ""),
        ("most messages a worker held (inspect)", lambda e: str(e["held_max"]), "<= 16"),
        ("tuning Redis scripts per task", lambda e: f"{e['scripts_per_task']:.2f}", ""),
        ("worker log errors", lambda e: str(e["log_errors"]), "0"),
    ):
        lines.append(f"| {label} | " + " | ".join(fn(cap[m]) for m in cap_modes) + f" | {target} |")
    if RELAY in cap:
        floor = cap[RELAY].get("throughput") or 0
        lines += ["", "Against the floor (throughput / the relay's): " + ", ".join(
            f"{m} {(cap[m].get('throughput') or 0) / floor:.3f}" for m in cap_modes if m != RELAY and floor)]
    return "\n".join(lines)
