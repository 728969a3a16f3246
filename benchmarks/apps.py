"""Benchmark apps: the same no-op task as plain Celery or through TunedTask (BENCH_VARIANT)."""

from __future__ import annotations

import os

from celery import Celery

VARIANT = os.environ.get("BENCH_VARIANT", "plain")
URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = "bench"

TUNED = VARIANT in ("tuned", "limited", "ours", "cached50", "uncached50", "metered", "everything", "guarded")
app = Celery(
    f"bench_{VARIANT}",
    broker=URL,
    task_cls="celery_tuning:TunedTask" if TUNED else "celery.app.task:Task",
)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    # Acks after the task body, so an empty unacked table means every task finished.
    task_acks_late=True,
    worker_prefetch_multiplier=8,
    broker_connection_retry_on_startup=True,
)
if TUNED:
    import celery_tuning

    app.conf.tuning_redis_url = URL
    if VARIANT in ("metered", "everything", "guarded"):
        app.conf.tuning_metrics_port = int(os.environ.get("BENCH_METRICS_PORT", "0"))
    if VARIANT in ("everything", "guarded"):
        app.conf.tuning_circuit_breakers = {"bench": {"fail_max": 5, "reset_timeout": 30}}
    if VARIANT == "everything":
        app.conf.tuning_cache_write_behind = True  # deferred stores: off by default (connections)
    celery_tuning.install(app)

if VARIANT == "limited":
    from celery_tuning import rate_limit

    @app.task(name="benchmarks.apps.noop")
    @rate_limit("1000000/s", burst=1000)  # never binds: measures the limiter's cost alone
    def noop() -> None:
        return None

elif VARIANT == "everything":
    import itertools
    import uuid

    from celery_tuning import cache_result, circuit_breaker, rate_limit, sla

    # A new key per call, unique across processes and runs: the miss path every time. (Not a
    # uuid4 per call: on these VMs its getrandom() costs ~25 µs of CPU, the benchmark's own.)
    _RUN, _CALLS = uuid.uuid4().hex, itertools.count()

    @app.task(name="benchmarks.apps.noop")
    @cache_result(ttl=60, key=lambda: f"{_RUN}:{os.getpid()}:{next(_CALLS)}")
    @circuit_breaker("bench")                            # closed throughout
    @rate_limit("1000000/s", burst=1000)                 # never binds
    @sla(warning=60, critical=120)                       # checked, never breached
    def noop() -> None:
        return None

elif VARIANT == "guarded":
    # Everything on but the cache: limiter + breaker + SLA (and metrics), whose floor is a
    # plain task making one bare round trip (the limiter's).
    from celery_tuning import circuit_breaker, rate_limit, sla

    @app.task(name="benchmarks.apps.noop")
    @circuit_breaker("bench")                            # closed throughout
    @rate_limit("1000000/s", burst=1000)                 # never binds
    @sla(warning=60, critical=120)                       # checked, never breached
    def noop() -> None:
        return None

elif VARIANT == "ours":
    from celery_tuning import rate_limit

    @app.task(name="benchmarks.apps.noop")
    @rate_limit("10/s", burst=1)
    def noop() -> None:
        return None

elif VARIANT == "cached50":
    import time

    from celery_tuning import cache_result

    @app.task(name="benchmarks.apps.noop")
    @cache_result(ttl=600)
    def noop() -> None:
        time.sleep(0.05)  # 50 ms of work, done once and then served from the cache
        return None

elif VARIANT == "uncached50":
    import time

    @app.task(name="benchmarks.apps.noop")
    def noop() -> None:
        time.sleep(0.05)
        return None

elif VARIANT == "celery_rate_limit":

    @app.task(name="benchmarks.apps.noop", rate_limit="10/s")  # Celery's own, per worker
    def noop() -> None:
        return None

elif VARIANT in ("trip1", "trip2"):
    # Plain Celery whose task makes one or two bare round trips to Redis of its own (an
    # EVALSHA of "return 1" through plain redis-py): the floor under any feature that keeps
    # its state in Redis, measured the same way as the variants above.
    import redis

    _script = redis.Redis.from_url(URL).register_script("return 1")
    _TRIPS = int(VARIANT[-1])

    @app.task(name="benchmarks.apps.noop")
    def noop() -> None:
        for _ in range(_TRIPS):
            _script()
        return None

else:

    @app.task(name="benchmarks.apps.noop")
    def noop() -> None:
        return None

# -- parking (benchmarks/parking.py) ---------------------------------------------------------------
# BENCH_VARIANT "<park|countdown>-<rl|cc>": a TunedTask app with Celery's default prefetch and
# acks, its tuning store on a Redis of its own (BENCH_TUNING_URL, so INFO memory counts only
# what parks), and a task that records each run in BENCH_RECORD_URL: HINCRBY runs <task id>
# (exactly once?) and RPUSH starts / ends (admitted rate, running at once).
# "rl": @rate_limit("bench", on_limit=BENCH_ON_LIMIT) with tuning_rate_limits {"bench": BENCH_RATE
# (200/s)}, a no-op body. on_limit "defer" (the section's choice): with the default "auto" a task
# whose slot is at most 1 s away sleeps in the worker, and 4 processes at 200/s never reserve a
# slot more than ~20 ms ahead, so nothing would defer at all.
# "cc": @concurrency_limit("bench") with tuning_concurrency_limits {"bench": BENCH_CAP (4)}, 50 ms.
# "relay-cc": the floor under any cap that hands a freed slot to a waiting message through the
# broker: plain Celery (no celery-tuning), BENCH_CAP chains of the same 50 ms task, each run
# publishing its successor as it ends (a slot handed over by one publish and one delivery, with
# no decision to take and no Redis of ours in between).
PARKING_MODE, _, PARKING_KIND = VARIANT.partition("-")
if PARKING_MODE == "relay" and PARKING_KIND == "cc":
    import time as _time
    from typing import Any

    import redis as _redis

    parking_app = Celery(f"bench_{VARIANT}", broker=URL)
    parking_app.conf.update(task_default_queue=QUEUE, task_ignore_result=True,
                            broker_connection_retry_on_startup=True)
    _RECORD_URL = os.environ.get("BENCH_RECORD_URL", URL)
    _relay_records: dict = {}

    @parking_app.task(name="benchmarks.apps.parked", bind=True)
    def parked(self: Any, successors: int = 0) -> None:
        started = _time.time()
        _time.sleep(0.05)
        ended = _time.time()
        client = _relay_records.get(os.getpid())
        if client is None:
            client = _relay_records[os.getpid()] = _redis.Redis.from_url(_RECORD_URL)
        pipe = client.pipeline(transaction=False)
        pipe.hincrby("runs", self.request.id, 1)
        pipe.hset("deferrals", self.request.id, 0)
        pipe.rpush("starts", f"{started:.6f}")
        pipe.rpush("ends", f"{ended:.6f}")
        pipe.execute()
        if successors > 0:
            parked.apply_async((successors - 1,))  # the slot's next task, through the broker

elif PARKING_MODE in ("park", "countdown") and PARKING_KIND in ("rl", "cc"):
    import time as _time
    from typing import Any

    import redis as _redis

    import celery_tuning as _tuning
    from celery_tuning import concurrency_limit, rate_limit

    parking_app = Celery(f"bench_{VARIANT}", broker=URL, task_cls="celery_tuning:TunedTask")
    parking_app.conf.update(
        task_default_queue=QUEUE, task_ignore_result=True, broker_connection_retry_on_startup=True,
        tuning_redis_url=os.environ.get("BENCH_TUNING_URL", URL),
        tuning_defer_via=PARKING_MODE,
        tuning_rate_limits={"bench": os.environ.get("BENCH_RATE", "200/s")},
        tuning_concurrency_limits={"bench": int(os.environ.get("BENCH_CAP", "4"))},
    )
    _tuning.install(parking_app)
    _RECORD_URL = os.environ.get("BENCH_RECORD_URL", URL)
    _records: dict = {}

    from celery_tuning.integration.deferral import deferrals_of

    def _record(request: Any, started: float, ended: float) -> None:
        task_id = request.id
        client = _records.get(os.getpid())  # one connection per process (prefork children fork)
        if client is None:
            client = _records[os.getpid()] = _redis.Redis.from_url(_RECORD_URL)
        pipe = client.pipeline(transaction=False)
        pipe.hincrby("runs", task_id, 1)
        pipe.hset("deferrals", task_id, deferrals_of(request))  # times it was deferred before this run
        pipe.rpush("starts", f"{started:.6f}")
        pipe.rpush("ends", f"{ended:.6f}")
        pipe.execute()

    if PARKING_KIND == "rl":

        @parking_app.task(name="benchmarks.apps.parked", bind=True)
        @rate_limit("bench", on_limit=os.environ.get("BENCH_ON_LIMIT", "defer"))
        def parked(self) -> None:
            now = _time.time()
            _record(self.request, now, now)

    else:

        # acks_late: a woken waiter may then hold on as the limit's standby (tuning_concurrency_standby).
        @parking_app.task(name="benchmarks.apps.parked", bind=True, acks_late=True)
        @concurrency_limit("bench")
        def parked(self) -> None:
            started = _time.time()
            _time.sleep(0.05)
            _record(self.request, started, _time.time())
