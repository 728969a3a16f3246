import pytest

from celery_tuning.storage.urls import parse_redis_url, redact_url


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
