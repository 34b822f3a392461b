"""The ``metrics:`` and ``audit:`` sections: what a valid file means, and each mistake reported at
its ``file:line: key``."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomfw.config.describe import describe
from dicomfw.config.load import load_config
from dicomfw.config.model import AtnaCollector, Audit, Config, MetricsEndpoint
from dicomfw.errors import ConfigErrors
from tests.harness import Pki

BASE = """\
listeners:
  - {name: front, bind: "127.0.0.1:11112"}
upstreams:
  pacs: {host: 127.0.0.1, port: 104}
peers:
  - {ae_title: CT01, networks: [127.0.0.0/8]}
routes:
  - {listener: front, called_ae: PACS, upstream: pacs, allow: [{services: [C-ECHO]}]}
"""  # the sections under test start on line 9


def load(tmp_path: Path, sections: str) -> Config | list[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(BASE + sections)
    try:
        return load_config(path)
    except ConfigErrors as errors:
        return [str(error).removeprefix(f"{path}:") for error in errors.errors]


def test_no_metrics_or_audit_section_means_neither(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert not isinstance(config, list), config
    assert config.metrics is None and config.audit is None


def test_metrics_and_audit_with_file_and_atna_over_tls(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "log").mkdir()
    config = load(
        tmp_path,
        f"""\
metrics: {{bind: "[::1]:9104"}}
audit:
  file: log/audit.jsonl
  queue_size: 500
  atna: {{host: arr.example, ca: {pki.ca}, cert: {pki.fw_client.cert}, key: {pki.fw_client.key}}}
""",
    )
    assert not isinstance(config, list), config
    assert config.metrics == MetricsEndpoint("::1", 9104)
    assert config.audit == Audit(
        file=tmp_path / "log" / "audit.jsonl",
        queue_size=500,
        atna=AtnaCollector(
            "arr.example", 6514, "tls", pki.ca, pki.fw_client.cert, pki.fw_client.key
        ),
    )
    roles = dict(config.certificate_files())
    assert roles["atna:cert"] == pki.fw_client.cert and roles["atna:ca"] == pki.ca
    text = describe(config)
    assert "http://[::1]:9104/metrics" in text
    assert "arr.example:6514 (TLS, RFC 5425)" in text


def test_audit_to_stdout_and_atna_over_udp_on_the_default_port(tmp_path: Path) -> None:
    config = load(tmp_path, 'audit: {file: "-", atna: {host: 10.0.0.5, transport: udp}}\n')
    assert not isinstance(config, list), config
    assert config.audit == Audit(stdout=True, atna=AtnaCollector("10.0.0.5", 514, "udp"))


MISTAKES = {
    "bad-port": (
        'metrics: {bind: "127.0.0.1:99999"}\n',
        "9: metrics.bind: port must be a number from 1 to 65535 (or 0: any free port), got '99999'",
    ),
    "unknown-key": (
        'metrics: {bind: "127.0.0.1:9104", port: 9104}\n',
        "9: metrics.port: unknown key 'port' (allowed: bind)",
    ),
    "no-sink": (
        "audit: {queue_size: 10}\n",
        '9: audit: give file (JSON lines; "-" for stdout), atna, or both',
    ),
    "missing-directory": (
        "audit: {file: nowhere/audit.jsonl}\n",
        "9: audit.file: directory not found: {tmp}/nowhere",
    ),
    "a-directory": ("audit: {file: .}\n", "9: audit.file: {tmp} is a directory; name a file in it"),
    "queue-size": (
        "audit: {file: a.jsonl, queue_size: 0}\n",
        "9: audit.queue_size: must be between 1 and 10000000, got 0",
    ),
    "tls-without-ca": (
        "audit: {atna: {host: arr.example}}\n",
        "9: audit.atna: transport: tls needs ca, to verify the collector's certificate",
    ),
    "unknown-transport": (
        "audit: {atna: {host: arr.example, transport: tcp}}\n",
        "9: audit.atna.transport: expected one of tls, udp, got 'tcp'",
    ),
    "udp-with-ca": (
        "audit:\n  atna: {host: arr.example, transport: udp, ca: rules.yaml}\n",
        "10: audit.atna.ca: ca applies to transport: tls only",
    ),
    "cert-without-key": (
        "audit:\n  atna: {host: arr.example, ca: rules.yaml, cert: rules.yaml}\n",
        "10: audit.atna: give both cert and key (a client certificate), or neither",
    ),
}


@pytest.mark.parametrize(("sections", "expected"), MISTAKES.values(), ids=MISTAKES)
def test_each_mistake_is_reported_at_its_line_and_key(
    tmp_path: Path, sections: str, expected: str
) -> None:
    assert load(tmp_path, sections) == [expected.replace("{tmp}", str(tmp_path))]
