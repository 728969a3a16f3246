"""The layers, held for every module: each is imported alone, in a fresh interpreter, and what it
pulled in is checked against its layer's rule.

* ``policy/``: pure; nothing of Redis, Celery, kombu or prometheus-client, nor of storage/,
  integration/ or testing/.
* ``storage/``: Redis, never Celery or kombu, nor integration/.
* core modules (``celery_tuning.<name>``: components, settings, errors, events, the public
  ``signals`` façade): no Celery or kombu, nor integration/ (the façades load it lazily).
* ``testing/``: helpers for users' tests; no Celery, nor integration/.
* ``integration/``: the only layer that imports Celery.

No module imports prometheus-client when it is imported: multiprocess mode is decided by
prometheus-client's own import, which must come after the worker's settings are read.
"""

import json
import os
import pkgutil
import subprocess
import sys

import celery_tuning

EVERYWHERE_FORBIDDEN = {"prometheus_client"}
RULES = {
    # layer: (forbidden third-party top-level packages, forbidden celery_tuning layers)
    "policy": ({"redis", "celery", "kombu"}, {"storage", "integration", "testing"}),
    "storage": ({"celery", "kombu"}, {"integration", "testing"}),
    "core": ({"celery", "kombu"}, {"integration", "testing"}),
    "testing": ({"celery", "kombu"}, {"integration"}),
    "integration": (set(), set()),
}
LAYERS = {"policy", "storage", "integration", "testing"}

# Imports each module named in argv[1] (a JSON list) in a forked child of an interpreter that has
# imported nothing of the project, and prints {module: [every module it left in sys.modules]}.
PROBE = r"""
import json, os, sys
found = {}
for name in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(name)
            loaded = sorted(sys.modules)
        except BaseException as exc:
            loaded = ["!import failed: " + repr(exc)]
        with os.fdopen(write, "w") as out:
            out.write(json.dumps(loaded))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as got:
        found[name] = json.loads(got.read())
    os.waitpid(pid, 0)
print(json.dumps(found))
"""


def every_module():
    names = ["celery_tuning"]
    names += sorted(m.name for m in pkgutil.walk_packages(celery_tuning.__path__, "celery_tuning."))
    return names


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "core"


def imports_of_every_module():
    names = every_module()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(names)], capture_output=True, text=True,
                         check=True, timeout=120, env=env, cwd=os.path.dirname(os.path.dirname(celery_tuning.__file__)))
    return json.loads(out.stdout)


def violations(module: str, loaded):
    if loaded and loaded[0].startswith("!import failed"):
        return [loaded[0]]
    forbidden_packages, forbidden_layers = RULES[layer_of(module)]
    forbidden_packages = forbidden_packages | EVERYWHERE_FORBIDDEN
    bad = sorted({m.split(".")[0] for m in loaded} & forbidden_packages)
    bad += sorted({m for m in loaded if m.startswith("celery_tuning.") and layer_of(m) in forbidden_layers})
    return bad


def test_every_module_keeps_to_its_layer():
    found = imports_of_every_module()
    assert len(found) > 40  # the walk really reached every layer
    assert {layer_of(m) for m in found} == set(RULES)
    broken = {m: bad for m, loaded in found.items() if (bad := violations(m, loaded))}
    assert broken == {}


def test_the_rules_catch_a_violation():
    # The checker itself: a storage module that pulled in Celery and an integration module is caught.
    assert violations("celery_tuning.storage.x", ["celery", "celery.app", "celery_tuning.integration.task"]) == [
        "celery", "celery_tuning.integration.task"]
    assert violations("celery_tuning.policy.x", ["redis"]) == ["redis"]
    assert violations("celery_tuning.integration.x", ["celery", "redis"]) == []
    assert violations("celery_tuning.integration.metrics", ["prometheus_client"]) == ["prometheus_client"]


def test_the_public_signals_load_celery_only_when_used():
    code = (
        "import sys; from celery_tuning import signals, events;"
        "before = 'celery' in sys.modules;"
        "s = signals.task_timed; from celery_tuning.signals import sla_breached;"
        "from celery_tuning.integration import signals as impl;"
        "print(before, s is impl.task_timed, sla_breached is impl.sla_breached, 'celery' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True", "True"], out.stderr
