"""The documentation: the MkDocs site builds with warnings as errors, and every code block runs.

Python blocks of a page run in order as one program, in a fresh process, against the tests'
private redis-server (``redis://localhost:6379`` in the text is pointed at it). Pages that use an
``app`` without creating one get the same small prelude a reader's project would have. Shell
commands run here when they can (``celery -A proj tuning check`` against the quickstart's own
code); the few that start the demo, the suite or an install are listed with what runs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.workers import ROOT

pytestmark = pytest.mark.integration

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LANGUAGES = {"python", "bash", "text", "json", "yaml"}

#: Shell commands shown in the docs that are run by something else than this module.
RUN_ELSEWHERE = {
    "./run demo": "tests/cli/test_demo.py runs `python -m examples.demo`, which is what it does",
    "./run tests": "CI: .ci/run runs exactly this command",
    "./run tests tests/reliability -s": "CI: the suite includes tests/reliability",
    'pip install "celery-tuning[prometheus]"': "test_prometheus_extra_exists checks the extra it names",
}

PRELUDE = '''
from celery import Celery
import celery_tuning
from celery_tuning import (TunedTask, Throttled, cache_result, circuit_breaker, concurrency_limit,
                           rate_limit, sla)

app = Celery("proj", broker="redis://localhost:6379/0", backend="redis://localhost:6379/0",
             task_cls="celery_tuning:TunedTask")


class InvalidCard(Exception):
    pass


def charge_card(amount=0):
    return amount


amount = 10
'''


def blocks(page: Path):
    return [(lang, code) for lang, code in FENCE.findall(page.read_text())]


def program(page: Path, redis_url: str) -> str:
    code = "\n".join(code for lang, code in blocks(page) if lang == "python")
    if "app = Celery(" not in code:
        code = PRELUDE + code
    return code.replace("redis://localhost:6379", redis_url)


def test_every_block_declares_its_language():
    for page in PAGES:
        for lang, code in blocks(page):
            assert lang in LANGUAGES, f"{page.relative_to(ROOT)}: a ``` block without a known language:\n{code}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(lang == "python" for lang, _ in blocks(p))],
                         ids=lambda p: p.name)
def test_python_blocks_run(page, redis_clean, tmp_path):
    (tmp_path / "proj.py").write_text(program(page, redis_clean.url))
    out = subprocess.run([sys.executable, "proj.py"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, f"{page.relative_to(ROOT)}:\n{out.stderr[-3000:]}"


def test_shell_commands_run_or_are_run_elsewhere(redis_clean, tmp_path):
    (tmp_path / "proj.py").write_text(program(ROOT / "docs" / "quickstart.md", redis_clean.url))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    for page in PAGES:
        for lang, code in blocks(page):
            if lang != "bash":
                continue
            for line in code.splitlines():
                command = line.split("  #")[0].strip()
                if not command or command in RUN_ELSEWHERE:
                    continue
                assert command.startswith("celery -A proj "), f"{page.name}: no test runs `{command}`"
                argv = [sys.executable, "-m", "celery", *command.split()[1:]]
                out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
                assert out.returncode == 0, f"{page.name}: `{command}` failed:\n{out.stdout}{out.stderr}"


def test_prometheus_extra_exists():
    assert "prometheus =" in (ROOT / "setup.cfg").read_text()


def test_site_builds_with_warnings_as_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").exists()
