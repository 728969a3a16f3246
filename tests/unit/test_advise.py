"""Profile advice from metric samples (pure arithmetic; the CLI is tested against a real worker)."""

from celery_tuning.policy.advise import advise, observe, quantile


def samples(queue, attempts, run, cpu, waits=()):
    out = [("celery_tuning_task_run_seconds_count", {"queue": queue, "task": "t"}, attempts),
           ("celery_tuning_task_run_seconds_sum", {"queue": queue, "task": "t"}, run),
           ("celery_tuning_task_cpu_seconds_total", {"queue": queue, "task": "t"}, cpu)]
    out += [("celery_tuning_task_queue_wait_seconds_bucket", {"queue": queue, "task": "t", "le": le}, n)
            for le, n in waits]
    return out


def test_ratio_picks_the_profile():
    obs = observe(samples("a", 100, 10.0, 9.0) + samples("b", 100, 10.0, 0.5) + samples("c", 100, 10.0, 4.0))
    got = {a.queue: a.profile for a in advise(obs, {})}
    assert got == {"a": "cpu", "b": "io", "c": "mixed"}


def test_two_workers_are_summed():
    obs = observe(samples("a", 10, 1.0, 0.9) + samples("a", 15, 1.5, 1.4))
    assert obs["a"].attempts == 25 and abs(obs["a"].cpu_ratio - 2.3 / 2.5) < 1e-9


def test_too_few_attempts_get_no_advice():
    (a,) = advise(observe(samples("a", 5, 1.0, 1.0)), {}, min_attempts=20)
    assert a.profile is None and "only 5 task attempts observed (need 20)" in a.reasons[0]


def test_long_waits_ask_for_capacity_and_configured_profile_is_compared():
    waits = [("1.0", 10), ("30.0", 100), ("+Inf", 100)]
    (a,) = advise(observe(samples("q", 100, 10.0, 0.1, waits)), {"q": "cpu"})
    assert a.profile == "io" and a.current == "cpu"
    assert any("short of capacity (more concurrency)" in r for r in a.reasons)


def test_quantile_interpolates_within_a_bucket():
    assert quantile([(1.0, 50.0), (2.0, 100.0)], 0.75) == 1.5
    assert quantile([], 0.5) is None
