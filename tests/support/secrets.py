"""Hypothesis strategies for Redis URLs carrying a password, and a leak check (secrets tests)."""

from __future__ import annotations

from typing import Iterable, List, Tuple
from urllib.parse import quote

from hypothesis import strategies as st

#: Characters that mean something in a URL; a password may hold any of them.
RESERVED = "@:;/?#%&=+ !$'()*,[]~"


@st.composite
def passwords(draw: st.DrawFn) -> Tuple[str, List[str]]:
    """A password made of unique tokens joined by reserved characters, and its tokens.

    A leak of any part of the password shows up as one of its tokens in the output.
    """
    n = draw(st.integers(1, 4))
    tokens = [f"Pw{i}{draw(st.text('QXZqxz', min_size=3, max_size=3))}K" for i in range(n)]
    seps = [draw(st.text(RESERVED, min_size=1, max_size=2)) for _ in range(n - 1)]
    lead = draw(st.text(RESERVED, max_size=1))
    trail = draw(st.text(RESERVED, max_size=1))
    password = lead + "".join(t + s for t, s in zip(tokens, [*seps, ""])) + trail
    return password, tokens


def _encode(draw: st.DrawFn, password: str, *, safe_raw: str) -> str:
    """The password percent-encoded, or raw when every reserved character it has is in ``safe_raw``."""
    raw_ok = all(c not in RESERVED or c in safe_raw for c in password)
    if raw_ok and draw(st.booleans()):
        return password
    return quote(password, safe="")


@st.composite
def credential_urls(draw: st.DrawFn, host: str = "127.0.0.1", port: int = 6379) -> Tuple[str, List[str]]:
    """``(url, tokens)``: every form in which the URLs we accept can carry a password.

    Raw (unencoded) reserved characters appear where redis-py still parses them into the
    password, and also, now and then, where they break the URL (the redaction must still hold).
    """
    password, tokens = draw(passwords())
    user = draw(st.sampled_from(["", "user", "app-user"]))
    where = draw(st.sampled_from(["userinfo", "query", "both", "nouser", "broken"]))
    scheme = draw(st.sampled_from(["redis", "rediss", "unix", "sentinel", "redis+cluster", "rediss+cluster"]))
    if where == "broken":
        info = f"{user}:{password}@"  # whatever it holds, unencoded
    elif where in ("userinfo", "both"):
        info = f"{user}:{_encode(draw, password, safe_raw='@:;!$()*+,=~ ')}@"
    elif where == "nouser":
        info = f"{_encode(draw, password, safe_raw=';!$()*+,=~')}@"
    else:
        info = ""
    query = []
    if where in ("query", "both"):
        if user:
            query.append(f"username={user}")
        # redis-py percent-decodes query names too: ?p%61ssword= is a password
        name = draw(st.sampled_from(["password", "p%61ssword", "%70assword", "pass%77ord"]))
        query.append(f"{name}={_encode(draw, password, safe_raw='@:;/?!$()*+,=~ ')}")
    if scheme == "sentinel":
        query.append("master_name=mymaster")
    if scheme == "unix":
        base = f"unix://{info}/tmp/tuning-{port}.sock"
        query.append("db=1")
    elif scheme == "sentinel":
        base = f"sentinel://{info}{host}:{port};sentinel://{info}{host}:{port + 1}/0"
    else:
        base = f"{scheme}://{info}{host}:{port}/0"
    tail = "&".join(draw(st.permutations(query))) if query else ""
    return (f"{base}?{tail}" if tail else base), tokens


def leaked(tokens: Iterable[str], *texts: str) -> List[str]:
    """The tokens of a password found in ``texts`` (raw or percent-encoded)."""
    text = "".join(texts)
    return [t for t in tokens if t in text]
