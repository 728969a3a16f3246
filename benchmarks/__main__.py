"""Run the benchmarks: ``python -m benchmarks [--tasks N] [--runs R] [--pools prefork,threads]``.

Plain Celery and celery-tuning are measured in one run on the same machine, interleaved, and
reported as ratios (absolute numbers on shared machines are noisy). Prints a table and writes
JSON to benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import psutil
import redis

from celery_tuning.testing import RedisServer, stop_process_groups

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
POOL_CONCURRENCY = {"prefork": 2, "threads": 4, "solo": 1}
ACCURACY_CONCURRENCY = 1


def _publish(url: str, variant: str, n: int) -> float:
    """Publish ``n`` tasks from a fresh producer process; returns its publish rate (tasks/s)."""
    code = (
        "import time\n"
        "from benchmarks.apps import noop, app\n"
        "with app.producer_or_acquire() as p:\n"
        "    noop.apply_async(producer=p)\n"  # connects and declares outside the timed part
        "    s = time.perf_counter()\n"
        f"    for _ in range({n} - 1): noop.apply_async(producer=p)\n"
        f"    print(({n} - 1) / (time.perf_counter() - s))\n"
    )
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(ROOT),
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a worker and its pool children so far."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _script_calls(client: redis.Redis) -> int:
    """EVALSHA calls the server has run so far (ours, and kombu's few binding refreshes)."""
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def _tuning_connections(client: redis.Redis) -> Tuple[int, int]:
    """celery-tuning's connections to this Redis: (pool connections, pub/sub connections)."""
    ours = [c for c in client.client_list() if c.get("name") == "celery-tuning"]
    pubsub = sum(1 for c in ours if c.get("cmd") in ("subscribe", "psubscribe"))
    return len(ours) - pubsub, pubsub


def run_worker_once(url: str, variant: str, pool: str, n: int, workers: int = 1,
                    concurrency: int = 0) -> Dict[str, float]:
    """Fill the queue with ``n`` no-op tasks, start ``workers`` workers, time them draining it."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    publish_rate = _publish(url, variant, n)
    assert client.llen("bench") == n, "publishing failed"
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    scripts_start = _script_calls(client)  # before the worker: it may run tasks before the first poll below
    log = tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.apps:app", "worker", "-P", pool,
         "-c", str(concurrency or (POOL_CONCURRENCY[pool] if workers == 1 else ACCURACY_CONCURRENCY)), "-Q", "bench",
         "-n", f"bench{i}@%h", "--without-gossip",
         "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
        for i in range(workers)]
    worker = procs[0]
    try:
        deadline = time.monotonic() + 300
        while client.llen("bench") == n:  # the first fetch marks the start
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.001)
        start = time.perf_counter()
        cpu_start = _cpu_seconds(worker.pid)
        while client.llen("bench") or client.hlen("unacked"):
            if time.monotonic() > deadline:
                raise RuntimeError("worker did not drain the queue in time")
            time.sleep(0.002)
        elapsed = time.perf_counter() - start
        cpu = _cpu_seconds(worker.pid) - cpu_start
        rss = _rss_mb(worker.pid)
        pool_conns, pubsub_conns = _tuning_connections(client)  # all processes of the worker
    finally:
        stop_process_groups(procs)
        os.unlink(log.name)
    # After the worker stopped: the cache's deferred stores are flushed at shutdown, and a
    # count taken at drain time would miss the last few of them.
    scripts = _script_calls(client) - scripts_start
    return {"tasks_per_s": n / elapsed, "rss_mb": rss, "publish_per_s": publish_rate,
            "cpu_us_per_task": cpu / n * 1e6, "scripts_per_task": scripts / n,
            "pool_connections": pool_conns, "pubsub_connections": pubsub_conns}


def summarize(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def passthrough(url: str, pools: List[str], tasks: int, runs: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    variants = ("plain", "tuned", "limited", "everything")
    for pool in pools:
        samples: Dict[str, Dict[str, List[float]]] = {
            v: {"tasks_per_s": [], "rss_mb": [], "publish_per_s": [], "cpu_us_per_task": [], "scripts_per_task": [],
                "pool_connections": [], "pubsub_connections": []}
            for v in variants}
        for _ in range(runs):
            for variant in variants:  # interleaved so drift hits all alike
                one = run_worker_once(url, variant, pool, tasks)
                for key, value in one.items():
                    samples[variant][key].append(value)
        entry: Dict[str, Any] = {v: {k: summarize(vals) for k, vals in s.items()} for v, s in samples.items()}
        plain = entry["plain"]
        entry["throughput_ratio"] = entry["tuned"]["tasks_per_s"]["median"] / plain["tasks_per_s"]["median"]
        entry["limited_ratio"] = entry["limited"]["tasks_per_s"]["median"] / plain["tasks_per_s"]["median"]
        # kombu's Redis transport runs a few scripts of its own (binding refreshes, mostly at
        # start), so a variant's scripts per task are counted above plain's.
        base = entry["plain"]["scripts_per_task"]["median"]
        entry["scripts_above_plain"] = {v: entry[v]["scripts_per_task"]["median"] - base for v in variants}
        entry["everything_ratio"] = entry["everything"]["tasks_per_s"]["median"] / plain["tasks_per_s"]["median"]
        entry["publish_ratio"] = entry["tuned"]["publish_per_s"]["median"] / plain["publish_per_s"]["median"]
        entry["rss_ratio"] = entry["tuned"]["rss_mb"]["median"] / plain["rss_mb"]["median"]
        out[pool] = entry
    return out


def metrics_end_to_end(url: str, tasks: int, runs: int, pools: Tuple[str, ...] = ("prefork", "solo")) -> Dict[str, Any]:
    """Tasks/s with timing and every metric on vs off, in back-to-back pairs (drift hits both)."""
    out: Dict[str, Any] = {}
    for pool in pools:
        off, on, cpu_off, cpu_on = [], [], [], []
        for _ in range(runs):
            a = run_worker_once(url, "tuned", pool, tasks)
            b = run_worker_once(url, "metered", pool, tasks)
            off.append(a["tasks_per_s"])
            on.append(b["tasks_per_s"])
            cpu_off.append(a["cpu_us_per_task"])
            cpu_on.append(b["cpu_us_per_task"])
        # Node time per task the recording adds: 1/on - 1/off seconds. On a shared machine that
        # swings by tens of percent; the worker's CPU time per task (main process + children)
        # is the steadier figure for the same cost.
        overhead = [(1 / y - 1 / x) * 1e6 for x, y in zip(off, on)]
        out[pool] = {"concurrency": POOL_CONCURRENCY[pool], "off": summarize(off), "on": summarize(on),
                     "ratio": summarize([y / x for x, y in zip(off, on)]),
                     "overhead_us_per_task": summarize(overhead),
                     "cpu_us_per_task_off": summarize(cpu_off), "cpu_us_per_task_on": summarize(cpu_on),
                     "cpu_overhead_us_per_task": summarize([y - x for x, y in zip(cpu_off, cpu_on)])}
    return out


def accuracy(url: str, tasks: int = 60, pools: Tuple[str, ...] = ("prefork", "threads")) -> Dict[str, Any]:
    """Celery's per-worker rate_limit vs ours, both '10/s', two worker processes per pool kind."""
    out: Dict[str, Any] = {}
    for pool in pools:
        for variant in ("celery_rate_limit", "ours"):
            one = run_worker_once(url, variant, pool, tasks, workers=2)
            out[f"{pool}/{variant}"] = {"tasks_per_s": one["tasks_per_s"],
                                        "admitted_over_configured": one["tasks_per_s"] / 10.0}
    return out


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pools", default="prefork,threads,solo")
    parser.add_argument("--only", default="passthrough,floor,tracer,limiter,breaker,cache,metrics,accuracy,scaling,"
                                          "dedupe",
                        help="comma-separated sections: passthrough, floor, tracer, limiter, breaker, cache, "
                             "metrics, accuracy, scaling, dedupe, parking (not in the default: --only parking --tasks "
                             "20000 for issue #17's burst; its cap part runs min(2000, tasks) tasks)")
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    server = RedisServer().start()
    results: Dict[str, Any] = {
        "command": "python -m benchmarks " + " ".join(argv),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "tasks": args.tasks, "runs": args.runs,
    }
    try:
        url = server.db_url(0)
        if "passthrough" in sections:
            results["pass_through"] = passthrough(url, args.pools.split(","), args.tasks, args.runs)
            print(render_table(results), flush=True)
        if "floor" in sections:
            from benchmarks import floor

            results["floor"] = floor.run(url, run_worker_once, args.pools.split(","), args.tasks, args.runs)
            print("\n" + floor.render(results["floor"], args.tasks, args.runs), flush=True)
        if "tracer" in sections:
            from benchmarks import tracer

            results["tracer"] = tracer.run(server.db_url(3), runs=args.runs)
            print(tracer.render(results["tracer"]), flush=True)
        if "limiter" in sections:
            from benchmarks import limiter

            results["limiter"] = limiter.run(server.db_url(2), runs=args.runs)
            print("\n" + limiter.render(results["limiter"]), flush=True)
        if "breaker" in sections:
            from benchmarks import breaker

            results["breaker"] = breaker.run(server.db_url(3), runs=args.runs)
            print("\n" + breaker.render(results["breaker"]), flush=True)
        if "cache" in sections:
            from benchmarks import cache

            results["cache"] = cache.run(server.db_url(4))
            e2e = {v: run_worker_once(url, v, "threads", 400)["tasks_per_s"] for v in ("uncached50", "cached50")}
            e2e["ratio"] = e2e["cached50"] / e2e["uncached50"]
            results["cache"]["end_to_end"] = e2e
            print("\n" + cache.render(results["cache"], e2e), flush=True)
        if "metrics" in sections:
            from benchmarks import metrics as metrics_bench
            from celery_tuning.testing import free_port

            results["metrics"] = metrics_bench.run()
            os.environ["BENCH_METRICS_PORT"] = str(free_port())
            e2e = metrics_end_to_end(url, args.tasks, args.runs)
            results["metrics"]["end_to_end"] = e2e
            print("\n" + metrics_bench.render(results["metrics"], e2e), flush=True)
        if "accuracy" in sections:
            results["accuracy"] = accuracy(url)
            print("\n" + render_accuracy(results["accuracy"]), flush=True)
        if "scaling" in sections:
            from benchmarks import scaling

            def one_process_each(*a: Any, **kw: Any) -> Dict[str, float]:
                return run_worker_once(*a, concurrency=1, **kw)

            results["scaling"] = {
                "workers": scaling.workers_curve(url, one_process_each, args.tasks, runs=args.runs),
                "latency": scaling.latency_curve(server.port),
                "breaker_threads": scaling.breaker_threads(server.db_url(5)),
            }
            print("\n" + scaling.render(results["scaling"]), flush=True)
        if "dedupe" in sections:
            from benchmarks import dedupe

            results["dedupe"] = dedupe.run(server.db_url(8), server.db_url(9), runs=args.runs)
            print("\n" + dedupe.render(results["dedupe"]), flush=True)
        if "parking" in sections:
            from benchmarks import parking

            results["parking"] = parking.run(server.db_url(6), server.db_url(7), tasks=args.tasks,
                                             cap_tasks=min(2000, args.tasks))
            print("\n" + parking.render(results["parking"]), flush=True)
    finally:
        server.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {RESULTS / 'latest.json'}")
    return 0


def render_accuracy(result: Dict[str, Any]) -> str:
    lines = [
        "Rate-limit accuracy: 60 no-op tasks limited to 10/s, two worker processes",
        "",
        "| pool | limiter | achieved tasks/s | achieved / configured (ideal 1.0) |",
        "|---|---|---|---|",
    ]
    labels = {"celery_rate_limit": "Celery `rate_limit='10/s'` (per worker)",
              "ours": "celery-tuning `@rate_limit('10/s')` (shared)"}
    for key, e in result.items():
        pool, variant = key.split("/")
        lines.append(f"| {pool} | {labels[variant]} | {e['tasks_per_s']:.2f} | {e['admitted_over_configured']:.2f} |")
    return "\n".join(lines)


def _conns(variant: Dict[str, Any]) -> str:
    return f"{variant['pool_connections']['median']:.0f} + {variant['pubsub_connections']['median']:.0f}"


def render_table(results: Dict[str, Any]) -> str:
    lines = [
        f"Pass-through: TunedTask with nothing enabled vs plain celery.Task, {results['tasks']} no-op tasks, "
        f"median of {results['runs']} runs (min-max). Worker throughput is timed from the first fetch "
        "until the queue and the unacked table are empty (acks_late); publish ratio is the producer's "
        "apply_async rate with header stamping vs without.",
        "",
        "| pool | plain tasks/s | tuned tasks/s | ratio (target >= 0.97) | never-binding limiter tasks/s "
        "| ratio (target >= 0.90) | everything on tasks/s | ratio (target >= 0.80) | plain RSS MB | tuned RSS MB "
        "| RSS ratio (target <= 1.05) | publish ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pool, e in results["pass_through"].items():
        p, t, lim, every = e["plain"], e["tuned"], e["limited"], e["everything"]

        def rng(x: Dict[str, float]) -> str:
            return f"{x['median']:.0f} ({x['min']:.0f}-{x['max']:.0f})"

        lines.append(
            f"| {pool} | {rng(p['tasks_per_s'])} | {rng(t['tasks_per_s'])} | {e['throughput_ratio']:.3f}"
            f" | {rng(lim['tasks_per_s'])} | {e['limited_ratio']:.3f}"
            f" | {rng(every['tasks_per_s'])} | {e['everything_ratio']:.3f}"
            f" | {p['rss_mb']['median']:.1f} | {t['rss_mb']['median']:.1f}"
            f" | {e['rss_ratio']:.3f} | {e['publish_ratio']:.3f} |")
    lines += [
        "",
        "Where the time goes: worker CPU per task (main process + pool children, median) and Lua scripts "
        "run per task above plain Celery's (server EVALSHA count; each is one round trip from the worker)",
        "",
        "| pool | plain CPU µs | tuned CPU µs | limiter CPU µs | everything CPU µs | scripts per task: "
        "limiter / everything | celery-tuning connections after the run, pool + pub/sub: limiter / everything |",
        "|---|---|---|---|---|---|---|",
    ]
    for pool, e in results["pass_through"].items():
        cpu = [e[v]["cpu_us_per_task"]["median"] for v in ("plain", "tuned", "limited", "everything")]
        lines.append(f"| {pool} | " + " | ".join(f"{c:.0f}" for c in cpu)
                     + f" | {e['scripts_above_plain']['limited']:.2f}"
                       f" / {e['scripts_above_plain']['everything']:.2f}"
                       f" | {_conns(e['limited'])} / {_conns(e['everything'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
