from urllib.parse import quote

import pytest
from hypothesis import given, settings

from celery_tuning.storage.urls import parse_redis_url, redact_url
from tests.support.secrets import credential_urls, leaked


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:s3cret@host:6380/1", "rediss://user:***@host:6380/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("sentinel://:pw@a:26379;sentinel://:pw@b:26379/0?master_name=m",
         "sentinel://:***@a:26379;sentinel://:***@b:26379/0?master_name=m"),
    ],
)
def test_redact(url, expected):
    assert redact_url(url) == expected
    assert "s3cret" not in redact_url(url)


def test_kinds():
    assert parse_redis_url("redis://h:1/2").kind == "standalone"
    assert parse_redis_url("unix:///tmp/redis.sock?db=1").kind == "standalone"
    cluster = parse_redis_url("redis+cluster://h:7000")
    assert (cluster.kind, cluster.url) == ("cluster", "redis://h:7000")
    s = parse_redis_url("sentinel://:pw@a:26379;sentinel://b/3?master_name=mymaster")
    assert s.kind == "sentinel"
    assert s.sentinels == (("a", 26379), ("b", 26379))
    assert (s.master_name, s.db, s.password) == ("mymaster", 3, "pw")
    assert "pw" not in repr(s)


@pytest.mark.parametrize("url", ["http://h", "redis://", "sentinel://a:1/0", "sentinel://a:1/x?master_name=m",
                                 "redis://:topsecret@"])
def test_rejects_without_leaking_password(url):
    with pytest.raises(ValueError) as info:
        parse_redis_url(url)
    assert "topsecret" not in str(info.value)


# -- every way redis-py (and our sentinel/cluster forms) take a password, fuzzed ----------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://host:6379/0?password=s3cret", "redis://host:6379/0?password=***"),
        ("redis://host/0?username=u&password=s3cret&db=2", "redis://host/0?username=u&password=***&db=2"),
        ("redis://host/0?p%61ssword=s3cret&db=2", "redis://host/0?p%61ssword=***&db=2"),
        ("redis://:p@ss@s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:pa;s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://u:a%40s3cret%3Bx@host:6380", "rediss://u:***@host:6380"),
        ("unix:///tmp/redis.sock?db=1&password=s3cret", "unix:///tmp/redis.sock?db=1&password=***"),
        ("unix://:s3cret@/tmp/redis.sock", "unix://:***@/tmp/redis.sock"),
        ("redis+cluster://:s3cret@h:7000?password=s3cret", "redis+cluster://:***@h:7000?password=***"),
        ("redis://s3cret@host", "redis://***@host"),
        # a '/', '?' or '#' left unencoded cuts the password short for urlsplit: still hidden
        ("redis://:ab/s3cret@host/0", "redis://:***@host/0"),
        ("redis://:ab?s3cret@host/0", "redis://:***@host/0"),
        ("redis://:ab#s3cret@host/0", "redis://:***@host/0"),
        ("sentinel://:s3cret@a:26379;sentinel://b:26379/0?master_name=m&sentinel_password=s3cret",
         "sentinel://:***@a:26379;sentinel://b:26379/0?master_name=m&sentinel_password=***"),
    ],
)
def test_redact_every_credential_form(url, expected):
    assert redact_url(url) == expected
    assert "s3cret" not in redact_url(url)


@settings(max_examples=400, deadline=None)
@given(credential_urls(host="h.example", port=6379))
def test_redaction_and_parse_errors_never_show_a_password(case):
    url, tokens = case
    assert not leaked(tokens, redact_url(url)), redact_url(url)
    try:
        target = parse_redis_url(url)
    except ValueError as exc:
        assert not leaked(tokens, str(exc)), str(exc)
    else:
        assert not leaked(tokens, repr(target)), repr(target)


@pytest.mark.parametrize("password", ["a/b", "a?b", "a#b", "a/b@c", "p:w/x", "a[b", "a]b", "a[b]c"])
def test_unencoded_slash_question_or_hash_in_the_password_is_rejected(password):
    """urlsplit ends the host part at '/', '?' or '#' (and reads '[' ']' as an IPv6 host): redis-py
    would connect somewhere else, or Python's parser would quote the password in its error."""
    with pytest.raises(ValueError, match="percent-encode") as info:
        parse_redis_url(f"redis://user:{password}@h.example:6379/0")
    assert password not in str(info.value)
    parse_redis_url(f"redis://user:{quote(password, safe='')}@h.example:6379/0")  # encoded: fine


def test_cluster_target_repr_hides_the_password():
    target = parse_redis_url("redis+cluster://:s3cret@h:7000")
    assert "s3cret" not in repr(target)
