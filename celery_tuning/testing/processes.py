"""Stopping worker subprocesses started in their own process group (``start_new_session=True``)."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Iterable

__all__ = ["stop_process_groups"]


def stop_process_groups(procs: Iterable[subprocess.Popen], timeout: float = 20.0) -> None:
    """Warm-stop each process group (SIGTERM to all first, so they shut down together), wait up to
    ``timeout`` seconds for each leader, SIGKILL a group that does not finish, then SIGKILL what
    is left in every group (pool children of a killed parent)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
