"""Reserved rate-limit slots carried in message headers.

A deferred call that the limiter admitted ahead of time (a slot ``wait`` seconds from now) is
re-published with the slot in a header. When the message comes back, the call runs in its slot
without asking the limiter again. A slot is good once, for the same task id, limiter and key.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from ..ratelimit import hash_key

__all__ = ["HEADER_SLOT", "slot_headers", "take_slot"]

#: A slot this task id already holds: {"limiter", "key", "at" (epoch s), "id"}.
HEADER_SLOT = "tuning_rl_slot"


def _slot_id(key: Any) -> Optional[str]:
    """The slot's key as it travels (a digest: raw keys stay out of headers)."""
    return None if key is None else hash_key(key)


def slot_headers(limiter: str, key: Any, wait: float, task_id: Any) -> Dict[str, Any]:
    """Headers for a re-published call holding the slot ``wait`` seconds from now."""
    return {HEADER_SLOT: {"limiter": limiter, "key": _slot_id(key), "at": time.time() + wait, "id": task_id}}


def holds_slot(request: Any) -> bool:
    """Whether the message carries a slot (not yet checked or used)."""
    headers = getattr(request, "headers", None) or {}
    return isinstance(headers.get(HEADER_SLOT), dict)


def take_slot(request: Any, limiter: str, key: Any) -> Optional[float]:
    """Use the slot this message carries: seconds until it (negative: how late the message is for
    it), or None when it holds no valid slot for this task id, limiter and key.

    The header is consumed either way: a later retry of the task queues for a new slot.
    """
    headers = getattr(request, "headers", None) or {}
    slot = headers.get(HEADER_SLOT)
    if not isinstance(slot, dict):
        return None
    headers.pop(HEADER_SLOT, None)
    if slot.get("id") != request.id or slot.get("limiter") != limiter or slot.get("key") != _slot_id(key):
        return None
    try:
        return float(slot["at"]) - time.time()
    except (KeyError, TypeError, ValueError):
        return None
