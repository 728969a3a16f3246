"""Release packaging, the fast part: one version source, and every data file declared as package data.

Building the sdist and wheel and smoking the installed wheel is tools/release_check.py's job (CI
runs it before the suite); nothing here builds anything.
"""

from __future__ import annotations

import ast
import configparser
import fnmatch
import importlib.metadata
from pathlib import Path
from typing import Dict, List

import pytest

import celery_tuning
from tests.support.workers import ROOT

PACKAGE_DIR = ROOT / "celery_tuning"


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_the_version_has_one_source_read_without_importing_the_package():
    assert _setup_cfg().get("metadata", "version").strip() == "attr: celery_tuning.__version__"
    # setuptools reads a module-level string literal statically, without importing celery.
    tree = ast.parse((PACKAGE_DIR / "__init__.py").read_text())
    literals = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)]
    assert literals == [celery_tuning.__version__]
    from packaging.version import Version

    assert str(Version(celery_tuning.__version__)) == celery_tuning.__version__  # PEP 440, normalized


def test_the_installed_metadata_matches_celery_tuning_version():
    installed = importlib.metadata.version("celery-tuning")
    assert installed == celery_tuning.__version__, (
        f"the installed metadata says {installed}, celery_tuning.__version__ is {celery_tuning.__version__}: "
        "the venv's install is stale, reinstall with `.venv/bin/python -m pip install -e '.[dev]'`")


def _found_packages(cfg: configparser.ConfigParser) -> List[str]:
    setuptools = pytest.importorskip("setuptools")
    assert cfg.get("options", "packages").strip() == "find_namespace:"
    include = cfg.get("options.packages.find", "include").split()
    exclude = cfg.get("options.packages.find", "exclude", fallback="").split()
    return list(setuptools.find_namespace_packages(where=str(ROOT), include=include, exclude=exclude))


def test_lua_scripts_and_py_typed_are_package_data_of_packages_setuptools_finds():
    cfg = _setup_cfg()
    packages = _found_packages(cfg)
    data: Dict[str, List[str]] = {name: value.split() for name, value in cfg.items("options.package_data")
                                  if name not in cfg.defaults()}
    assert "celery_tuning.storage.lua" in packages, packages
    assert not [p for p in packages if p.endswith("__pycache__")], packages

    lua = sorted((PACKAGE_DIR / "storage" / "lua").glob("*.lua"))
    assert len(lua) >= 10, lua
    data_files = [p for p in PACKAGE_DIR.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert set(lua) | {PACKAGE_DIR / "py.typed"} <= set(data_files)

    def declared(path: Path) -> bool:
        # A file ships when some package above it lists a pattern matching its path from there.
        for parent in path.parents:
            if parent == ROOT:
                return False
            package = ".".join(parent.relative_to(ROOT).parts)
            relative = path.relative_to(parent).as_posix()
            if package in packages and any(fnmatch.fnmatch(relative, pattern) for pattern in data.get(package, [])):
                return True
        return False

    undeclared = [str(p.relative_to(ROOT)) for p in data_files if not declared(p)]
    assert not undeclared, f"files in the package that no [options.package_data] pattern ships: {undeclared}"
