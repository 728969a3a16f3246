"""Cache keys: canonical serialization of a call's bound arguments, hashed."""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = ["UncacheableArgument", "call_digest", "canonical_arguments"]


class UncacheableArgument(TypeError):
    """An argument has no canonical form; the call runs uncached."""

    def __init__(self, argument: str, value: Any) -> None:
        self.argument = argument
        super().__init__(f"argument {argument!r} ({type(value).__name__}) has no canonical JSON form")


def _canonical(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(name, v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UncacheableArgument(name, value)
        return {k: _canonical(name, v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": bytes(value).hex()}
    raise UncacheableArgument(name, value)


def canonical_arguments(
    signature: inspect.Signature, args: Tuple[Any, ...], kwargs: Dict[str, Any],
    vary_on: Optional[Sequence[str]] = None,
) -> str:
    """One JSON text for a call, the same for positional and keyword forms (defaults applied).

    Raises:
        UncacheableArgument: Naming the first argument without a canonical form.
        TypeError: When the arguments do not fit the signature.
    """
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    items = bound.arguments
    if vary_on is not None:
        items = {k: v for k, v in items.items() if k in vary_on}
    canonical = {name: _canonical(name, value) for name, value in items.items()}
    return json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def call_digest(text: str) -> str:
    """SHA-256 of the canonical text (hex)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def key_function_digest(key: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
    """Digest of a user key function's result."""
    return call_digest(f"k:{key(*args, **kwargs)}")
