import pytest

from celery_tuning.integration.profiles import parse_worker_argv
from celery_tuning.policy.profiles import PRESETS, ProfileConflict, choose_profile, expand_profile


def test_presets_expand_with_cpu_count_and_scale(monkeypatch):
    monkeypatch.setattr("celery_tuning.policy.profiles._cpus", lambda: 4)
    assert expand_profile("cpu", {})["concurrency"] == 4
    assert expand_profile("mixed", {})["concurrency"] == 8
    assert expand_profile("io", {}, scale=2)["concurrency"] == 64
    assert expand_profile("cpu", {})["acks_late"] is True and expand_profile("io", {})["pool"] == "threads"
    assert set(PRESETS) == {"io", "cpu", "mixed"}


def test_custom_profiles_extend_a_base():
    custom = {"tiny": {"base": "io", "concurrency": 3}}
    settings = expand_profile("tiny", custom, scale=1.5)
    assert settings == {**PRESETS["io"], "concurrency": 4}
    with pytest.raises(KeyError):
        expand_profile("nope", custom)


def test_choice_and_conflicts():
    mapping = {"webhooks": "io", "embeddings": "cpu", "hooks2": "io"}
    assert choose_profile(["webhooks", "hooks2", "other"], mapping) == ("io", "tuning_queue_profiles[hooks2, webhooks]")
    assert choose_profile(["other"], mapping) == (None, "none")
    assert choose_profile(["webhooks", "embeddings"], mapping, explicit="mixed") == ("mixed", "--tuning-profile")
    with pytest.raises(ProfileConflict, match="embeddings -> cpu, webhooks -> io"):
        choose_profile(["webhooks", "embeddings"], mapping)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["celery", "-A", "p", "worker", "-Q", "a,b", "-c", "4"], (["a", "b"], None, {"concurrency"})),
        (["celery", "-A", "p", "worker", "-Qa", "--pool=threads"], (["a"], None, {"pool"})),
        (["celery", "worker", "--queues", "x", "--tuning-profile", "cpu", "--prefetch-multiplier", "2"],
         (["x"], "cpu", {"prefetch_multiplier"})),
        (["celery", "-A", "p", "worker"], ([], None, set())),
    ],
)
def test_worker_argv(argv, expected):
    assert parse_worker_argv(argv) == expected
