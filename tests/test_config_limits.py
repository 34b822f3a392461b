"""The ``limits:`` keys for rates, caps and drain, globally and as listener/peer overrides:
what a valid file means, and each mistake reported at its ``file:line: key``."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomfw.config.describe import describe
from dicomfw.config.load import load_config
from dicomfw.core.ratelimit import RateLimits
from dicomfw.errors import ConfigErrors

RULES = """\
listeners:
  - name: modalities
    bind: 0.0.0.0:11112
    limits: {max_concurrent_per_ip: 4, request_limit_action: refuse}
upstreams:
  pacs: {host: pacs.example, port: 104}
peers:
  - ae_title: CT01
    networks: [10.1.2.0/24]
    limits: {max_concurrent_per_peer: 8, requests_per_minute_per_peer: {C-FIND: 600}}
  - ae_title: WS1
    networks: [10.1.3.0/24]
routes:
  - listener: modalities
    called_ae: PACS
    upstream: pacs
    allow: [{services: [C-ECHO, C-FIND]}]
limits:
  drain_seconds: 45
  associations_per_minute_per_ip: 60
  associations_per_minute_per_peer: 120
  max_concurrent_per_ip: 10
  max_concurrent_per_peer: 20
  max_concurrent_total: 200
  max_pending_per_ip: 5
  requests_per_minute_per_association: {C-FIND: 60, C-MOVE: 10}
  requests_per_minute_per_peer: {C-FIND: 300}
"""
#         line: 4 listener limits, 10 peer limits, 18 limits, 19 drain_seconds, 26 per association


def load(tmp_path: Path, text: str) -> list[str] | object:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    try:
        return load_config(path)
    except ConfigErrors as errors:
        return [str(error).removeprefix(f"{path}:") for error in errors.errors]


def test_global_limits_with_listener_and_peer_overrides(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, RULES))
    rates = config.limits.rates
    assert config.limits.drain_seconds == 45.0
    assert rates.effective("modalities") == RateLimits(
        associations_per_minute_per_ip=60,
        associations_per_minute_per_peer=120,
        max_concurrent_per_ip=4,  # the listener's
        max_concurrent_per_peer=20,
        max_concurrent_total=200,
        max_pending_per_ip=5,
        requests_per_minute_per_association={"C-FIND": 60, "C-MOVE": 10},
        requests_per_minute_per_peer={"C-FIND": 300},
        request_limit_action="refuse",
    )
    ct01 = rates.effective("modalities", "CT01")
    assert (ct01.max_concurrent_per_peer, dict(ct01.requests_per_minute_per_peer)) == (
        8,
        {"C-FIND": 600},
    )
    assert rates.effective("modalities", "WS1").max_concurrent_per_peer == 20
    shown = describe(config)
    for fact in ("drain on SIGTERM", "45 s", "C-FIND 60/min, C-MOVE 10/min", "CT01", "refuse"):
        assert fact in shown


def test_without_limits_nothing_is_limited(tmp_path: Path) -> None:
    text = RULES.split("limits:\n  drain")[0].replace(
        "    limits: {max_concurrent_per_ip: 4, request_limit_action: refuse}\n", ""
    )
    text = text.replace(
        "    limits: {max_concurrent_per_peer: 8, requests_per_minute_per_peer: {C-FIND: 600}}\n",
        "",
    )
    config = load_config(_write(tmp_path, text))
    assert config.limits.rates.effective("modalities", "CT01") == RateLimits()
    assert config.limits.drain_seconds == 30.0


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "{C-FIND: 60, C-MOVE: 10}",
            "{C-FIND: 60, c-move: 10}",
            "26: limits.requests_per_minute_per_association.c-move: unknown service 'c-move'",
        ),
        (
            "{C-FIND: 300}",
            "{C-FIND: 0}",
            "27: limits.requests_per_minute_per_peer.C-FIND: must be between 1 and 1000000, got 0",
        ),
        (
            "request_limit_action: refuse",
            "request_limit_action: wait",
            "4: listeners[0].limits.request_limit_action: expected one of delay, refuse",
        ),
        (
            "limits: {max_concurrent_per_peer: 8,",
            "limits: {max_pending_per_ip: 1, max_concurrent_per_peer: 8,",
            "10: peers[0].limits.max_pending_per_ip: unknown key 'max_pending_per_ip'",
        ),
        (
            "limits: {max_concurrent_per_ip: 4,",
            "limits: {max_concurrent_total: 4,",
            "4: listeners[0].limits.max_concurrent_total: unknown key 'max_concurrent_total'",
        ),
        (
            "drain_seconds: 45",
            "drain_seconds: -1",
            "19: limits.drain_seconds: must be more than 0 and at most 3600 seconds, got -1",
        ),
        (
            "max_concurrent_total: 200",
            'max_concurrent_total: "200"',
            "24: limits.max_concurrent_total: expected an integer, got a string ('200')",
        ),
        (
            "requests_per_minute_per_peer: {C-FIND: 300}",
            "requests_per_minute_per_peer: {}",
            "27: limits.requests_per_minute_per_peer: expected at least one service",
        ),
    ],
    ids=[
        "unknown-service",
        "zero-rate",
        "unknown-action",
        "per-ip-key-on-a-peer",
        "total-on-a-listener",
        "negative-drain",
        "quoted-number",
        "empty-rates",
    ],
)
def test_a_limits_mistake_is_reported_at_its_line_and_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in RULES
    errors = load(tmp_path, RULES.replace(old, new))
    assert isinstance(errors, list) and len(errors) == 1
    assert errors[0].startswith(expected), errors[0]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path
