from celery_tuning.policy.timing import breach, compute_timings


def test_wait_counts_from_publish():
    t = compute_timings(sent_at=100.0, published_at=90.0, eta=None, started_wall=102.5,
                        finished_wall=103.0, run=0.5)
    assert (t.wait, t.run, t.total, t.clamped) == (2.5, 0.5, 13.0, False)


def test_delayed_task_waits_from_eta():
    t = compute_timings(sent_at=100.0, published_at=100.0, eta=160.0, started_wall=161.0,
                        finished_wall=161.2, run=0.2)
    assert t.wait == 1.0
    assert abs(t.total - 61.2) < 1e-9


def test_negative_wait_is_clamped_and_flagged():
    t = compute_timings(sent_at=100.0, published_at=100.0, eta=None, started_wall=99.0,
                        finished_wall=99.5, run=0.5)
    assert t.wait == 0.0 and t.clamped


def test_unstamped_message():
    t = compute_timings(sent_at=None, published_at=None, eta=None, started_wall=1.0,
                        finished_wall=2.0, run=1.0)
    assert t.wait is None and t.total is None and t.run == 1.0


def test_breach_levels():
    assert breach(5, 10, 30) is None
    assert breach(11, 10, 30) == ("warning", 10)
    assert breach(31, 10, 30) == ("critical", 30)
    assert breach(31, None, 30) == ("critical", 30)
    assert breach(None, 1, 2) is None
