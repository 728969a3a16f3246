"""The two cache levels against a real redis-server: what each level hands out, invalidations
reaching every L1 (peek included, foreign messages and lost subscriptions survived), and
generations that never go back."""

import inspect
import json
import logging
import time

from celery_tuning.cache import TwoLevelCache
from celery_tuning.storage.cache import RedisCacheStore, listener_for
from celery_tuning.storage.redis import RedisConnector


def fetch(doc, lang="en"):
    pass


SIG = inspect.signature(fetch)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def process(server, name, **options):
    """A cache as another process would have it: its own connector, pool and listener."""
    options.setdefault("ttl", 600)
    options.setdefault("l1_ttl", 600)
    return TwoLevelCache(name, SIG, store=RedisCacheStore(RedisConnector(server.db_url(1))), **options)


def subscribed(cache, timeout=5.0):
    listener = listener_for(cache.store.connector, cache.keys.channel)
    return listener.subscribed.wait(timeout)


def eventually(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_every_level_returns_what_an_l2_hit_returns(redis_clean):
    """The computing caller, another process's L2 hit and L1 hits all get the JSON form, each a copy."""
    a, b = process(redis_clean, "t.shape"), process(redis_clean, "t.shape")
    d = a.digest(("x",), {})
    computed = a.get_or_compute(d, lambda: {"pair": (1, 2), 7: "seven"})
    expected = {"pair": [1, 2], "7": "seven"}
    assert computed == expected
    computed["pair"].append(3)
    assert b.get_or_compute(d, lambda: None) == expected  # L2
    from_l1 = a.get_or_compute(d, lambda: None)
    assert from_l1 == expected and from_l1 is not computed
    from_l1["pair"].clear()
    assert a.get_or_compute(d, lambda: None) == expected
    assert b.get_or_compute(d, lambda: None) == expected  # b's own L1 now


def test_peek_hears_invalidations(redis_clean):
    """The producer side of short_circuit: a value peek() kept in L1 goes when it is invalidated."""
    a, producer = process(redis_clean, "t.peek"), process(redis_clean, "t.peek")
    d = a.digest(("x",), {})
    a.get_or_compute(d, lambda: 1)
    assert producer.peek(d) == (True, 1)
    subscribed(producer)
    assert producer.peek(d) == (True, 1)
    a.invalidate_digest(d)
    assert eventually(lambda: producer.peek(d) == (False, None)), "peek served a value invalidated elsewhere"


def test_foreign_messages_leave_the_listener_up(redis_clean, caplog):
    a, b = process(redis_clean, "t.foreign"), process(redis_clean, "t.foreign")
    d = a.digest(("x",), {})
    a.get_or_compute(d, lambda: 1)
    b.get_or_compute(d, lambda: None)
    assert subscribed(b)
    assert b.get_or_compute(d, lambda: None) == 1  # in b's L1
    client = redis_clean.client(1)
    caplog.set_level(logging.WARNING, logger="celery_tuning.cache")
    for foreign in (b"\xff\xfe", b"[1, 2]", json.dumps({"task": "t.foreign", "generation": "x"}),
                    json.dumps({"task": "t.foreign", "digest": ["x"]}), json.dumps({"task": {"a": 1}})):
        client.publish(b.keys.channel, foreign)
    a.invalidate_digest(d)  # right behind them: a listener that restarted would miss it
    assert eventually(lambda: b.peek(d) == (False, None), 1.0), "the invalidation after foreign messages was lost"
    assert not [r for r in caplog.records if "listener failed" in r.getMessage()]


def test_an_invalidation_sent_while_unsubscribed_empties_l1_on_resubscribing(redis_clean):
    a, b = process(redis_clean, "t.resub"), process(redis_clean, "t.resub")
    d = a.digest(("x",), {})
    a.get_or_compute(d, lambda: 1)
    b.get_or_compute(d, lambda: None)
    assert subscribed(b)
    assert b.get_or_compute(d, lambda: None) == 1
    client = redis_clean.client(1)
    client.client_kill_filter(_type="pubsub")  # Redis restarted, a failover, a network blip ...
    a.invalidate_digest(d)  # ... and this message reaches no one
    assert eventually(lambda: client.pubsub_numsub(b.keys.channel)[0][1] >= 1, 5.0)
    assert eventually(lambda: b.peek(d) == (False, None)), "L1 kept a value invalidated while unsubscribed"


def test_an_evicted_generation_key_does_not_bring_cleared_entries_back(redis_clean):
    """Under an allkeys-* policy Redis may evict the generation key: a process that reads the
    generation afterwards (a new one, or one whose copy is older than 5 s) must not land in a
    generation whose entries clear() dropped."""
    clock = Clock()
    a = process(redis_clean, "t.gen", clock=clock, l1_ttl=0)
    d = a.digest(("x",), {})
    assert a.get_or_compute(d, lambda: "old") == "old"
    before = a.clear()
    assert a.get_or_compute(d, lambda: "new") == "new"
    client = redis_clean.client(1)
    assert client.delete(a.keys.generation_key) == 1  # what an eviction does
    fresh = process(redis_clean, "t.gen")
    assert fresh.peek(d) == (False, None), "a cleared entry came back"
    assert fresh.get_or_compute(d, lambda: "newer") == "newer"
    clock.now += 10  # a's copy of the generation is stale: it reads it again
    assert a.get_or_compute(d, lambda: "never") == "newer"
    assert a._current_generation() > before


def test_a_forked_child_hears_invalidations_and_drops_what_its_parent_kept(redis_clean):
    """A child forked from a process that used the cache (gunicorn --preload, a prefork parent
    that peeked) has no listener thread: it must not serve its parent's L1 unheard."""
    from tests.support.fork import true_in_child

    a, parent = process(redis_clean, "t.fork"), process(redis_clean, "t.fork")
    d = a.digest(("x",), {})
    a.get_or_compute(d, lambda: 1)
    assert parent.peek(d) == (True, 1)
    assert subscribed(parent)
    assert parent.peek(d) == (True, 1)

    def child():
        first = parent.peek(d) == (True, 1)  # read again from L2, and now listening
        ok = subscribed(parent) and eventually(lambda: parent.peek(d) == (True, 1))
        a.invalidate_digest(d)
        return first and ok and eventually(lambda: parent.peek(d) == (False, None))

    assert true_in_child(child)


def test_a_value_that_encodes_but_never_decodes_is_not_stored(redis_clean, caplog):
    """msgpack packs a tuple dict key but cannot unpack it: such a value used to be written on every
    call, never served, and each read logged it as a foreign value. Now it is not cached, once said."""
    cache = process(redis_clean, "t.undecodable", serializer="msgpack")
    d = cache.digest(("x",), {})
    runs = []

    def compute():
        runs.append(1)
        return {(1, 2): "x"}

    with caplog.at_level(logging.WARNING, logger="celery_tuning"):
        for _ in range(3):
            assert cache.get_or_compute(d, compute) == {(1, 2): "x"}
    assert len(runs) == 3
    tuning = redis_clean.client(1)
    assert [k for k in tuning.keys("*t.undecodable*") if not k.endswith((b":gen", b":lock"))] == []
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot read back" in m for m in messages) == 1, messages
    assert not any("not ours" in m for m in messages), messages


def test_entries_counts_only_its_own_task_whatever_glob_characters_its_name_holds(redis_clean):
    """SCAN MATCH reads *, ?, [ ] and \\ as a pattern: a name holding them used to count other tasks' entries."""
    names = ["t.x*", "t.x?", "t.x[ab]", "t.x\\", "t.xa", "t.xb", "t.xab", "t.x\\a"]
    caches = {name: process(redis_clean, name) for name in names}
    for cache in caches.values():  # one generation for all: only the name tells their entries apart
        redis_clean.client(1).set(cache.keys.generation_key, 7)
    for n, cache in enumerate(caches.values(), start=1):
        for i in range(n):
            cache.get_or_compute(cache.digest((f"doc{i}",), {}), lambda i=i: i)
    assert {name: cache.l2_entries() for name, cache in caches.items()} == {
        name: n for n, name in enumerate(names, start=1)}


# -- single-flight locks are leases renewed by the leader's process ---------------------------


def test_lock_timeout_bounds_a_live_leaders_lock_whatever_the_renewals(redis_clean):
    """Renewals keep a slow leader's lock (lease 0.3 s) only up to lock_timeout (1 s): then a
    follower computes itself, as the bound promises."""
    import threading

    leader = process(redis_clean, "t.bound", l1_ttl=0, lease_ttl=0.3, lock_timeout=1.0)
    follower = process(redis_clean, "t.bound", l1_ttl=0, lease_ttl=0.3, lock_timeout=1.0, wait_timeout=5)
    d = leader.digest(("x",), {})
    started = threading.Event()

    def slow():
        started.set()
        time.sleep(2.0)
        return "leader"

    thread = threading.Thread(target=lambda: leader.get_or_compute(d, slow))
    asked = time.monotonic()
    thread.start()
    assert started.wait(5)
    assert follower.get_or_compute(d, lambda: "follower") == "follower"
    took_over = time.monotonic() - asked
    thread.join()
    assert 0.8 <= took_over < 1.6, f"the follower took over after {took_over:.2f}s"


def test_renewal_extends_only_locks_that_still_hold_our_token_in_one_round_trip(fault_redis):
    from celery_tuning.storage.cache import LockRenewer

    client = fault_redis.client(1)
    client.flushdb()
    connector = RedisConnector(fault_redis.db_url(1))
    renewer = LockRenewer()
    deadline = renewer.clock() + 60
    ours = [(f"tuning:cache:{{t.{i % 2}}}:v1:g1:d{i}:lock", f"tok{i}") for i in range(5)]
    for key, token in ours:
        client.set(key, token, px=1000)
        renewer.hold(connector, key.split(":")[2], key, token, 30_000, deadline)
    client.set("tuning:cache:{t.0}:v1:g1:taken:lock", "a follower's", px=1000)
    renewer.hold(connector, "{t.0}", "tuning:cache:{t.0}:v1:g1:taken:lock", "tok-lost", 30_000, deadline)
    client.set("tuning:cache:{t.1}:v1:g1:late:lock", "tok-late", px=1000)
    renewer.hold(connector, "{t.1}", "tuning:cache:{t.1}:v1:g1:late:lock", "tok-late", 30_000, renewer.clock() + 0.5)

    from celery_tuning.storage.redis import load_lua

    client.script_load(load_lua("cache_renew"))  # a NOSCRIPT answer would count one call more
    before = _calls(client, "evalsha")
    assert renewer.renew_once() == 6
    assert _calls(client, "evalsha") - before == 1, "every held lock renewed in one round trip"
    assert all(29_000 < client.pttl(key) <= 30_000 for key, _ in ours)
    assert client.get("tuning:cache:{t.0}:v1:g1:taken:lock") == b"a follower's"
    assert client.pttl("tuning:cache:{t.0}:v1:g1:taken:lock") <= 1000, "another caller's lock was extended"
    assert client.pttl("tuning:cache:{t.1}:v1:g1:late:lock") <= 500, "renewed past its lock_timeout"
    assert renewer.held() == 6, "the lost lock is no longer renewed"
    for key, token in ours:
        renewer.drop(key, token)
    time.sleep(0.6)
    assert renewer.renew_once() == 0 and renewer.held() == 0, "a lock past its deadline is dropped"
    connector.close()


def test_a_forked_child_does_not_renew_its_parents_locks(redis_clean):
    from celery_tuning.storage.cache import lock_renewer
    from tests.support.fork import true_in_child

    client = redis_clean.client(1)
    connector = RedisConnector(redis_clean.db_url(1))
    renewer = lock_renewer()
    client.set("tuning:cache:{t.fork}:v1:g1:d:lock", "parent", px=2000)
    renewer.hold(connector, "{t.fork}", "tuning:cache:{t.fork}:v1:g1:d:lock", "parent", 2000, renewer.clock() + 60)
    try:
        assert true_in_child(lambda: renewer.held() == 0 and renewer.renew_once() == 0)
        assert renewer.held() == 1
    finally:
        renewer.drop("tuning:cache:{t.fork}:v1:g1:d:lock", "parent")
        connector.close()


def _calls(client, command):
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_renewal_on_a_cluster_renews_each_tasks_locks_in_its_own_slot(cluster_clean):
    """A Cluster refuses one script over keys of several slots (CROSSSLOT): one call per task."""
    from redis.cluster import RedisCluster

    from celery_tuning.storage.cache import LockRenewer

    client = RedisCluster(host="127.0.0.1", port=cluster_clean.nodes[0].port)
    connector = RedisConnector(cluster_clean.url)
    renewer = LockRenewer()
    keys = [(f"tuning:cache:{{t.{name}}}:v1:g1:d{i}:lock", f"tuning:cache:{{t.{name}}}", f"tok{name}{i}")
            for name in ("a", "b", "c") for i in range(2)]
    for key, group, token in keys:
        client.set(key, token, px=1000)
        renewer.hold(connector, group, key, token, 30_000, renewer.clock() + 60)
    assert len({client.keyslot(key) for key, _, _ in keys}) == 3
    assert renewer.renew_once() == 6
    assert all(client.pttl(key) > 29_000 for key, _, _ in keys)
    for key, _, token in keys:
        renewer.drop(key, token)
    connector.close()
    client.close()


def test_a_follower_rides_out_a_short_outage_instead_of_computing_beside_its_leader(fault_redis):
    """Redis stops answering for ~0.6 s (CLIENT PAUSE: a failover or a stall, state kept) while a
    leader computes: the follower's polls fail, and it used to run the body at the first failure."""
    import threading

    def cache(name):
        connector = RedisConnector(fault_redis.db_url(1), socket_timeout=0.2, connect_timeout=0.2)
        return TwoLevelCache(name, SIG, store=RedisCacheStore(connector), ttl=600, l1_ttl=600)

    leader, follower = cache("t.outage"), cache("t.outage")
    d = leader.digest(("x",), {})
    runs = []

    def compute(who, seconds):
        def body():
            runs.append(who)
            time.sleep(seconds)
            return "value"
        return body

    lead = threading.Thread(target=lambda: leader.get_or_compute(d, compute("leader", 1.2)))
    lead.start()
    assert eventually(lambda: runs == ["leader"])
    pauser = fault_redis.client()
    threading.Timer(0.2, lambda: pauser.execute_command("CLIENT", "PAUSE", 600, "ALL")).start()
    assert follower.get_or_compute(d, compute("follower", 0)) == "value"
    lead.join(5)
    assert runs == ["leader"]


# -- a result the caller says is not for caching (cacheable=) ---------------------------------


def test_a_result_not_cacheable_is_returned_unstored_and_frees_the_lock_at_once(redis_clean):
    """cacheable(result) False: this caller gets the result, neither level keeps it, and the
    single-flight lock is released at once, so a waiting follower computes without waiting out
    the lease (as after an exception)."""
    import threading

    leader = process(redis_clean, "t.uncacheable", lease_ttl=30, lock_timeout=60, wait_timeout=20)
    follower = process(redis_clean, "t.uncacheable", lease_ttl=30, lock_timeout=60, wait_timeout=20)
    d = leader.digest(("x",), {})
    started, release = threading.Event(), threading.Event()
    degraded = {"degraded": True}
    results = {}

    def body():
        started.set()
        assert release.wait(5)
        return degraded

    def lead():
        results["leader"] = leader.get_or_compute(d, body, cacheable=lambda r: r is not degraded)

    thread = threading.Thread(target=lead)
    thread.start()
    assert started.wait(5)
    client = redis_clean.client(1)
    lock_key = leader.keys.lock(leader.generation(), d)
    assert client.exists(lock_key), "the leader holds the lock while it computes"
    waited = threading.Thread(target=lambda: results.setdefault("follower", follower.get_or_compute(d, lambda: "real")))
    waited.start()
    time.sleep(0.1)  # the follower is waiting for the leader
    asked = time.monotonic()
    release.set()
    thread.join(5)
    waited.join(5)
    assert results["leader"] is degraded, "the caller gets its own result, not a decoded copy"
    assert results["follower"] == "real", "the follower computed itself"
    assert time.monotonic() - asked < 2, "the lock was freed at once, not after its lease"
    assert leader.peek(d) == (True, "real"), "only the follower's cacheable value is kept"
    assert not client.exists(lock_key)


def test_a_result_not_cacheable_is_not_kept_in_l1_or_l2(redis_clean):
    cache = process(redis_clean, "t.uncacheable2")
    d = cache.digest(("y",), {})
    assert cache.get_or_compute(d, lambda: "skip", cacheable=lambda r: r != "skip") == "skip"
    assert cache.peek(d) == (False, None)
    assert not redis_clean.client(1).exists(cache.keys.value(cache.generation(), d))
    calls = []
    assert cache.get_or_compute(d, lambda: calls.append(1) or "kept", cacheable=lambda r: r != "skip") == "kept"
    assert cache.get_or_compute(d, lambda: calls.append(1) or "other") == "kept"
    assert calls == [1]
    local = TwoLevelCache("t.local", SIG, store=None)
    assert local.get_or_compute(d, lambda: "skip", cacheable=lambda r: r != "skip") == "skip"
    assert local.peek(d) == (False, None)


# -- fork: a child keeps nothing of its parent's per-process state ----------------------------


def test_a_forked_child_starts_with_an_empty_l1_of_its_own_and_subscribes_itself(redis_clean):
    """Forked while another thread held the L1 lock: the child neither deadlocks nor serves what
    its parent kept in L1 (it heard no invalidation of it), and it joins the channel itself."""
    from tests.support.fork import true_in_child

    a = process(redis_clean, "t.fork.l1")
    d = a.digest(("x",), {})
    a._listen()
    assert subscribed(a)  # the confirmation clears L1: it must come before the value this test keeps
    assert a.get_or_compute(d, lambda: 1) == 1
    redis_clean.client(1).delete(a.keys.value(a.generation(), d))  # only the parent's L1 has it now
    assert a.invalidations._joined.built()

    def in_child():
        import signal

        signal.alarm(5)  # a deadlock ends the child, and the check answers False
        fresh = not a.invalidations._joined.built() and a.l1.get(d) == (False, None)
        computed = a.get_or_compute(d, lambda: 2) == 2
        return fresh and computed and a.invalidations._joined.built() and a.peek(d) == (True, 2)

    state = a.l1._state.get()
    with state.lock:  # as if another thread were reading L1 at fork()
        assert true_in_child(in_child)
    assert a.peek(d) == (True, 1), "the parent's L1 is its own"
