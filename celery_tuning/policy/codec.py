"""Value encoding for the shared cache: JSON or msgpack behind a tag, never pickle."""

from __future__ import annotations

import json
from typing import Any, Tuple

__all__ = ["CorruptValue", "decode", "encode"]

_JSON = b"ct1j:"
_MSGPACK = b"ct1m:"


class CorruptValue(ValueError):
    """Bytes from the store that are not a value we wrote (foreign, truncated, or tampered)."""


def encode(value: Any, serializer: str) -> bytes:
    """Tagged bytes for ``value``.

    Raises:
        TypeError: When ``value`` cannot be represented (the result is then not cached).
    """
    if serializer == "json":
        try:
            return _JSON + json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except ValueError as exc:
            raise TypeError(str(exc)) from None
    if serializer == "msgpack":
        import msgpack

        return _MSGPACK + msgpack.packb(value, use_bin_type=True, strict_types=False)
    raise ValueError(f"unknown serializer {serializer!r}")


def decode(raw: bytes) -> Tuple[Any, str]:
    """The value and its serializer. Only our tags are accepted; pickle never runs.

    Raises:
        CorruptValue: For anything else.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise CorruptValue("not bytes")
    raw = bytes(raw)
    try:
        if raw.startswith(_JSON):
            return json.loads(raw[len(_JSON):].decode("utf-8")), "json"
        if raw.startswith(_MSGPACK):
            import msgpack

            return msgpack.unpackb(raw[len(_MSGPACK):], raw=False, strict_map_key=False), "msgpack"
    except ImportError:
        raise CorruptValue("msgpack value but msgpack is not installed") from None
    except Exception as exc:
        raise CorruptValue(f"undecodable {raw[:5]!r} value: {type(exc).__name__}") from None
    raise CorruptValue(f"unknown value format {raw[:8]!r}")
