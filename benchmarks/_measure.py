"""Measuring helpers shared by the benchmark sections."""

from __future__ import annotations

from typing import Any, Callable

from redis.connection import Connection


def round_trips_per_call(fn: Callable[[], Any], n: int) -> float:
    """Commands the client sends per call of ``fn`` (one packed command = one round trip).

    The server's INFO commandstats would also count the commands a script runs inside Redis.
    """
    sent = [0]
    original = Connection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    Connection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        for _ in range(n):
            fn()
    finally:
        Connection.send_packed_command = original  # type: ignore[method-assign]
    return sent[0] / n
