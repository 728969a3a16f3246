"""``@fair``: the policy record (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

__all__ = ["FairPolicy", "weight_of"]


@dataclass(frozen=True)
class FairPolicy:
    """A task's fair queueing: calls wait per key and are released round-robin across keys."""

    #: Called with the task's arguments; its value (``str()`` of it, hashed) is the call's key.
    key: Callable[..., Any]
    #: Messages a key gives per turn: ``{key: weight}`` (by ``str(key)``, others 1) or a callable.
    weights: Union[Mapping[str, int], Callable[[Any], int], None] = None


def weight_of(policy: FairPolicy, key: Any) -> int:
    """How many messages ``key`` gives per turn (at least 1).

    Raises:
        ValueError: When a ``weights`` callable answers something that is not an integer >= 1.
    """
    weights = policy.weights
    if weights is None:
        return 1
    if callable(weights):
        value = weights(key)
    else:
        value = weights.get(str(key), 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"@fair(weights=...): the weight of a key must be an integer >= 1, got {value!r}")
    return value
