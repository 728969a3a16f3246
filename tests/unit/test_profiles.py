import pytest
from celery import Celery
from kombu import Queue

from celery_tuning.conf import load_config
from celery_tuning.errors import ConfigurationError
from celery_tuning.integration.profiles import (
    apply_profile,
    configured_queues,
    parse_worker_argv,
    validate_profiles,
    worker_queues,
)
from celery_tuning.policy.profiles import (
    PRESETS,
    ProfileConflict,
    ProfileError,
    UnknownProfile,
    choose_profile,
    expand_profile,
)


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
    with pytest.raises(UnknownProfile):
        expand_profile("nope", custom)


def test_a_profile_named_like_a_preset_extends_that_preset(monkeypatch):
    monkeypatch.setattr("celery_tuning.policy.profiles._cpus", lambda: 4)
    custom = {"cpu": {"base": "cpu", "concurrency": 3}, "big": {"base": "cpu", "max_tasks_per_child": 5}}
    assert expand_profile("cpu", custom) == {**PRESETS["cpu"], "concurrency": 3}
    # another profile's base "cpu" is the custom cpu (which shadows the preset), itself on the preset
    assert expand_profile("big", custom) == {**PRESETS["cpu"], "concurrency": 3, "max_tasks_per_child": 5}
    with pytest.raises(ProfileError, match=r"tuning_profiles\['solo'\]\['base'\]: 'solo' names the profile itself"):
        expand_profile("solo", {"solo": {"base": "solo"}})


def test_cycles_name_the_profiles_in_the_cycle():
    custom = {"entry": {"base": "a"}, "a": {"base": "b"}, "b": {"base": "c"}, "c": {"base": "a"}}
    with pytest.raises(ProfileError, match=r"form a cycle \(a -> b -> c -> a\)") as info:
        expand_profile("entry", custom)
    assert "entry" not in str(info.value)
    # two custom profiles shadowing presets, each extending the other's name, are a cycle too
    with pytest.raises(ProfileError, match=r"cycle \(io -> cpu -> io\)"):
        expand_profile("io", {"io": {"base": "cpu"}, "cpu": {"base": "io"}})


def test_an_unknown_base_names_the_profile_whose_base_it_is():
    custom = {"top": {"base": "mid"}, "mid": {"base": "nope"}}
    with pytest.raises(ProfileError, match=r"^tuning_profiles\['mid'\]\['base'\]: unknown profile 'nope'; known: "
                                           r"cpu, io, mid, mixed, top$"):
        expand_profile("top", custom)
    # the settings loader refuses the same, so every command and every worker start does
    with pytest.raises(ConfigurationError, match=r"tuning_profiles\['mid'\]\['base'\]: unknown profile 'nope'"):
        load_config({"tuning_profiles": custom}, environ={})
    with pytest.raises(ConfigurationError, match=r"cycle \(a -> b -> a\)"):
        load_config({"tuning_profiles": {"a": {"base": "b"}, "b": {"base": "a"}}}, environ={})
    with pytest.raises(ConfigurationError, match=r"tuning_profiles\['a'\]\['base'\]: \['io'\] is not valid"):
        load_config({"tuning_profiles": {"a": {"base": ["io"]}}}, environ={})


def test_validate_profiles_refuses_a_queue_mapped_to_an_unknown_profile():
    validate_profiles(load_config({"tuning_queue_profiles": {"emb": "cpu", "w": "x"},
                                   "tuning_profiles": {"x": {"base": "io"}}}, environ={}))
    config = load_config({"tuning_queue_profiles": {"emb": "nope"}}, environ={})
    with pytest.raises(ConfigurationError, match=r"^tuning_queue_profiles\['emb'\]: unknown profile 'nope'; "
                                                 r"known: cpu, io, mixed$"):
        validate_profiles(config)


def test_scale_multiplies_autoscale_like_concurrency():
    custom = {"elastic": {"pool": "prefork", "autoscale": (4, 1)}, "idle": {"autoscale": (4, 0)}}
    assert expand_profile("elastic", custom)["autoscale"] == (4, 1)
    assert expand_profile("elastic", custom, scale=2)["autoscale"] == (8, 2)
    assert expand_profile("elastic", custom, scale=0.1)["autoscale"] == (1, 1)  # a minimum above 0 stays above 0
    assert expand_profile("idle", custom, scale=0.5)["autoscale"] == (2, 0)
    assert expand_profile("idle", custom, scale=1.6)["autoscale"] == (6, 0)


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
        # Celery keeps the last -Q given: the worker consumes b only, so b's profile applies.
        (["celery", "-A", "p", "worker", "-Q", "a", "--queues=c", "-Q", "b"], (["b"], None, set())),
    ],
)
def test_worker_argv(argv, expected):
    assert parse_worker_argv(argv) == expected


def test_a_worker_without_q_consumes_task_queues_or_the_default_queue():
    app = Celery("queues", set_as_current=False)
    assert configured_queues(app) == ["celery"]
    app.conf.task_default_queue = "main"
    assert configured_queues(app) == ["main"]
    app.conf.task_queues = [Queue("emb"), Queue("webhooks")]
    assert configured_queues(app) == ["emb", "webhooks"]
    assert worker_queues(app, ["celery", "worker"]) == ["emb", "webhooks"]
    assert worker_queues(app, ["celery", "worker", "-X", "emb"]) == ["webhooks"]
    assert worker_queues(app, ["celery", "worker", "-Q", "a,b", "--exclude-queues=b"]) == ["a"]
    app.conf.task_queues = {"x": {}, "y": {}}
    assert configured_queues(app) == ["x", "y"]


def test_profiles_come_from_task_queues_without_q():
    app = Celery("noq", set_as_current=False)
    app.conf.task_queues = [Queue("emb"), Queue("webhooks")]
    config = load_config({"tuning_queue_profiles": {"emb": "cpu", "webhooks": "io", "hooks2": "io"}}, environ={})
    with pytest.raises(ConfigurationError, match="emb -> cpu, webhooks -> io"):
        apply_profile(app, config, ["celery", "worker"])
    app.conf.task_queues = [Queue("webhooks"), Queue("hooks2"), Queue("plain")]
    applied = apply_profile(app, config, ["celery", "worker"])
    assert applied is not None and applied["profile"] == "io" and applied["queues"] == ["webhooks", "hooks2", "plain"]
    assert app.conf.worker_pool == "threads" and app.conf.worker_concurrency == 32


def test_apply_profile_scales_autoscale_and_says_so():
    app = Celery("elastic", set_as_current=False)
    config = load_config({"tuning_queue_profiles": {"q": "elastic"},
                          "tuning_profiles": {"elastic": {"pool": "prefork", "autoscale": "3,1"}}},
                         environ={"CELERY_TUNING_CONCURRENCY_SCALE": "2"})
    applied = apply_profile(app, config, ["celery", "worker", "-Q", "q"])
    assert applied is not None and applied["autoscale"] == (6, 2)
    assert applied["settings"]["autoscale"] == ("profile elastic x CELERY_TUNING_CONCURRENCY_SCALE=2", (6, 2))


def test_a_profile_sets_celery_5_6_prefetch_controls_and_the_flag_wins():
    """worker_eta_task_limit (ETA messages a worker holds) and worker_disable_prefetch (issue #20)."""
    config = load_config({"tuning_queue_profiles": {"q": "lean"},
                          "tuning_profiles": {"lean": {"base": "io", "eta_task_limit": 50,
                                                       "disable_prefetch": True}}}, environ={})
    app = Celery("lean", set_as_current=False)
    applied = apply_profile(app, config, ["celery", "worker", "-Q", "q"])
    assert applied is not None and applied["profile"] == "lean"
    assert app.conf.worker_eta_task_limit == 50 and app.conf.worker_disable_prefetch is True
    flagged = Celery("lean2", set_as_current=False)
    apply_profile(flagged, config, ["celery", "worker", "-Q", "q", "--disable-prefetch"])
    assert flagged.conf.worker_eta_task_limit == 50
    # The explicit flag wins: Celery sets it itself (Celery < 5.6 has no such setting, hence .get).
    assert flagged.conf.get("worker_disable_prefetch", False) is False
    with pytest.raises(ConfigurationError, match="eta_task_limit"):
        load_config({"tuning_profiles": {"bad": {"eta_task_limit": 0}}}, environ={})
