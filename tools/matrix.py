#!/usr/bin/env python3
"""The support matrix: the rows CI runs besides ``./run tests`` (the latest versions on this Python).

    python3 tools/matrix.py [ROW ...]            run rows (default: all of them), then a summary
    python3 tools/matrix.py --list               the rows and what each runs
    python3 tools/matrix.py --check-bounds       setup.cfg's lower bounds == ci/constraints-lowest.txt
    python3 tools/matrix.py --versions VENV [--newest]
                                                 a venv's versions of the packages the matrix is about;
                                                 --newest fails when pip would pick a newer release
                                                 inside setup.cfg's ranges on that venv's Python

Each row has its own venv (``.venv-lowest``, ``.venv-py3.9``, ...; git-ignored), made again when
setup.cfg, pyproject.toml, the constraints file or the interpreter changed, with
``pip install -e ".[dev]"`` (the lowest row adds ``-c ci/constraints-lowest.txt``). It prints the
resolved versions, then runs pytest in it. A Python row whose interpreter is not on this machine
(``python3.X`` on PATH or under ``~/.pyenv/versions``) is skipped with the reason printed.

Exits non-zero when a row failed, after the others ran, with one line naming each failed row.
Standard library only: it runs with the machine's Python, before or beside any venv.
"""

from __future__ import annotations

import argparse
import configparser
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "ci" / "constraints-lowest.txt"
#: The packages whose versions the matrix is about (the runtime dependencies and the metrics extra).
WATCHED = ("celery", "kombu", "redis", "pybreaker", "cachetools", "click", "prometheus-client")
#: What a row on another Python runs: the pure and store suites, and one file of real prefork
#: workers with a producer (the bootstep, the publish hooks, the pipeline in a worker). The
#: stateful memory-vs-Redis machines (minutes, and nothing in them depends on the Python) are
#: left to the latest and lowest rows.
SUBSET = ("tests/unit", "tests/storage", "tests/integration/test_worker.py",
          "--ignore-glob=tests/storage/test_*_stateful.py")
#: A hung row must not eat CI's 90 minutes; pytest-timeout bounds single tests well below this.
ROW_TIMEOUT = {"lowest": 40 * 60, "python": 15 * 60}
VERSION_PROBE = (
    "import importlib.metadata as m, json, sys\n"
    "found = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        found[name] = m.version(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        found[name] = None\n"
    "print(json.dumps({'python': '%d.%d.%d' % sys.version_info[:3], 'versions': found}))\n"
)


@dataclass(frozen=True)
class Row:
    name: str
    #: "3.9" for a row on another Python; None: the Python running this script.
    python: Optional[str]
    constraints: Optional[Path]
    tests: Tuple[str, ...]
    describe: str

    @property
    def venv(self) -> Path:
        return ROOT / (".venv-lowest" if self.constraints else f".venv-py{self.python}")


ROWS = (
    Row("lowest", None, CONSTRAINTS, (), "this Python, the lowest declared versions (ci/constraints-lowest.txt), "
        "the whole suite"),
    *(Row(f"py{v}", v, None, SUBSET, f"Python {v}, the newest versions pip resolves there, " + " ".join(SUBSET))
      for v in ("3.9", "3.10", "3.12", "3.13")),
)


class RowFailed(Exception):
    pass


# -- declared bounds ------------------------------------------------------------------------------

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;#]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements(setup_cfg: str) -> Dict[str, str]:
    """``{name: specifier}`` of setup.cfg's install_requires and its ``prometheus`` extra."""
    cfg = configparser.ConfigParser()
    cfg.read_string(setup_cfg)
    lines = cfg.get("options", "install_requires").splitlines()
    lines += cfg.get("options.extras_require", "prometheus", fallback="").splitlines()
    found: Dict[str, str] = {}
    for line in lines:
        match = _REQUIREMENT.match(line)
        if match and not line.strip().startswith("#"):
            found[canonical(match.group(1))] = match.group(2).replace(" ", "")
    return found


def lower_bounds(setup_cfg: str) -> Dict[str, str]:
    """``{name: version}`` of every ``>=`` bound :func:`declared_requirements` holds."""
    bounds: Dict[str, str] = {}
    for name, spec in declared_requirements(setup_cfg).items():
        for clause in spec.split(","):
            if clause.startswith(">="):
                bounds[name] = clause[2:]
    return bounds


def pinned(constraints: str) -> Dict[str, str]:
    """``{name: version}`` of a constraints file's ``name==version`` lines."""
    pins: Dict[str, str] = {}
    for line in constraints.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise ValueError(f"constraints: {line!r} is not name==version")
            pins[canonical(name)] = version.strip()
    return pins


def same_version(a: Optional[str], b: Optional[str]) -> bool:
    """``5.3`` and ``5.3.0`` are one release (PEP 440 pads with zeros)."""
    def padded(v: str) -> Tuple[str, ...]:
        parts = v.split(".")
        while len(parts) > 1 and parts[-1] == "0":
            parts.pop()
        return tuple(parts)
    return a is not None and b is not None and padded(a) == padded(b)


def bound_mismatches(setup_cfg: str, constraints: str) -> List[str]:
    """Why the constraints file is not exactly setup.cfg's lower bounds (empty when it is)."""
    bounds, pins = lower_bounds(setup_cfg), pinned(constraints)
    problems = [f"{name}: setup.cfg says >={bounds[name]}, the constraints file pins {pins.get(name)}"
                for name in sorted(bounds) if not same_version(pins.get(name), bounds[name])]
    problems += [f"{name}: pinned to {pins[name]} but setup.cfg declares no lower bound for it"
                 for name in sorted(set(pins) - set(bounds))]
    unbounded = sorted(n for n in declared_requirements(setup_cfg) if n not in bounds)
    problems += [f"{name}: setup.cfg declares no lower bound (the lowest row cannot pin it)" for name in unbounded]
    return problems


def check_bounds() -> None:
    problems = bound_mismatches((ROOT / "setup.cfg").read_text(), CONSTRAINTS.read_text())
    if problems:
        raise RowFailed("the lowest row would not test setup.cfg's lower bounds:\n  " + "\n  ".join(problems))


# -- venvs ----------------------------------------------------------------------------------------

def clean_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def find_python(version: str) -> Optional[str]:
    """An interpreter for ``version`` ("3.9"): ``python3.9`` on PATH, else the newest under pyenv."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates = sorted(glob.glob(str(pyenv / "versions" / f"{version}.*" / "bin" / f"python{version}")),
                        key=lambda p: [int(x) for x in re.findall(r"\d+", Path(p).parents[1].name)], reverse=True)
    on_path = shutil.which(f"python{version}")
    for candidate in ([on_path] if on_path else []) + candidates:
        try:
            out = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30, env=clean_env())
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == version:  # a pyenv shim without it says no here
            return candidate
    return None


def stamp_for(python: str, row: Row) -> str:
    digest = hashlib.sha256()
    for path in (ROOT / "setup.cfg", ROOT / "pyproject.toml", *([row.constraints] if row.constraints else [])):
        digest.update(path.read_bytes())
    digest.update(subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True,
                                 text=True, check=True).stdout.encode())
    return digest.hexdigest()


def run(args: Sequence[object], *, timeout: float, quiet: bool = False) -> int:
    """Runs a command in its own process group (killed whole on timeout); its exit code.

    ``quiet``: its output is shown only when it fails (pip's notes about this machine's local
    indexes would bury the rows otherwise).
    """
    with tempfile.TemporaryFile("w+") as log:
        out = log if quiet else None
        proc = subprocess.Popen([str(a) for a in args], cwd=ROOT, env=clean_env(), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RowFailed(f"timed out after {timeout / 60:.0f} min: {' '.join(map(str, args))}") from None
        if quiet and code != 0:
            log.seek(0)
            print("".join(line for line in log.readlines()[-40:]), flush=True)
        return code


def ensure_venv(row: Row, python: str) -> Path:
    """The row's venv, (re)made when what it was installed from changed; its python."""
    venv_python = row.venv / "bin" / "python"
    stamp_file, want = row.venv / ".tuning-installed", stamp_for(python, row)
    if venv_python.exists() and stamp_file.exists() and stamp_file.read_text().strip() == want:
        return venv_python
    print(f"    setting up {row.venv.name} (pip install -e '.[dev]'"
          f"{' -c ' + str(row.constraints.relative_to(ROOT)) if row.constraints else ''})", flush=True)
    steps: List[List[object]] = [
        [python, "-m", "venv", "--clear", row.venv],
        [venv_python, "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [venv_python, "-m", "pip", "install", "-q", "-e", ".[dev]",
         *(["-c", row.constraints] if row.constraints else [])],
    ]
    for step in steps:
        if run(step, timeout=900, quiet=True) != 0:
            raise RowFailed(f"could not set up {row.venv.name}: {' '.join(map(str, step))}")
    stamp_file.write_text(want + "\n")
    return venv_python


# -- versions -------------------------------------------------------------------------------------

def installed_versions(venv_python: Path) -> Tuple[str, Dict[str, Optional[str]]]:
    out = subprocess.run([str(venv_python), "-c", VERSION_PROBE, *WATCHED], capture_output=True, text=True,
                         check=True, env=clean_env())
    data = json.loads(out.stdout)
    return data["python"], {canonical(k): v for k, v in data["versions"].items()}


def newest_allowed(venv_python: Path) -> Optional[Dict[str, str]]:
    """What pip picks for each watched package alone within setup.cfg's range on this Python.

    None when the index could not be asked (no network): the caller says so, it does not fail.
    """
    declared = declared_requirements((ROOT / "setup.cfg").read_text())
    wanted = [name + declared.get(name, "") for name in WATCHED]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run([str(venv_python), "-m", "pip", "install", "--dry-run", "--no-deps",
                               "--ignore-installed", "-q", "--report", str(report), *wanted],
                              capture_output=True, text=True, env=clean_env(), timeout=300)
        if proc.returncode != 0 or not report.exists():
            print(f"    (could not ask the index for the newest releases: {proc.stderr.strip()[-300:]})")
            return None
        found = json.loads(report.read_text())["install"]
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in found}


def print_versions(label: str, venv_python: Path, *, newest: bool = False,
                   expect: Optional[Dict[str, str]] = None) -> List[str]:
    """Prints the row's versions; returns the problems (versions other than the row promises)."""
    python, versions = installed_versions(venv_python)
    latest = newest_allowed(venv_python) if newest else None
    shown = ", ".join(f"{name} {versions[name] or '(not installed)'}" for name in map(canonical, WATCHED))
    print(f"    {label} versions: Python {python}, {shown}", flush=True)
    problems: List[str] = []
    for name in map(canonical, WATCHED):
        have = versions.get(name)
        if expect is not None and name in expect and have != expect[name]:
            problems.append(f"{name} {have} installed, the constraints file pins {expect[name]}")
        if latest is not None and name in latest and have != latest[name]:
            problems.append(f"{name} {have} installed, but setup.cfg admits {latest[name]} on Python {python} "
                            f"(another requirement holds it back: narrow setup.cfg's range or lift that cap)")
    return problems


# -- rows -----------------------------------------------------------------------------------------

def run_row(row: Row) -> str:
    """Runs one row; its outcome ("passed in 812s", "skipped: ...") or raises RowFailed."""
    started = time.monotonic()
    print(f"==> row {row.name}: {row.describe}", flush=True)
    if row.python is None:
        python = sys.executable
    else:
        found = find_python(row.python)
        if found is None:
            reason = f"no Python {row.python} on this machine (python{row.python} on PATH or ~/.pyenv/versions)"
            print(f"    SKIPPED: {reason}", flush=True)
            return f"skipped ({reason})"
        python = found
    if row.constraints:
        check_bounds()
    venv_python = ensure_venv(row, python)
    expect = pinned(row.constraints.read_text()) if row.constraints else None
    problems = print_versions(row.name, venv_python, expect=expect)
    if problems:
        raise RowFailed("; ".join(problems))
    code = run([venv_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *row.tests],
               timeout=ROW_TIMEOUT["lowest" if row.constraints else "python"])
    if code != 0:
        raise RowFailed(f"pytest exit code {code}" + (" (no tests ran)" if code == 5 else ""))
    return f"passed in {time.monotonic() - started:.0f}s"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", help="rows to run (default: all): " + ", ".join(r.name for r in ROWS))
    parser.add_argument("--list", action="store_true", help="print the rows and what each runs")
    parser.add_argument("--check-bounds", action="store_true", help="setup.cfg's lower bounds == the constraints")
    parser.add_argument("--versions", metavar="VENV", type=Path, help="print a venv's versions")
    parser.add_argument("--newest", action="store_true", help="with --versions: fail unless pip's newest in range")
    parser.add_argument("--label", default="latest", help="with --versions: the row's name in the output")
    args = parser.parse_args(argv)

    if args.list:
        for row in ROWS:
            print(f"{row.name:8} {row.describe}")
        return 0
    try:
        if args.check_bounds:
            check_bounds()
            print("setup.cfg's lower bounds are exactly ci/constraints-lowest.txt")
            return 0
        if args.versions:
            problems = print_versions(args.label, args.versions / "bin" / "python", newest=args.newest)
            if problems:
                raise RowFailed("; ".join(problems))
            return 0
    except RowFailed as exc:
        print(f"support matrix FAILED: row {args.label if args.versions else 'lowest'}: {exc}", flush=True)
        return 1

    by_name = {row.name: row for row in ROWS}
    unknown = [name for name in args.rows if name not in by_name]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(by_name)}")
    outcomes: List[Tuple[Row, str, bool]] = []
    for row in [by_name[name] for name in args.rows] or list(ROWS):
        try:
            outcomes.append((row, run_row(row), True))
        except RowFailed as exc:
            print(f"support matrix FAILED: row {row.name} ({row.describe}): {exc}", flush=True)
            outcomes.append((row, f"FAILED: {exc}", False))
    print("==> support matrix rows:", flush=True)
    for row, outcome, _ in outcomes:
        print(f"    {row.name:8} {outcome}", flush=True)
    failed = [row.name for row, _, ok in outcomes if not ok]
    if failed:
        print(f"support matrix FAILED: row(s) {', '.join(failed)} failed (see 'support matrix FAILED' above)",
              flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
