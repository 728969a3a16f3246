"""@dedupe: one queued (or running) call per key, against a real redis-server and real prefork workers."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from celery import chain, group
from celery.exceptions import Retry
from celery.result import EagerResult
from celery.utils import uuid

from celery_tuning import ConfigurationError, DuplicateTask, TunedTask, cache_result, dedupe, events
from celery_tuning.integration.pipeline import CallContext
from celery_tuning.integration.steps.dedupe import HEADER_DEDUPE
from celery_tuning.storage.dedupe import RedisDedupeStore
from celery_tuning.storage.redis import RedisConnector
from tests.support.apps import make_app, run_producer, worker_env
from tests.support.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.integration


def queued(redis_server, queue="celery"):
    return redis_server.client(0).llen(queue)


def deduped_app(redis_server, name, **conf):
    app = make_app(redis_server, name, **conf)

    @app.task(base=TunedTask, shared=False, name=f"{name}.render")
    @dedupe()
    def render(account, month="01"):
        return account

    @app.task(base=TunedTask, shared=False, name=f"{name}.strict")
    @dedupe(on_duplicate="raise")
    def strict(x):
        return x

    @app.task(base=TunedTask, shared=False, name=f"{name}.quiet")
    @dedupe(on_duplicate="ignore", key=lambda x, **_: x % 10)
    def quiet(x, extra=None):
        return x

    return app, render, strict, quiet


# -- publish side (no worker: calls stay queued) ---------------------------------------------------


def test_a_duplicate_gets_the_queued_call_and_nothing_is_published(redis_clean):
    _app, render, strict, quiet = deduped_app(redis_clean, "ddpub")
    seen = []
    events.DEDUPLICATED.subscribe(seen.append)
    try:
        first = render.delay("acme")
        assert render.delay("acme").id == first.id
        assert render.apply_async(kwargs={"account": "acme", "month": "01"}).id == first.id  # same canonical call
        assert render.s("acme").delay().id == first.id  # a lone signature goes through apply_async too
        other = render.delay("acme", "02")
        assert other.id != first.id
        assert queued(redis_clean) == 2
        held = strict.delay(1)
        with pytest.raises(DuplicateTask, match=held.id) as raised:
            strict.delay(1)
        assert raised.value.holder_id == held.id
        assert quiet.delay(11).id and quiet.delay(21, extra="x") is None  # custom key: 11 % 10 == 21 % 10
        assert queued(redis_clean) == 4
        assert seen == [render.name] * 3 + [strict.name, quiet.name]
        locks = render.dedupe.locks()
        assert sorted(lock.holder for lock in locks) == sorted([first.id, other.id])
        assert {lock.state for lock in locks} == {"queued"}
        assert render.dedupe.key("acme") in {lock.digest for lock in locks}
    finally:
        events.DEDUPLICATED.unsubscribe(seen.append)


def test_the_message_carries_the_digest_and_a_given_task_id_is_kept(redis_clean):
    _app, render, _, _ = deduped_app(redis_clean, "ddhdr")
    result = render.apply_async(("acme",), task_id="fixed-id")
    assert result.id == "fixed-id"
    assert render.apply_async(("acme",), task_id="fixed-id").id == "fixed-id"  # the same call again
    assert render.apply_async(("acme",), task_id="other-id").id == "fixed-id"
    assert queued(redis_clean) == 1
    message = json.loads(redis_clean.client(0).lindex("celery", 0))
    assert message["headers"][HEADER_DEDUPE] == render.dedupe.key("acme")
    assert message["headers"]["id"] == "fixed-id"


def test_a_failed_publish_frees_the_claim(redis_clean):
    _app, render, _, _ = deduped_app(redis_clean, "ddfail")
    with pytest.raises(Exception, match="nonexistent"):
        render.apply_async(("acme",), serializer="nonexistent")
    assert render.dedupe.locks() == []
    assert render.delay("acme").id and queued(redis_clean) == 1


def test_uncacheable_arguments_are_not_deduplicated(redis_clean):
    _app, render, _, _ = deduped_app(redis_clean, "ddunc")
    a = render.apply_async((object(),), serializer="pickle")
    b = render.apply_async((object(),), serializer="pickle")
    assert a.id != b.id and queued(redis_clean) == 2


def test_retries_deferrals_and_canvas_members_are_published_beside_a_holder(redis_clean):
    """A re-publish (retry, deferral, a parked call's return: ``retries`` in its options) and a
    canvas member (a chain, a group: someone waits for its very id) are never answered with the
    holder's id; they are published."""
    _app, render, _, _ = deduped_app(redis_clean, "ddcanvas")
    holder = render.delay("acme")
    again = render.apply_async(("acme",), task_id="retried", retries=1)
    assert again.id == "retried"
    head = chain(render.s("acme"), render.s()).apply_async()
    members = group(render.s("acme"), render.s("acme")).apply_async()
    assert queued(redis_clean) == 1 + 1 + 1 + 2
    assert [lock.holder for lock in render.dedupe.locks()] == [holder.id]
    assert head.parent is not None and len(members.results) == 2


def test_send_task_bypasses_dedupe(redis_clean):
    """Documented limit: ``app.send_task`` by name never reaches the task's ``apply_async``."""
    app, render, _, _ = deduped_app(redis_clean, "ddsend")
    holder = render.delay("acme")
    sent = [app.send_task(render.name, ("acme",)) for _ in range(2)]
    assert len({holder.id, *(r.id for r in sent)}) == 3
    assert queued(redis_clean) == 3
    assert [lock.holder for lock in render.dedupe.locks()] == [holder.id]


def test_a_flushed_store_lets_the_next_call_publish(redis_clean):
    _app, render, _, _ = deduped_app(redis_clean, "ddflush")
    first = render.delay("acme")
    redis_clean.client(1).flushdb()
    second = render.delay("acme")
    assert second.id != first.id and queued(redis_clean) == 2
    assert render.delay("acme").id == second.id


def test_redis_down_at_publish_publishes_and_logs_once(redis_clean, fault_redis, caplog):
    _app, render, _, _ = deduped_app(redis_clean, "dddown", tuning_url=fault_redis.db_url(1))
    fault_redis.stop()
    with caplog.at_level("WARNING", logger="celery_tuning.dedupe"):
        ids = {render.delay("acme").id for _ in range(3)}
    assert len(ids) == 3 and queued(redis_clean) == 3  # never dropped
    assert sum("tuning Redis failed" in r.getMessage() for r in caplog.records) == 1
    fault_redis.restart()
    first = render.delay("acme")
    assert render.delay("acme").id == first.id  # back to deduplicating


def test_memory_store_dedupes_in_process(redis_clean):
    _app, render, _, _ = deduped_app(redis_clean, "ddmem", tuning_url="memory://")
    first = render.delay("acme")
    assert render.delay("acme").id == first.id
    assert queued(redis_clean) == 1


def test_a_key_function_that_raises_reaches_the_caller_and_nothing_is_published(redis_clean):
    """Documented: ``key=`` is the caller's code; its error reaches ``delay()`` as it is (a worker
    never fails a call because of it: see test_messages_no_worker_runs_free_their_key)."""
    app = make_app(redis_clean, "ddbadkey")

    @app.task(base=TunedTask, shared=False, name="ddbadkey.bad")
    @dedupe(key=lambda x, **_: 1 / x)
    def bad(x):
        return x

    with pytest.raises(ZeroDivisionError):
        bad.delay(0)
    assert queued(redis_clean) == 0 and bad.dedupe.locks() == []
    assert bad.delay(2).id == bad.delay(2).id and queued(redis_clean) == 1

    # The commonest slip, a key function without **kw called with a keyword: its TypeError reaches
    # the caller too (it was swallowed, and deduplication silently off).
    @app.task(base=TunedTask, shared=False, name="ddbadkey.narrow")
    @dedupe(key=lambda account_id: account_id)
    def narrow(account_id, full=False):
        return account_id

    with pytest.raises(TypeError):
        narrow.delay(7, full=True)
    assert queued(redis_clean) == 1 and narrow.dedupe.locks() == []


def test_a_cache_hit_at_publish_answers_without_publishing_or_claiming(redis_clean):
    """``@cache_result(short_circuit=True)`` under ``@dedupe``: a cached call is answered from the
    cache, takes no key (an identical call is never answered with an id nobody publishes); a miss
    is deduplicated."""
    app = make_app(redis_clean, "ddcache")

    @app.task(base=TunedTask, shared=False, name="ddcache.price")
    @dedupe()
    @cache_result(ttl=60, short_circuit=True)
    def price(sku):
        return {"sku": sku}

    assert price.apply(("A1",)).get() == {"sku": "A1"}  # computed in this process: cached
    price.cache.flush()
    hit = price.delay("A1")
    assert isinstance(hit, EagerResult) and hit.get() == {"sku": "A1"}
    assert queued(redis_clean) == 0 and price.dedupe.locks() == []
    miss = price.delay("B2")
    assert not isinstance(miss, EagerResult) and price.delay("B2").id == miss.id
    assert queued(redis_clean) == 1 and [lock.holder for lock in price.dedupe.locks()] == [miss.id]


def test_a_renewal_on_its_way_never_drops_a_retried_calls_lock(redis_clean):
    """The renewer takes its snapshot while the call runs; the body raises Retry (the lock turns
    queued: the retried message keeps it) and the renewal's round trip lands only then. It must
    neither turn the lock back to running nor free it when it sees the call gone."""
    _app, render, _, _ = deduped_app(redis_clean, "ddrace")
    step = render.dedupe._step
    store = step.store
    task_id, digest = uuid(), render.dedupe.key("acme")
    assert store.claim(render.name, digest, task_id, step.ttl_us).holder == task_id  # as published
    on_its_way, land = threading.Event(), threading.Event()
    real_hold = store.hold

    def hold(task, state, *args, **kwargs):  # the real script, against the real Redis, held back
        if state == "r" and threading.current_thread().name == "renewal":
            on_its_way.set()
            land.wait(10)
        return real_hold(task, state, *args, **kwargs)

    store.hold = hold
    renewal = threading.Thread(target=step.renew, name="renewal")

    def body(ctx):
        renewal.start()
        assert on_its_way.wait(10)  # the snapshot holds this call; its round trip waits
        raise Retry()

    call = step.wrap(body)
    render.push_request(id=task_id, headers={HEADER_DEDUPE: digest}, is_eager=False, called_directly=False)
    try:
        with pytest.raises(Retry):
            call(CallContext(render, ("acme",), {}))
    finally:
        render.pop_request()
    assert [(lock.holder, lock.state) for lock in render.dedupe.locks()] == [(task_id, "queued")]
    land.set()
    renewal.join(10)
    assert [(lock.holder, lock.state) for lock in render.dedupe.locks()] == [(task_id, "queued")]
    assert render.delay("acme").id == task_id


def test_decorator_errors_name_the_argument():
    with pytest.raises(ConfigurationError, match=r"@dedupe\(until='finished'\): expected 'done' or 'started'"):
        dedupe(until="finished")
    with pytest.raises(ConfigurationError, match=r"@dedupe\(on_duplicate='drop'\): expected one of"):
        dedupe(on_duplicate="drop")
    with pytest.raises(ConfigurationError, match=r"@dedupe\(ttl=0\): expected a number of seconds > 0"):
        dedupe(ttl=0)
    with pytest.raises(ConfigurationError, match=r"@dedupe\(key='account'\): expected a callable"):
        dedupe(key="account")
    with pytest.raises(ConfigurationError, match=r"@dedupe takes keyword arguments only"):
        dedupe(lambda x: x)  # a bare @dedupe: it registered a task named 'decorate' before


def test_the_counter_records_deduplicated_calls_by_task():
    code = ("from prometheus_client import REGISTRY\n"
            "from celery_tuning import events\n"
            "from celery_tuning.integration import metrics as m\n"
            "m.connect_metric_receivers()\n"
            "events.deduplicated('t.render'); events.deduplicated('t.render')\n"
            "print(REGISTRY.get_sample_value('celery_tuning_deduplicated_total', {'task': 't.render'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "2.0", out.stderr


# -- real prefork workers ----------------------------------------------------------------------------

WAIT_STARTED = """
import time
from tests.apps.deduped import ledger
def wait_started(task_id, timeout=20):
    deadline = time.time() + timeout
    while not ledger.get(f"started:{task_id}"):
        assert time.time() < deadline, f"{task_id} never started"
        time.sleep(0.02)
"""

FIFTY = """
import json, time
from tests.apps.deduped import ledger, render
deadline = time.time() + 60
while not ledger.get("go"):  # imported and connected before the first call starts: calls land in its run
    assert time.time() < deadline
    time.sleep(0.01)
results = [render.delay(7, 3.0) for _ in range(10)]
print(json.dumps([[r.id, r.get(timeout=30)] for r in results]))
"""


@pytest.mark.slow
def test_fifty_identical_calls_from_five_processes_run_the_body_once(redis_clean):
    env = worker_env(redis_clean)
    worker = WorkerProcess("tests.apps.deduped:app", env, pool="prefork", concurrency=2)
    try:
        penv = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        producers = [subprocess.Popen([sys.executable, "-c", FIFTY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=str(ROOT), env=penv) for _ in range(5)]
        worker.start()
        first = run_producer(WAIT_STARTED + "from tests.apps.deduped import render\n"
                             "r = render.delay(7, 3.0)\nwait_started(r.id)\nledger.set('go', 1)\nprint(r.id)\n",
                             redis_clean)
        outputs = [p.communicate(timeout=60) for p in producers]
        assert all(p.returncode == 0 for p in producers), [err for _, err in outputs]
        calls = [call for out, _ in outputs for call in json.loads(out.strip().splitlines()[-1])]
        assert len(calls) == 50
        assert {task_id for task_id, _ in calls} == {first}
        assert all(value == {"x": 7, "id": first} for _, value in calls)
        assert int(redis_clean.client(1).get("runs:render:7")) == 1
        # done: the key is free, and the next call runs again
        out = run_producer("from tests.apps.deduped import render\nr = render.delay(7)\n"
                           "print(r.id, r.get(timeout=30)['id'])\n", redis_clean)
        new_id, ran_as = out.split()
        assert new_id == ran_as != first
    finally:
        worker.close()


@pytest.mark.slow
def test_a_killed_worker_frees_the_key_within_the_lease_ttl_not_the_ttl(redis_clean):
    env = {**worker_env(redis_clean), "TEST_LEASE_TTL": "2", "TEST_DEDUPE_TTL": "600"}
    doomed = WorkerProcess("tests.apps.deduped:app", env, pool="prefork", concurrency=1, name="doomed")
    survivor = WorkerProcess("tests.apps.deduped:app", env, pool="prefork", concurrency=1, name="survivor")
    try:
        doomed.start()
        first = run_producer(WAIT_STARTED + "from tests.apps.deduped import render\n"
                             "r = render.delay(8, 60)\nwait_started(r.id)\n"
                             "time.sleep(2.5)\n"  # past the first lease: the lock lives on its renewals
                             "assert render.delay(8, 60).id == r.id\nprint(r.id)\n", redis_clean, env=env)
        os.killpg(doomed.proc.pid, signal.SIGKILL)  # nothing releases the lock
        killed_at = time.time()
        out = run_producer(
            "import time\nfrom tests.apps.deduped import render\n"
            f"first, killed_at = {first!r}, {killed_at!r}\n"
            "while True:\n"
            "    r = render.delay(8, 0)\n"
            "    if r.id != first:\n"
            "        break\n"
            "    r.forget()\n"
            "    time.sleep(0.05)\n"
            "print(time.time() - killed_at, r.id)\n", redis_clean, env=env, timeout=60)
        freed_after, new_id = out.split()
        assert float(freed_after) < 2 + 1.0, "the key outlived the lease TTL"
        survivor.start()
        assert run_producer(f"from tests.apps.deduped import render\nprint(render.AsyncResult({new_id!r})"
                            ".get(timeout=30)['id'])\n", redis_clean, env=env) == new_id
    finally:
        doomed.close()
        survivor.close()


@pytest.mark.slow
def test_until_started_retry_and_deferral(redis_clean):
    code = """
from tests.apps.deduped import refresh

# until="started": one while queued (no worker yet), a new one once its body started
a = refresh.delay(1, 1.0)
assert refresh.delay(1, 1.0).id == a.id
print(a.id)
"""
    env = worker_env(redis_clean)
    first = run_producer(code, redis_clean)
    worker = WorkerProcess("tests.apps.deduped:app", env, pool="prefork", concurrency=2)
    try:
        worker.start()
        out = run_producer(WAIT_STARTED + f"FIRST = {first!r}\n" + """
import time
from tests.apps.deduped import refresh, flaky, trickled, ledger
wait_started(FIRST)
b = refresh.delay(1, 0)  # the first is running (1 s): a new call goes through
assert b.id != FIRST
assert b.get(timeout=20) == 1
assert int(ledger.get("runs:refresh:1")) == 2

# Retry keeps the lock: the retried call (same id) is queued again, duplicates get its id
f = flaky.delay(3)
deadline = time.time() + 20
while not ledger.get("runs:flaky:3"):
    assert time.time() < deadline
    time.sleep(0.02)
time.sleep(0.3)  # inside the retry's 1.5 s countdown
assert flaky.delay(3).id == f.id
assert f.get(timeout=20) == {"x": 3, "retries": 1}
assert int(ledger.get("runs:flaky:3")) == 2

# A deferral (rate limit: parked) keeps it too. t0 takes the one token first (sent together, either
# could win it: a run on a loaded host saw t5 run at once), then t5 waits about 1 s for its slot.
t0 = trickled.delay(0)
wait_started(t0.id)
t5 = trickled.delay(5)
ids = []
while True:  # until t5's body starts (about 1 s later: parked for its slot), every duplicate gets its id
    again = trickled.delay(5).id
    if ledger.get(f"started:{t5.id}"):
        break
    ids.append(again)
    time.sleep(0.05)
assert set(ids) == {t5.id} and len(ids) >= 5, ids
assert t5.get(timeout=30) == 5 and t0.get(timeout=30) == 0
assert int(ledger.get("runs:trickled:5")) == 1
print("ok", flaky.delay(3).id != f.id)
""", redis_clean)
        assert out.splitlines()[-1] == "ok True"
    finally:
        worker.close()


@pytest.mark.slow
def test_revoke_and_a_hard_time_limit_free_the_key(redis_clean):
    """Freed by the worker's main process (task_revoked, task_failure), long before the lease TTL (30 s)."""
    worker = WorkerProcess("tests.apps.deduped:app", worker_env(redis_clean), pool="prefork", concurrency=2)
    try:
        worker.start()
        out = run_producer(WAIT_STARTED + """
import time
from tests.apps.deduped import render, stuck

def freed_within(call, first, timeout):
    start = time.time()
    while time.time() - start < timeout:
        r = call()
        if r.id != first:
            return time.time() - start
        time.sleep(0.05)
    raise AssertionError("the key was never freed")

r = render.delay(9, 30)
wait_started(r.id)
assert render.delay(9, 30).id == r.id
r.revoke(terminate=True, signal="SIGKILL")  # its pool process cannot free the key
print("revoke", freed_within(lambda: render.s(9, 30).set(countdown=600).delay(), r.id, 10))

s = stuck.delay(4)
wait_started(s.id)
assert stuck.delay(4).id == s.id
print("time_limit", freed_within(lambda: stuck.s(4).set(countdown=600).delay(), s.id, 10))
""", redis_clean)
        timings = dict(line.split() for line in out.splitlines())
        assert float(timings["revoke"]) < 5
        assert float(timings["time_limit"]) < 5  # 1.5 s limit, then the main process frees it
    finally:
        worker.close()


def tuning_locks(redis_server, task):
    return [(lock.holder, lock.state) for lock in RedisDedupeStore(RedisConnector(redis_server.db_url(1))).locks(task)]


@pytest.mark.slow
def test_canvas_members_duplicating_a_holder_are_published_and_complete(redis_clean):
    """Something waits for a canvas member's own id, however Celery publishes it: a chain's last
    member (the tracer sends it with ``chain=[]``), a frozen ``link=`` callback or ``link_error=``
    errback, a chord's body, a group member. Each runs beside the holder (here queued where no worker consumes) and its
    canvas completes; the holder keeps its key."""
    worker = WorkerProcess("tests.apps.deduped:app", worker_env(redis_clean), pool="prefork", concurrency=2)
    try:
        worker.start()
        out = run_producer("""
from celery import chain, chord, group
from tests.apps.deduped import add, fail, render
holder = render.apply_async((9,), queue="nobody")  # holds the key, queued, for as long as the test runs
assert render.delay(9).id == holder.id
last = chain(add.si(1, 1), render.si(9)).apply_async()
assert last.get(timeout=10)["id"] == last.id != holder.id
callback = render.si(9)
linked = callback.freeze()
add.apply_async((1, 1), link=callback)
assert linked.get(timeout=10)["id"] == linked.id != holder.id
body = chord([add.si(1, 1), add.si(2, 2)], render.si(9)).apply_async()
assert body.get(timeout=10)["id"] == body.id != holder.id
errback = render.si(9)
failed_over = errback.freeze()
fail.apply_async((1,), link_error=errback)
assert failed_over.get(timeout=10)["id"] == failed_over.id != holder.id
assert [r["id"] for r in group(render.si(9), render.si(9)).apply_async().get(timeout=10)] != [holder.id] * 2
print(holder.id)
""", redis_clean, timeout=60)
        assert tuning_locks(redis_clean, "tests.apps.deduped.render") == [(out, "queued")]
    finally:
        worker.close()


@pytest.mark.slow
def test_messages_no_worker_runs_free_their_key(redis_clean):
    """A task the worker does not know (a rolling deploy: ``task_unknown``) and a message it cannot
    decode (``task_rejected``) free their key at once, not at ``ttl``. A key function that raises
    never fails a call on a worker (sent by name: no digest header)."""
    _app, render, _, _ = deduped_app(redis_clean, "ddghost")  # tasks the worker below has never heard of
    ghost = render.delay("acme")
    rejected = run_producer("from tests.apps.deduped import render\n"
                            "print(render.apply_async((11,), serializer='pickle').id)\n",  # the worker accepts JSON
                            redis_clean)
    assert [lock.holder for lock in render.dedupe.locks()] == [ghost.id]
    assert tuning_locks(redis_clean, "tests.apps.deduped.render") == [(rejected, "queued")]
    worker = WorkerProcess("tests.apps.deduped:app", worker_env(redis_clean), pool="prefork", concurrency=1)
    try:
        worker.start()
        assert run_producer("from tests.apps.deduped import app\n"
                            "print(app.send_task('tests.apps.deduped.badkey', (3,)).get(timeout=10))\n",
                            redis_clean) == "3"
        deadline = time.time() + 10
        while render.dedupe.locks() or tuning_locks(redis_clean, "tests.apps.deduped.render"):
            assert time.time() < deadline, (render.dedupe.locks(), worker.output())
            time.sleep(0.05)
        assert "unregistered task" in worker.output() and "ContentDisallowed" in worker.output()
    finally:
        worker.close()
    assert render.delay("acme").id != ghost.id


@pytest.mark.slow
def test_replace_keeps_the_key_for_the_replacement(redis_clean):
    """``Task.replace`` with a call under the same key publishes it with the same id: the key stays
    held (queued) while it waits, and the replaced call's end does not free it."""
    worker = WorkerProcess("tests.apps.deduped:app", worker_env(redis_clean), pool="prefork", concurrency=2)
    try:
        worker.start()
        out = run_producer(WAIT_STARTED + """
import time
from tests.apps.deduped import ledger, pages
p = pages.delay(5)
wait_started(p.id)
time.sleep(0.5)  # the first page has replaced itself: the second waits for its countdown (1.5 s)
assert int(ledger.get("runs:pages:5")) == 1
assert pages.delay(5, page=7).id == p.id
assert p.get(timeout=10) == {"x": 5, "page": 1, "id": p.id}
assert int(ledger.get("runs:pages:5")) == 2
print("ok")
""", redis_clean)
        assert out == "ok"
        assert tuning_locks(redis_clean, "tests.apps.deduped.pages") == []
    finally:
        worker.close()
