"""The support matrix's promise: setup.cfg's lower bounds are exactly what the lowest row pins.

Running the rows is CI's job (tools/matrix.py from .ci/run); nothing here makes a venv.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests.support.workers import ROOT


@pytest.fixture(scope="module")
def matrix() -> ModuleType:
    spec = importlib.util.spec_from_file_location("matrix", ROOT / "tools" / "matrix.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["matrix"] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["matrix"]
    return module


def test_setup_cfg_lower_bounds_are_exactly_the_lowest_rows_pins(matrix):
    setup_cfg = (ROOT / "setup.cfg").read_text()
    assert matrix.bound_mismatches(setup_cfg, (ROOT / "ci" / "constraints-lowest.txt").read_text()) == []
    bounds = matrix.lower_bounds(setup_cfg)
    assert {"celery", "kombu", "redis", "pybreaker", "cachetools", "click", "prometheus-client"} <= set(bounds)


def test_a_moved_bound_or_a_missing_pin_is_named(matrix):
    setup_cfg = (ROOT / "setup.cfg").read_text()
    constraints = (ROOT / "ci" / "constraints-lowest.txt").read_text()
    celery = matrix.lower_bounds(setup_cfg)["celery"]
    moved = setup_cfg.replace(f"celery>={celery},", "celery>=5.0,", 1)
    assert moved != setup_cfg
    assert [p for p in matrix.bound_mismatches(moved, constraints) if p.startswith("celery:")] == [
        f"celery: setup.cfg says >=5.0, the constraints file pins {matrix.pinned(constraints)['celery']}"]
    unpinned = "\n".join(line for line in constraints.splitlines() if not line.startswith("redis=="))
    assert any(p.startswith("redis:") for p in matrix.bound_mismatches(setup_cfg, unpinned))
    # 5.3 and 5.3.0 are one release.
    assert matrix.same_version("5.3", "5.3.0") and not matrix.same_version("5.3", "5.3.1")


def test_every_row_names_what_it_runs(matrix):
    names = [row.name for row in matrix.ROWS]
    assert names[0] == "lowest" and len(names) == len(set(names))
    lowest = matrix.ROWS[0]
    assert lowest.constraints == ROOT / "ci" / "constraints-lowest.txt" and lowest.tests == ()  # the whole suite
    for row in matrix.ROWS[1:]:
        assert row.python and row.tests and all((ROOT / t).exists() for t in row.tests if not t.startswith("-")), row
