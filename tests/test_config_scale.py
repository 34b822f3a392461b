"""The settings for running several instances: ``limits.store`` with its ``redis`` section,
``limits.drain_notice_seconds`` and ``instance``: what a valid file means, each mistake at its
``file:line: key``, and which of them a reload cannot apply."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import pytest

from dicomfw.config.describe import describe
from dicomfw.config.model import RedisStore
from dicomfw.observe.observability import warn_restart_needed
from tests.test_config_observability import BASE, load  # lines from 9 on are the test's


def test_a_redis_store_with_every_setting(tmp_path: Path) -> None:
    (tmp_path / "redis.pass").write_text("s3cret\n")
    (tmp_path / "ca.pem").write_text("")
    config = load(
        tmp_path,
        """\
instance: fw-a.site
limits:
  drain_notice_seconds: 6
  store: redis
  redis:
    url: rediss://redis.example:6380/2
    tls: {ca: ca.pem}
    password_file: redis.pass
    timeout_ms: 50
    fail: closed
    lease_seconds: 10
    key_prefix: "{site1}:"
""",
    )
    assert not isinstance(config, list), config
    limits = config.limits  # type: ignore[attr-defined]
    assert config.instance == "fw-a.site"  # type: ignore[attr-defined]
    assert limits.drain_notice_seconds == 6.0
    store = limits.store
    assert isinstance(store, RedisStore) and store.tls is not None
    assert (store.url, store.tls.ca, store.password_file) == (
        "rediss://redis.example:6380/2",
        tmp_path / "ca.pem",
        tmp_path / "redis.pass",
    )
    assert (store.timeout_ms, store.fail, store.lease_seconds, store.key_prefix) == (
        50,
        "closed",
        10,
        "{site1}:",
    )


def test_the_defaults_keep_limits_local_and_name_the_instance_after_the_host(
    tmp_path: Path,
) -> None:
    config = load(tmp_path, "")
    assert config.limits.store is None and config.limits.drain_notice_seconds == 0  # type: ignore[attr-defined]
    assert config.instance == socket.gethostname()  # type: ignore[attr-defined]
    shared = load(tmp_path, "limits: {store: redis, redis: {url: redis://10.0.2.5}}")
    assert shared.limits.store == RedisStore("redis://10.0.2.5")  # type: ignore[attr-defined]
    assert RedisStore("x").fail == "open" and RedisStore("x").timeout_ms == 100


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "limits: {store: redis}",
            ["9: limits.store: store: redis needs a redis section with at least url"],
        ),
        (
            "limits: {redis: {url: redis://r}}",
            ["9: limits.redis: the redis settings apply only with store: redis"],
        ),
        (
            "limits: {store: memcached}",
            ["9: limits.store: expected one of local, redis, got 'memcached'"],
        ),
        (
            "limits: {store: redis, redis: {url: http://r:6379}}",
            [
                "9: limits.redis.url: expected redis://host:port, rediss://host:port (TLS) or "
                "unix:///path, got 'http://r:6379'"
            ],
        ),
        (
            "limits: {store: redis, redis: {url: 'redis://r:port'}}",
            [
                "9: limits.redis.url: expected redis://host:port, rediss://host:port (TLS) or "
                "unix:///path, got 'redis://r:port'"
            ],
        ),
        (
            "limits: {store: redis, redis: {url: rediss://r}}",
            ["9: limits.redis.url: a rediss:// url and tls settings go together"],
        ),
        (
            "limits: {store: redis, redis: {url: redis://r, fail: maybe, lease_seconds: 1}}",
            [
                "9: limits.redis.fail: expected one of open, closed, got 'maybe'",
                "9: limits.redis.lease_seconds: must be between 3 and 3600, got 1",
            ],
        ),
        (
            "limits: {store: redis, redis: {timeout_ms: 0}}",
            [
                "9: limits.redis: missing required key 'url'",
                "9: limits.redis.timeout_ms: must be between 1 and 10000, got 0",
            ],
        ),
        (
            "limits: {store: redis, redis: {url: redis://r, key_prefix: 'a b'}}",
            [
                "9: limits.redis.key_prefix: expected at most 64 printable ASCII characters "
                "without spaces"
            ],
        ),
        (
            "limits: {drain_notice_seconds: 0}",
            ["9: limits.drain_notice_seconds: must be more than 0 and at most 600 seconds, got 0"],
        ),
        (
            "instance: 'fw 1'",
            ["9: instance: invalid name 'fw 1': use letters, digits, '_', '.' and '-'"],
        ),
    ],
    ids=[
        "store without redis",
        "redis without store",
        "unknown store",
        "not a redis url",
        "bad port",
        "rediss without tls",
        "bad fail and lease",
        "no url",
        "prefix with a space",
        "no notice",
        "bad instance",
    ],
)
def test_a_mistake_is_reported_at_its_line_and_key(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    assert load(tmp_path, text) == expected


def test_store_redis_without_the_redis_package_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # what an install without the extra has
    assert load(tmp_path, "limits: {store: redis, redis: {url: redis://r}}") == [
        "9: limits.store: store: redis needs the Python package redis: pip install 'dicomfw[redis]'"
    ]


def test_a_reload_says_the_store_and_the_instance_name_need_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = load(tmp_path, "limits: {store: redis, redis: {url: redis://r}}")
    after = load(tmp_path, "instance: other\nlimits: {store: redis, redis: {url: redis://s}}")
    caplog.set_level(logging.WARNING)
    warn_restart_needed(before, after)  # type: ignore[arg-type]
    [record] = caplog.records
    assert "sections=instance,limits.store" in record.getMessage()


def test_check_shows_the_instance_the_notice_and_where_limits_are_counted(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "instance: fw-a\nlimits: {drain_notice_seconds: 6, store: redis, redis: {url: redis://r}}",
    )
    text = describe(config)  # type: ignore[arg-type]
    assert "Instance: fw-a\n" in text
    assert "notice before the drain   6 s\n" in text
    assert (
        "limits counted            for all instances in Redis at redis://r (fail open, "
        "timeout 100 ms, leases 15 s)\n"
    ) in text
    assert "limits counted            in each process\n" in describe(load(tmp_path, ""))  # type: ignore[arg-type]


def test_the_rules_schema_knows_the_store_and_what_goes_with_it() -> None:
    """An editor using the shipped JSON Schema flags the same mistakes as the loader."""
    from tests.test_admin_schema import schema_errors  # the schema validator of the admin tests
    from tests.test_deploy import one

    configmap_rules = one("ConfigMap", "dicomfw-rules")["data"]["rules.yaml"]
    assert schema_errors(configmap_rules) == []
    base = BASE + "instance: fw1\n"
    assert schema_errors(base + "limits: {store: redis, redis: {url: redis://r}}") == []
    assert schema_errors(base + "limits: {store: redis}") == ["'redis' is a required property"]
    assert schema_errors(base + "limits: {redis: {url: redis://r}}") == [
        "'store' is a required property"
    ]
    assert schema_errors(base + "limits: {store: redis, redis: {url: rediss://r}}") == [
        "'tls' is a required property"
    ]
