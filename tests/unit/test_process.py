"""PerProcess: one value per process, rebuilt after a real os.fork()."""

import os
import signal
import threading

from celery_tuning.storage.process import PerProcess, after_fork_in_child
from tests.support.fork import true_in_child


class Thing:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()


def test_built_once_per_process_and_lazily():
    built = []
    holder = PerProcess(lambda: built.append(1) or Thing(), name="thing")
    assert not holder.built() and holder.peek() is None and built == []
    first = holder.get()
    assert holder.get() is first and holder.peek() is first and built == [1]
    assert "thing" in repr(holder) and "built" in repr(holder)


def test_a_forked_child_builds_its_own_value():
    holder = PerProcess(Thing)
    parent = holder.get()

    def child() -> bool:
        assert holder.peek() is None  # the parent's value is gone before anything runs
        mine = holder.get()
        return mine is not parent and mine.pid == os.getpid() and holder.get() is mine

    assert true_in_child(child)
    assert holder.get() is parent  # the parent keeps its own


def test_a_lock_held_by_a_parent_thread_at_fork_does_not_hang_the_child():
    built = threading.Event()

    def slow() -> Thing:
        built.wait(5)
        return Thing()

    holder = PerProcess(slow)
    thread = threading.Thread(target=holder.get)  # holds the holder's lock while building
    thread.start()
    try:
        def child() -> bool:
            signal.alarm(5)  # an inherited held lock would hang here: fail instead
            built.set()
            return holder.get().pid == os.getpid()

        assert true_in_child(child)
    finally:
        built.set()
        thread.join()


def test_on_fork_gets_the_parents_value_in_the_child_only():
    seen = []
    holder = PerProcess(Thing, on_fork=lambda value: seen.append(value.pid))
    unbuilt = PerProcess(Thing, on_fork=lambda value: seen.append("unbuilt"))
    parent_pid = holder.get().pid

    def child() -> bool:
        return seen == [parent_pid] and unbuilt.peek() is None

    assert true_in_child(child)
    assert seen == []  # never in the parent


def test_a_failing_on_fork_does_not_stop_the_others():
    def boom(_value: Thing) -> None:
        raise RuntimeError("boom")

    first = PerProcess(Thing, on_fork=boom)
    second = PerProcess(Thing, on_fork=lambda value: seen.append(value))
    seen = []
    first.get()
    second.get()
    assert true_in_child(lambda: len(seen) == 1 and first.peek() is None)


def test_after_fork_callbacks_run_in_the_child():
    state = {"pid": os.getpid()}

    @after_fork_in_child
    def forget() -> None:
        state["pid"] = os.getpid()

    assert true_in_child(lambda: state["pid"] == os.getpid())
    assert state["pid"] == os.getpid()


def test_reset_and_set():
    holder = PerProcess(Thing)
    first = holder.get()
    assert holder.reset() is first and holder.reset() is None
    assert holder.get() is not first
    mine = Thing()
    holder.set(mine)
    assert holder.get() is mine
    assert true_in_child(lambda: holder.get() is not mine)


def test_a_factory_that_raises_leaves_nothing_built():
    calls = []

    def flaky() -> Thing:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("down")
        return Thing()

    holder = PerProcess(flaky)
    try:
        holder.get()
    except OSError:
        pass
    assert not holder.built()
    assert holder.get().pid == os.getpid() and len(calls) == 2


def test_threads_racing_build_one_value():
    holder = PerProcess(Thing)
    got = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        got.append(holder.get())

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(v) for v in got}) == 1


def test_scripts_are_read_at_import_not_from_a_thread_that_a_fork_may_freeze(monkeypatch):
    """A mover thread reading a script through importlib.resources while the prefork pool forked a
    child left that child holding an import lock nobody would release: it hung on its first
    script. Every source is read when celery_tuning.storage.redis is imported."""
    from importlib import resources

    from celery_tuning.storage import redis as storage_redis

    def no_importlib(*args, **kwargs):
        raise AssertionError("importlib.resources used after import")

    monkeypatch.setattr(resources, "files", no_importlib)
    names = sorted(storage_redis._LUA_SOURCES)
    assert "park_unclaim" in names and "gcra_acquire" in names
    for name in names:
        assert storage_redis.load_lua(name).strip()
