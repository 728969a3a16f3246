"""Parsing and redaction of the Redis URLs celery-tuning accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["SUPPORTED_SCHEMES", "RedisTarget", "parse_redis_url", "redact_url"]

SUPPORTED_SCHEMES = "redis://, rediss://, unix://, sentinel://, redis+cluster://, rediss+cluster://"

_PASSWORD_RE = re.compile(r"(?P<scheme>[a-z+]+://)(?P<user>[^:@/;]*):(?P<password>[^@/;]*)@", re.I)


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, safe for logs and errors."""
    return _PASSWORD_RE.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", url)


@dataclass(frozen=True)
class RedisTarget:
    """What a tuning Redis URL points at."""

    #: 'standalone', 'sentinel' or 'cluster'.
    kind: str
    #: URL handed to redis-py (standalone and cluster).
    url: str = ""
    #: Sentinel addresses.
    sentinels: Tuple[Tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    password: Optional[str] = field(default=None, repr=False)
    sentinel_password: Optional[str] = field(default=None, repr=False)


def parse_redis_url(url: str) -> RedisTarget:
    """Classify a tuning Redis URL.

    Sentinel URLs follow kombu's form:
    ``sentinel://[:password@]host:26379[;sentinel://host2:26379]/0?master_name=mymaster``.

    Arguments:
        url: The URL.

    Returns:
        The parsed target.

    Raises:
        ValueError: When the scheme or form is not supported (message is password-free).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        parts = urlsplit(url)
        if scheme != "unix" and not parts.hostname:
            raise ValueError(f"{redact_url(url)!r} has no host")
        return RedisTarget(kind="standalone", url=url)
    if scheme in ("redis+cluster", "rediss+cluster"):
        plain = scheme.split("+", 1)[0] + url[len(scheme):]
        if not urlsplit(plain).hostname:
            raise ValueError(f"{redact_url(url)!r} has no host")
        return RedisTarget(kind="cluster", url=plain)
    if scheme == "sentinel":
        sentinels: List[Tuple[str, int]] = []
        password = None
        db = 0
        master_name = ""
        for chunk in url.split(";"):
            parts = urlsplit(chunk.strip())
            if parts.scheme.lower() != "sentinel" or not parts.hostname:
                raise ValueError(f"{redact_url(url)!r}: every part must be sentinel://host:port")
            sentinels.append((parts.hostname, parts.port or 26379))
            if parts.password:
                password = unquote(parts.password)
            if parts.path.strip("/"):
                try:
                    db = int(parts.path.strip("/"))
                except ValueError:
                    raise ValueError(f"{redact_url(url)!r}: database must be a number") from None
            query = parse_qs(parts.query)
            if query.get("master_name"):
                master_name = query["master_name"][0]
        if not master_name:
            raise ValueError(f"{redact_url(url)!r}: sentinel URLs need ?master_name=NAME")
        return RedisTarget(
            kind="sentinel", sentinels=tuple(sentinels), master_name=master_name,
            db=db, password=password,
        )
    raise ValueError(f"{redact_url(url)!r} is not a Redis URL")
