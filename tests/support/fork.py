"""Run a check in a forked child (fork-safety tests)."""

import os
from typing import Callable


def true_in_child(check: Callable[[], bool]) -> bool:
    """Fork, run ``check`` in the child, and return what it answered (False if it raised)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = bool(check())
        except BaseException:
            ok = False
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    try:
        return os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
