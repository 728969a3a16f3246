"""What the stores of held calls share (``@debounce`` runs, ``@fair`` messages): tickets and the Redis side's clock.

A held call is published under a *ticket*: ``"<pub>"`` (published that many times) or
``"<pub>:r"`` (it ran). A mover that dies after publishing leaves a claim that expires, and the call
is published again with ``pub + 1``; the worker drops whichever copy starts with a lower ``pub``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .redis import RedisConnector

__all__ = ["DEFAULT_TICKET_TTL_US", "TRIM_PER_CALL", "RedisHeldStore", "reply_text", "ticket_pub"]

#: Default µs a ticket is kept after its last change (``tuning_park_ticket_ttl``: one day).
DEFAULT_TICKET_TTL_US = 86_400 * 1_000_000
#: Tickets trimmed per call (bounded work).
TRIM_PER_CALL = 100


def ticket_pub(ticket: str) -> int:
    """The publication number of a ticket (``"3"`` or ``"3:r"``: 3)."""
    return int(ticket.split(":", 1)[0])


def reply_text(value: Any) -> str:
    """A script's reply item as text (redis-py answers bytes unless decoding)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RedisHeldStore:
    """The Redis side of a store of held calls: its connection, prefix, clock and ticket TTL.

    Arguments:
        connector: The tuning Redis.
        prefix: ``tuning_key_prefix``.
        clock: Now in µs sent to the scripts (tests); None, the default: the Redis server's TIME.
        ticket_ttl_us: How long a ticket is kept after its last change (``tuning_park_ticket_ttl``).
    """

    def __init__(self, connector: RedisConnector, prefix: str = "tuning",
                 clock: Optional[Callable[[], int]] = None, ticket_ttl_us: int = DEFAULT_TICKET_TTL_US) -> None:
        self.connector = connector
        self.prefix = prefix
        self.clock = clock
        self.ticket_ttl_us = int(ticket_ttl_us)

    def now_us(self) -> int:
        """Now by the store's clock (µs): the Redis server's, unless a test gave one."""
        if self.clock is not None:
            return int(self.clock())
        return int(self.connector.evalsha("park_now", [], []))
