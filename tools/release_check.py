#!/usr/bin/env python3
"""Release check: build the sdist and the wheel, check them, install the wheel in a clean venv, smoke it.

    python3 tools/release_check.py [--keep]

1. copies the project (tracked and untracked-but-not-ignored files) to a temporary directory, so a
   stale build/ or egg-info in the work tree cannot leak into the artefacts and nothing is written
   into the work tree;
2. builds the sdist, then the wheel from that sdist, with ``python -m build`` in a throwaway venv
   (falls back to calling setuptools' PEP 517 hooks when ``build`` cannot be installed) and fails
   on any warning in the build output;
3. checks the metadata (``twine check --strict`` when twine installs, and always its own parse of
   METADATA: name, version == ``celery_tuning.__version__``, Requires-Python, Requires-Dist from
   setup.cfg) and the contents (every module, every Lua script, py.typed, the ``celery tuning``
   entry point; nothing else) of both artefacts;
4. installs the wheel (not editable, with its dependencies) in a new venv without system site
   packages and, from a directory outside the project: imports celery_tuning and checks its
   version and location, loads every Lua script through the package's own loader,
   runs ``python -m celery tuning --help``, then starts a private redis-server and runs
   ``celery -A examples.demo.app tuning check`` and the demo itself (``python -m examples.demo``,
   real workers) against it.

Exits non-zero with "release check FAILED: ..." on the first failure; the temporary directory is
kept then (and with --keep) for inspection. Needs network access to a package index (PyPI or the
machine's mirror) and redis-server on PATH. Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import email.message
import email.parser
import itertools
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "celery_tuning"
DIST_NAME = "celery-tuning"
LUA_DIR = f"{PACKAGE}/storage/lua"
ENTRY_POINT = "tuning = celery_tuning.integration.cli:tuning"
# Files of examples/ the demo needs (it is not part of the package).
DEMO_FILES = ("examples/__init__.py", "examples/_runner.py", "examples/demo")
# Lines of a build log that look like warnings but say nothing about this project's packaging:
# pip's note that a configured local index has no page for some package (a machine setting).
BENIGN_WARNINGS = (re.compile(r"WARNING: Location '.*' is ignored: it is neither a file nor a directory"),)
WARNING_LINE = re.compile(r"warn|deprecat|^\s*!!\s*$", re.IGNORECASE)


class CheckFailed(Exception):
    pass


class Step:
    """Times one step and prints it as ``[ 12.3s] name: detail``."""

    started = time.monotonic()

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Step:
        self.t0 = time.monotonic()
        self.detail = ""
        print(f"==> {self.name}", flush=True)
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        took = time.monotonic() - self.t0
        mark = "ok" if exc_type is None else "FAILED"
        print(f"    {mark} in {took:.1f}s{': ' + self.detail if self.detail else ''}", flush=True)


def clean_env(**extra: str) -> Dict[str, str]:
    """The environment without anything that would let the repository or a venv leak in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def run(args: Sequence[str], *, cwd: Optional[Path] = None, env: Optional[Dict[str, str]] = None,
        timeout: float = 300, log: Optional[Path] = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env if env is not None else clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        raise CheckFailed(f"timed out after {timeout:.0f}s: {shown(args)}\n{tail(out)}") from None
    if log is not None:
        log.write_text(proc.stdout)
    if check and proc.returncode != 0:
        raise CheckFailed(f"exit code {proc.returncode}: {shown(args)}\n{tail(proc.stdout)}")
    return proc


def shown(args: Sequence[object]) -> str:
    """A command line for a message, with an inline ``-c`` program cut to its first line."""
    return " ".join(str(a).strip().splitlines()[0] + (" ..." if "\n" in str(a).strip() else "")
                    if str(a).strip() else repr(a) for a in args)


def tail(text: str, lines: int = 40) -> str:
    return textwrap.indent("\n".join(text.rstrip().splitlines()[-lines:]), "    | ")


def make_venv(path: Path) -> Path:
    # No --system-site-packages: the venv sees only what is installed into it.
    run([sys.executable, "-m", "venv", path], timeout=120)
    return path / "bin" / "python"


def source_version(src: Path) -> str:
    tree = ast.parse((src / PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__version__"
                                                for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, str):
                return value
    raise CheckFailed(f"{PACKAGE}/__init__.py has no literal __version__ = '...'")


def copy_project(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files (what a commit of the work tree would hold)."""
    names: List[str] = []
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, stdout=subprocess.PIPE, check=True).stdout.decode()
        names = [n for n in out.split("\0") if n]
    if not names:  # not a git checkout: everything but the usual droppings
        skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                ".hypothesis"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not (set(p.relative_to(ROOT).parts) & skip)
                 and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]
    for name in names:
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is listed but absent
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def check_build_log(text: str, what: str, log: Path) -> None:
    bad = [line for line in text.splitlines()
           if WARNING_LINE.search(line) and not any(p.search(line) for p in BENIGN_WARNINGS)]
    if bad:
        raise CheckFailed(f"{what} printed warnings (full log: {log}):\n"
                          + textwrap.indent("\n".join(bad[:30]), "    | "))


# --------------------------------------------------------------------------- build


def build_artefacts(tmp: Path, src: Path, dist: Path, notes: List[str], fallback: bool) -> Optional[Path]:
    """Build sdist + wheel into ``dist``; returns the tools venv's python if twine is in it."""
    tools_py = make_venv(tmp / "tools-venv")
    env = clean_env()
    has_build = not fallback and run([tools_py, "-m", "pip", "install", "-q", "build"], env=env, check=False,
                                     log=tmp / "pip-build.log").returncode == 0
    has_twine = not fallback and run([tools_py, "-m", "pip", "install", "-q", "twine"], env=env, check=False,
                                     log=tmp / "pip-twine.log").returncode == 0
    log = tmp / "build.log"
    if has_build:
        # Default mode: the sdist first, then the wheel built from the unpacked sdist (so a file
        # missing from the sdist fails here too).
        proc = run([tools_py, "-m", "build", "--outdir", dist, src], env=env, log=log, timeout=600)
        text = proc.stdout
    else:
        notes.append(f"the 'build' package {'not used' if fallback else 'could not be installed'}: "
                     "built through setuptools' PEP 517 hooks")
        run([tools_py, "-m", "pip", "install", "-q", "setuptools>=70.1"], env=env, log=tmp / "pip-setuptools.log")
        hooks = textwrap.dedent("""
            import sys, tarfile, tempfile, os
            from setuptools import build_meta
            dist = sys.argv[1]
            sdist = os.path.join(dist, build_meta.build_sdist(dist))
            unpacked = tempfile.mkdtemp()
            with tarfile.open(sdist) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(unpacked, filter="data")
                else:
                    tar.extractall(unpacked)
            os.chdir(os.path.join(unpacked, os.listdir(unpacked)[0]))
            build_meta.build_wheel(dist)
        """)
        proc = run([tools_py, "-c", hooks, dist], cwd=src, env=env, log=log, timeout=600)
        text = proc.stdout
    check_build_log(text, "the build", log)
    if not has_twine:
        notes.append(f"twine {'not used' if fallback else 'could not be installed'}: "
                     "metadata checked by this script's own parse only")
    return tools_py if has_twine else None


def read_metadata(raw: str) -> email.message.Message:
    return email.parser.Parser().parsestr(raw)


def required_names(src: Path) -> List[str]:
    cfg = configparser.ConfigParser()
    cfg.read(src / "setup.cfg")
    lines = cfg.get("options", "install_requires", fallback="").splitlines()
    return [re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower() for line in lines if line.strip()]


def check_metadata(meta: email.message.Message, version: str, src: Path, where: str) -> None:
    problems = []
    if (meta.get("Name") or "").lower().replace("_", "-") != DIST_NAME:
        problems.append(f"Name is {meta.get('Name')!r}, expected {DIST_NAME!r}")
    if meta.get("Version") != version:
        problems.append(f"Version is {meta.get('Version')!r}, celery_tuning.__version__ is {version!r}")
    for field in ("Metadata-Version", "Summary", "Requires-Python"):
        if not meta.get(field):
            problems.append(f"{field} is missing")
    if meta.get("Description-Content-Type", "").split(";")[0] != "text/markdown":
        problems.append(f"Description-Content-Type is {meta.get('Description-Content-Type')!r}")
    if len(meta.get_payload() or meta.get("Description") or "") < 200:
        problems.append("the long description (README.md) is missing or short")
    requires = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    have = {re.split(r"[<>=!~;\[ (]", r.strip(), maxsplit=1)[0].lower() for r in requires}
    missing = [n for n in required_names(src) if n not in have]
    if missing or not have:
        problems.append(f"Requires-Dist lacks {missing or 'everything'} (setup.cfg install_requires)")
    if problems:
        raise CheckFailed(f"{where} metadata: " + "; ".join(problems))


def expected_package_files(src: Path) -> Dict[str, List[str]]:
    pkg = src / PACKAGE
    modules = sorted(str(p.relative_to(src)) for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)
    lua = sorted(str(p.relative_to(src)) for p in (src / LUA_DIR).glob("*.lua"))
    typed = [f"{PACKAGE}/py.typed"] if (pkg / "py.typed").exists() else []
    if not lua:
        raise CheckFailed(f"no Lua scripts found in {LUA_DIR} of the source")
    return {"modules": modules, "lua": lua, "typed": typed}


def check_wheel(wheel: Path, version: str, src: Path) -> Dict[str, int]:
    expected = expected_package_files(src)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"{PACKAGE}-{version}.dist-info"
        for required in ("METADATA", "WHEEL", "RECORD", "entry_points.txt"):
            if f"{info}/{required}" not in names:
                raise CheckFailed(f"wheel: {info}/{required} is missing")
        check_metadata(read_metadata(zf.read(f"{info}/METADATA").decode()), version, src, "wheel")
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        wheel_tag = zf.read(f"{info}/WHEEL").decode()
    if not re.search(r"\[celery\.commands\][^\[]*" + re.escape(ENTRY_POINT), entry_points):
        raise CheckFailed(f"wheel: entry point '{ENTRY_POINT}' under [celery.commands] is missing:\n{entry_points}")
    if "Tag: py3-none-any" not in wheel_tag:
        raise CheckFailed(f"wheel: expected a pure py3-none-any wheel:\n{wheel_tag}")
    for kind, files in expected.items():
        missing = [f for f in files if f not in names]
        if missing:
            raise CheckFailed(f"wheel: {len(missing)} {kind} file(s) missing: {', '.join(missing[:10])}")
    wanted = set(itertools.chain.from_iterable(expected.values()))
    extra = sorted(n for n in names if not n.startswith(f"{info}/") and n not in wanted)
    if extra:
        raise CheckFailed(f"wheel: unexpected files: {', '.join(extra[:15])}")
    return {k: len(v) for k, v in expected.items()}


def check_sdist(sdist: Path, version: str, src: Path) -> int:
    expected = expected_package_files(src)
    top = f"{PACKAGE}-{version}"
    with tarfile.open(sdist) as tar:
        names = {m.name for m in tar.getmembers()}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO")
        if pkg_info is None:
            raise CheckFailed(f"sdist: {top}/PKG-INFO is missing")
        check_metadata(read_metadata(pkg_info.read().decode()), version, src, "sdist")
    wanted = [f"{top}/{f}" for f in ("README.md", "CHANGELOG.md", "setup.cfg", "pyproject.toml",
                                     *itertools.chain.from_iterable(expected.values()))]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise CheckFailed(f"sdist: missing {', '.join(missing[:10])}")
    junk = [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    if junk:
        raise CheckFailed(f"sdist: compiled files included: {', '.join(junk[:10])}")
    return len(names)


# --------------------------------------------------------------------------- smoke

SMOKE_IMPORT = """
import importlib.metadata, importlib.resources, json, sys, sysconfig
from pathlib import Path

expected_version, lua_count = sys.argv[1], int(sys.argv[2])
import celery_tuning

site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(celery_tuning.__file__).resolve()
assert site in where.parents, f"celery_tuning imported from {where}, not from the venv's {site}"
assert celery_tuning.__version__ == expected_version, (celery_tuning.__version__, expected_version)
dist = importlib.metadata.distribution("celery-tuning")
assert dist.version == expected_version, ("metadata", dist.version, expected_version)
direct = dist.read_text("direct_url.json")
assert not (direct and json.loads(direct).get("dir_info", {}).get("editable")), "installed as editable"
for name in celery_tuning.__all__:          # every public name resolves (lazy exports)
    getattr(celery_tuning, name)

from celery_tuning.storage.redis import load_lua
folder = importlib.resources.files("celery_tuning.storage") / "lua"
names = sorted(e.name[:-4] for e in folder.iterdir() if e.name.endswith(".lua"))
assert len(names) == lua_count, f"{len(names)} Lua scripts installed, {lua_count} in the source"
for name in names:
    source = load_lua(name)
    unresolved = [line for line in source.splitlines() if line.startswith("--@include ")]
    assert source.strip() and not unresolved, f"Lua script {name} did not load: {unresolved}"
print(f"celery_tuning {celery_tuning.__version__} from {where.parent}; {len(names)} Lua scripts loaded; "
      f"{len(celery_tuning.__all__)} public names")
"""

SMOKE_DEMO = """
import os, subprocess, sys
from celery_tuning.testing import RedisServer

server = RedisServer().start()
try:
    env = {**os.environ, "REDIS_URL": server.url, "DEMO_REDIS_URL": server.db_url(15)}
    check = subprocess.run([sys.executable, "-m", "celery", "-A", "examples.demo.app", "tuning", "check"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    print(check.stdout, end="", flush=True)
    if check.returncode != 0 or "lua: scripts load" not in check.stdout:
        sys.exit(f"celery tuning check failed (exit {check.returncode})")
    demo = subprocess.run([sys.executable, "-m", "examples.demo"], env=env, timeout=float(sys.argv[1]))
    sys.exit(demo.returncode)
finally:
    server.close()
"""


def smoke(tmp: Path, wheel: Path, version: str, lua_count: int, demo_timeout: float) -> None:
    with Step("clean venv: install the wheel (not editable) with its dependencies") as step:
        py = make_venv(tmp / "smoke-venv")
        run([py, "-m", "pip", "install", "-q", wheel], log=tmp / "pip-smoke.log", timeout=600)
        freeze = run([py, "-m", "pip", "freeze"]).stdout
        line = next((x for x in freeze.splitlines() if x.lower().startswith(("celery-tuning", "celery_tuning"))), "")
        if not line or "-e " in line or "file://" + str(ROOT) in line:
            raise CheckFailed(f"celery-tuning is not installed from the wheel: {line!r}")
        step.detail = f"{len(freeze.splitlines())} packages"

    # Run from a directory outside the project, with the venv's bin first on PATH.
    work = tmp / "smoke-run"
    work.mkdir()
    for name in DEMO_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    env = clean_env(PATH=f"{py.parent}{os.pathsep}{os.environ.get('PATH', '')}")

    with Step("smoke: import, version, Lua scripts through the package's loader") as step:
        out = run([py, "-c", SMOKE_IMPORT, version, str(lua_count)], cwd=work, env=env, timeout=120).stdout
        step.detail = out.strip().splitlines()[-1]

    with Step("smoke: python -m celery tuning --help") as step:
        out = run([py, "-m", "celery", "tuning", "--help"], cwd=work, env=env, timeout=60).stdout
        if "Inspect and control celery-tuning" not in out or "check" not in out:
            raise CheckFailed(f"unexpected `celery tuning --help` output:\n{tail(out)}")
        commands = re.findall(r"^\s{2}([a-z-]+)\s", out.split("Commands:", 1)[-1], re.M)
        step.detail = f"commands: {', '.join(commands)}"

    with Step("smoke: `celery tuning check` and the demo's tasks on real workers, private redis-server") as step:
        if not shutil.which("redis-server"):
            raise CheckFailed("redis-server is not on PATH (apt-get install redis-server)")
        out = run([py, "-c", SMOKE_DEMO, str(demo_timeout)], cwd=work, env=env, timeout=demo_timeout + 60,
                  log=tmp / "demo.log").stdout
        if "demo finished" not in out:
            raise CheckFailed(f"the demo did not finish:\n{tail(out)}")
        step.detail = "demo finished (log: demo.log)"
        print(textwrap.indent(out.rstrip(), "    | ", lambda line: True))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--demo-timeout", type=float, default=180.0, help="seconds the demo may take")
    parser.add_argument("--fallback", action="store_true",
                        help="do without the build and twine packages (tests the path taken when they do not install)")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="tuning-release-"))
    notes: List[str] = []
    ok = False
    print(f"release check of {ROOT} in {tmp} (python {sys.version.split()[0]})", flush=True)
    try:
        src, dist = tmp / "src", tmp / "dist"
        with Step("copy the project (tracked + untracked, not ignored)") as step:
            copy_project(src)
            version = source_version(src)
            step.detail = f"version {version}"

        with Step("build sdist + wheel (wheel from the sdist); no warnings allowed") as step:
            twine_py = build_artefacts(tmp, src, dist, notes, args.fallback)
            wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
            if [w.name for w in wheels] != [f"{PACKAGE}-{version}-py3-none-any.whl"] or \
                    [s.name for s in sdists] != [f"{PACKAGE}-{version}.tar.gz"]:
                raise CheckFailed(f"unexpected artefacts: {sorted(p.name for p in dist.iterdir())}")
            wheel, sdist = wheels[0], sdists[0]
            step.detail = f"{wheel.name} ({wheel.stat().st_size // 1024} KiB), {sdist.name} " \
                          f"({sdist.stat().st_size // 1024} KiB)"

        with Step("metadata and contents") as step:
            counts = check_wheel(wheel, version, src)
            sdist_files = check_sdist(sdist, version, src)
            if twine_py is not None:
                out = run([twine_py, "-m", "twine", "check", "--strict", wheel, sdist]).stdout
                if out.count("PASSED") != 2:
                    raise CheckFailed(f"twine check:\n{tail(out)}")
            step.detail = (f"wheel: {counts['modules']} modules, {counts['lua']} Lua scripts, "
                           f"py.typed {'yes' if counts['typed'] else 'absent'}; sdist: {sdist_files} entries; "
                           f"twine check --strict {'PASSED' if twine_py else 'not available'}")

        smoke(tmp, wheel, version, counts["lua"], args.demo_timeout)
        ok = True
    except CheckFailed as exc:
        print(f"\nrelease check FAILED: {exc}", file=sys.stderr)
    finally:
        total = time.monotonic() - Step.started
        for note in notes:
            print(f"note: {note}")
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} (build.log, pip-*.log, demo.log, dist/)")
    if not ok:
        return 1
    print(f"release check passed in {total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
