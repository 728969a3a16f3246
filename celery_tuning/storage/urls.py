"""Parsing and redaction of the Redis URLs celery-tuning accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple
from urllib.parse import SplitResult, parse_qs, unquote, unquote_plus, urlsplit

__all__ = ["SUPPORTED_SCHEMES", "RedisTarget", "parse_redis_url", "redact_url"]

SUPPORTED_SCHEMES = "redis://, rediss://, unix://, sentinel://, redis+cluster://, rediss+cluster://"

# Where a URL starts inside a longer text (an exception message, a ';'-joined sentinel list).
_URL_START = re.compile(r"(?<![\w+.-])(?:rediss?\+cluster|rediss?|unix|sentinel)://", re.I)

# A query argument that carries a secret: redis-py hands unknown ones to the connection as
# keyword arguments (password=, ssl_password=...). The value runs to the next '&name=' or the
# end, so a raw '@', '#' or '?' in it stays hidden even where urlsplit would cut it short.
_QUERY_ARG = re.compile(
    r"(?P<key>(?<=[?&])[\w.%+-]*=)(?P<value>.*?)(?=&[\w.%+-]+=|$)",
    re.S,
)
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|credential", re.I)


def _redact_query(text: str) -> str:
    # redis-py percent-decodes query names (parse_qs), so ?p%61ssword= is a password too: the
    # name is judged decoded.
    def hide(m: re.Match[str]) -> str:
        return f"{m.group('key')}***" if _SECRET_NAME.search(unquote_plus(m.group("key"))) else m.group(0)

    return _QUERY_ARG.sub(hide, text)


def _redact_one(rest: str) -> str:
    """Redact what follows one ``scheme://``."""
    rest = _redact_query(rest)
    # The last '@' ends the userinfo: a password may hold raw '@', ';' or ':', and a raw '/', '?'
    # or '#' would end urlsplit's host part early and leave the tail of the password behind it.
    at = rest.rfind("@")
    if at < 0:
        return rest
    userinfo = rest[:at]
    # No ':' means one field only, which people often fill with the password: hide it whole.
    shown = f"{userinfo.split(':', 1)[0]}:***" if ":" in userinfo else "***"
    return f"{shown}{rest[at:]}"


def redact_url(url: str) -> str:
    """Return ``url`` with every password replaced by ``***``, safe for logs and errors.

    Also accepts any text that quotes URLs (an exception message): each ``redis://``,
    ``rediss://``, ``unix://``, ``sentinel://`` or ``redis+cluster://`` in it is redacted up
    to the next one. Hidden: the password of ``user:password@`` (reserved characters encoded
    or not), a userinfo without ``:`` whole, and query arguments such as ``password=``,
    ``sentinel_password=`` or ``ssl_password=``. Usernames stay visible.
    """
    starts = list(_URL_START.finditer(url))
    if not starts:
        return url
    out = [url[:starts[0].start()]]
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(url)
        rest = url[match.end():end]
        sep = ""
        if i + 1 < len(starts) and rest.endswith(";"):
            rest, sep = rest[:-1], ";"  # the separator of a sentinel list is not part of a password
        out.append(match.group(0) + _redact_one(rest) + sep)
    return "".join(out)


def _split(url: str, whole: str) -> SplitResult:
    """``urlsplit(url)``, refusing what redis-py would read differently from what was meant.

    ``whole`` is the URL the user gave (named, redacted, in errors).
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # a raw '[' or ']' (taken for an IPv6 host), and urlsplit quotes it
        raise ValueError(f"{redact_url(whole)!r}: percent-encode '[' and ']' in the user:password part "
                         "(%5B, %5D), or write an IPv6 host as [address]") from None
    if any(c in parts.netloc.rpartition("@")[0] for c in "[]"):  # urlsplit before 3.11.4 lets "a[b]c" through
        raise ValueError(f"{redact_url(whole)!r}: percent-encode '[' and ']' in the user:password part "
                         "(%5B, %5D), or write an IPv6 host as [address]")
    rest = url.split("://", 1)[1]
    if not rest.startswith(parts.netloc):  # urlsplit dropped tabs or line breaks
        raise ValueError(f"{redact_url(whole)!r}: a URL cannot hold tabs or line breaks")
    after_host = rest[len(parts.netloc):]
    if "@" in _redact_query(after_host):
        raise ValueError(
            f"{redact_url(whole)!r}: the user:password part holds a character that must be "
            "percent-encoded ('/' as %2F, '?' as %3F, '#' as %23, '@' after the host as %40)")
    try:
        _ = parts.port  # urlsplit checks the port only when asked, and quotes it in its error
    except ValueError:
        raise ValueError(f"{redact_url(whole)!r}: the port must be a number") from None
    return parts


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

    def __repr__(self) -> str:
        return (f"RedisTarget(kind={self.kind!r}, url={redact_url(self.url)!r}, sentinels={self.sentinels!r}, "
                f"master_name={self.master_name!r}, db={self.db!r})")


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
        parts = _split(url, url)
        if scheme != "unix" and not parts.hostname:
            raise ValueError(f"{redact_url(url)!r} has no host")
        return RedisTarget(kind="standalone", url=url)
    if scheme in ("redis+cluster", "rediss+cluster"):
        plain = scheme.split("+", 1)[0] + url[len(scheme):]
        if not _split(plain, url).hostname:
            raise ValueError(f"{redact_url(url)!r} has no host")
        return RedisTarget(kind="cluster", url=plain)
    if scheme == "sentinel":
        sentinels: List[Tuple[str, int]] = []
        password = None
        db = 0
        master_name = ""
        # Split only where the next sentinel starts: a password may hold a ';'.
        for chunk in re.split(r";(?=\s*sentinel://)", url, flags=re.I):
            parts = _split(chunk.strip(), url)
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
