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


# -- any scheme with a userinfo: a broker's URL quoted in our errors and warnings -----------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:s3cret@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
        ("amqps://user:s3cret@mq.example:5671/vhost", "amqps://user:***@mq.example:5671/vhost"),
        ("pyamqp://guest:s3cret@localhost//", "pyamqp://guest:***@localhost//"),
        ("sqs://AKIAEXAMPLE:s3cret@", "sqs://AKIAEXAMPLE:***@"),
        ("sqs://AKIAEXAMPLE:s3cret@localhost", "sqs://AKIAEXAMPLE:***@localhost"),
        ("amqp://s3cret@host//", "amqp://***@host//"),
        ("amqp://a:s3cret@h1;amqp://b:s3cret@h2//", "amqp://a:***@h1;amqp://b:***@h2//"),
        ("kafka://u:s3cret@h?x=1&token=s3cret", "kafka://u:***@h?x=1&token=***"),
        # a password that holds "x://" is not taken for a second URL
        ("amqp://u:ab://s3cret@host//", "amqp://u:***@host//"),
        ("redis://:ab://s3cret@host/0", "redis://:***@host/0"),
        ("the broker (amqp://guest:s3cret@127.0.0.1:5672//) is not Redis",
         "the broker (amqp://guest:***@127.0.0.1:5672//) is not Redis"),
        ("url='amqp://guest:s3cret@h//', then redis://:s3cret@h/0",
         "url='amqp://guest:***@h//', then redis://:***@h/0"),
        ("amqp://host:5672//", "amqp://host:5672//"),
        ("http://docs.example/settings#tuning_redis_url", "http://docs.example/settings#tuning_redis_url"),
        ("no URL in here", "no URL in here"),
        ("", ""),
    ],
)
def test_redact_any_scheme(url, expected):
    assert redact_url(url) == expected
    assert "s3cret" not in redact_url(url)


@pytest.mark.parametrize("value", [None, 42, b"amqp://u:s3cret@h//", ValueError("amqp://u:s3cret@h//")])
def test_redact_is_total(value):
    """Whatever it is handed (an exception, bytes, None), it answers text and hides the password."""
    shown = redact_url(value)
    assert isinstance(shown, str) and "s3cret" not in shown

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert redact_url(Unprintable()) == "<unprintable>"


def test_a_non_redis_broker_error_hides_its_password():
    """tuning_redis_url unset and the broker is RabbitMQ: the error names the broker, not its password."""
    from celery import Celery

    from celery_tuning.errors import ConfigurationError
    from celery_tuning.integration.runtime import runtime_for

    app = Celery("urls_amqp", set_as_current=False, broker="amqp://guest:s3cret@127.0.0.1:5672//")
    with pytest.raises(ConfigurationError, match=r"tuning_redis_url") as info:
        runtime_for(app).redis_url  # noqa: B018
    assert "s3cret" not in str(info.value)
    assert "amqp://guest:***@127.0.0.1:5672//" in str(info.value)
