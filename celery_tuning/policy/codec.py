"""Value encoding for the shared cache: JSON or msgpack behind a tag, never pickle.

Layout: ``ct2j:`` or ``ct2m:``, then the entry's expiry in epoch milliseconds and ``:``,
then the payload. The expiry lets a reader size its L1 entry so it never outlives the L2
one, from a plain ``GET`` (no ``PTTL`` round trip, no script on the hit path).
"""

from __future__ import annotations

import json
from typing import Any, Optional, Tuple

__all__ = ["CorruptValue", "decode", "encode"]

_JSON = b"ct2j:"
_MSGPACK = b"ct2m:"
_TAG_LEN = 5


class CorruptValue(ValueError):
    """Bytes from the store that are not a value we wrote (foreign, truncated, or tampered)."""


def encode(value: Any, serializer: str, expires_ms: int = 0) -> bytes:
    """Tagged bytes for ``value``; ``expires_ms`` is the L2 expiry (epoch ms, 0 unknown).

    Raises:
        TypeError: When ``value`` cannot be represented (the result is then not cached).
    """
    head = b"%d:" % expires_ms
    if serializer == "json":
        try:
            return _JSON + head + json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except ValueError as exc:
            raise TypeError(str(exc)) from None
    if serializer == "msgpack":
        import msgpack

        return _MSGPACK + head + msgpack.packb(value, use_bin_type=True, strict_types=False)
    raise ValueError(f"unknown serializer {serializer!r}")


def decode(raw: bytes) -> Tuple[Any, str, Optional[int]]:
    """The value, its serializer and its expiry (epoch ms or None). Pickle never runs.

    Raises:
        CorruptValue: For anything that is not a value we wrote.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise CorruptValue("not bytes")
    raw = bytes(raw)
    tag = raw[:_TAG_LEN]
    if tag not in (_JSON, _MSGPACK):
        raise CorruptValue(f"unknown value format {raw[:8]!r}")
    sep = raw.find(b":", _TAG_LEN)
    if sep < 0 or not raw[_TAG_LEN:sep].isdigit():
        raise CorruptValue("truncated value header")
    expires = int(raw[_TAG_LEN:sep]) or None
    body = raw[sep + 1:]
    try:
        if tag == _JSON:
            return json.loads(body), "json", expires  # json.loads takes UTF-8 bytes as they are
        import msgpack

        return msgpack.unpackb(body, raw=False, strict_map_key=False), "msgpack", expires
    except ImportError:
        raise CorruptValue("msgpack value but msgpack is not installed") from None
    except Exception as exc:
        raise CorruptValue(f"undecodable {tag!r} value: {type(exc).__name__}") from None
