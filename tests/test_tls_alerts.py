"""A refused TLS client learns why: the listener sends the TLS alert for its case (RFC 8446
§6.2, RFC 5246 §7.2.2) as an OpenSSL server would, and the log line and audit record of the
refusal name the certificate it presented. Real clients: Python's ssl and `openssl s_client`."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomfw.pki import certs
from dicomfw.relay.server import Refused
from tests.harness import WAIT, Firewall, Pki, associate_rq, client_context, rules
from tests.obs_harness import observed_firewall
from tests.pkihelpers import crl_until


def listener_rules(pki: Pki, crl: Path, audit: Path) -> str:
    text = rules(pki, 11112, listener_tls=True, upstream_tls=False)
    text = text.replace(f"ca: {pki.ca}}}", f"ca: {pki.ca}, crl: {crl}}}")
    return text + f"audit: {{file: {audit}}}\n"


@pytest.fixture(scope="module")
def clients(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, certs.CertPaths]:
    out = tmp_path_factory.mktemp("clients")
    long_ago = datetime.now(UTC) - timedelta(days=30)
    revoked = certs.issue(pki.ca_dir, "revoked", "client", out)
    certs.revoke(pki.ca_dir, revoked.cert, out / "ca.crl")
    return {
        "expired": certs.issue(pki.ca_dir, "expired", "client", out, days=1, not_before=long_ago),
        "revoked": revoked,
        "stranger": pki.stranger,
    }


@pytest.fixture
def firewall(
    tmp_path: Path, pki: Pki, clients: dict[str, certs.CertPaths]
) -> tuple[Firewall, Path]:
    crl = clients["revoked"].cert.parent / "ca.crl"
    with observed_firewall(tmp_path, listener_rules(pki, crl, tmp_path / "audit.jsonl")) as (
        running,
        _,
    ):
        yield running, tmp_path / "audit.jsonl"


def handshake_error(port: int, context: ssl.SSLContext) -> ssl.SSLError:
    """Connect, request an association, read: the error the client's TLS stack reports (in
    TLS 1.3 a refused client certificate shows on the first read, the handshake done)."""
    with socket.create_connection(("127.0.0.1", port), WAIT) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.settimeout(WAIT)
            tls.sendall(associate_rq("CT01", "PACS"))
            answer = tls.recv(6)
        except ssl.SSLError as error:
            return error
    raise AssertionError(f"no TLS alert; the listener answered {answer!r}")


@pytest.mark.parametrize(
    ("client", "version", "alert"),
    [
        ("stranger", ssl.TLSVersion.TLSv1_3, "TLSV1_ALERT_UNKNOWN_CA"),
        ("stranger", ssl.TLSVersion.TLSv1_2, "TLSV1_ALERT_UNKNOWN_CA"),
        ("expired", ssl.TLSVersion.TLSv1_3, "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
        ("revoked", ssl.TLSVersion.TLSv1_2, "SSLV3_ALERT_CERTIFICATE_REVOKED"),
        (None, ssl.TLSVersion.TLSv1_3, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        (None, ssl.TLSVersion.TLSv1_2, "SSLV3_ALERT_HANDSHAKE_FAILURE"),  # TLS 1.2 has no other
    ],
)
def test_a_refused_client_receives_the_alert_for_its_case(
    firewall: tuple[Firewall, Path],
    pki: Pki,
    clients: dict[str, certs.CertPaths],
    client: str | None,
    version: ssl.TLSVersion,
    alert: str,
) -> None:
    running, _ = firewall
    context = client_context(pki, clients[client] if client else None)
    context.minimum_version = context.maximum_version = version
    error = handshake_error(running.port("front"), context)
    assert error.reason == alert


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_a_tls_1_1_client_receives_protocol_version(
    firewall: tuple[Firewall, Path], pki: Pki
) -> None:
    running, _ = firewall
    context = client_context(pki, pki.modality)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    assert handshake_error(running.port("front"), context).reason == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_openssl_s_client_reports_the_alert(
    firewall: tuple[Firewall, Path], pki: Pki, tmp_path: Path
) -> None:
    """As a modality's log shows it: the alert, not a network error."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed")
    running, _ = firewall
    result = subprocess.run(
        [
            openssl, "s_client", "-connect", f"127.0.0.1:{running.port('front')}",
            "-CAfile", str(pki.ca), "-cert", str(pki.stranger.cert),
            "-key", str(pki.stranger.key), "-tls1_2", "-brief",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "alert unknown ca" in result.stderr


def test_the_log_and_audit_name_the_refused_certificate(
    firewall: tuple[Firewall, Path], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    running, audit = firewall
    handshake_error(running.port("front"), client_context(pki, pki.stranger))
    refused = running.wait_for(lambda e: isinstance(e, Refused))
    [info] = [info for info, event in running.events if event is refused]
    [presented] = certs.inspect(pki.stranger.cert)
    assert isinstance(refused, Refused) and refused.cause == "unknown_ca"
    assert (
        f"event=connection_refused listener=front peer=127.0.0.1:{info.port}"
        " why=tls_handshake_failed cause=unknown_ca"
        ' detail="CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"'
        f' subject="CN=stranger" issuer="CN=somebody else\'s CA" serial={presented.serial}'
    ) in caplog.text
    record = wait_for_record(audit, "connection_refused")
    assert record["presented_certificate"] == {
        "subject": "CN=stranger",
        "issuer": "CN=somebody else's CA",
        "serial": presented.serial,
        "sha256": presented.fingerprint_sha256_hex,
    }
    assert record["cause"] == "unknown_ca" and record["certificate"] is None


def wait_for_record(audit: Path, event: str) -> dict[str, object]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if audit.exists():
            for line in audit.read_text().splitlines():
                record: dict[str, object] = json.loads(line)
                if record["event"] == event:
                    return record
        time.sleep(0.05)
    raise AssertionError(f"no {event} record in {audit}")


def test_a_crl_that_expires_while_the_listener_runs_is_blamed_not_the_client(
    tmp_path: Path, pki: Pki
) -> None:
    """What a forgotten renewal does: from its next update on, every client is refused. The
    log and the metric label say the CRL is at fault (cause crl_expired)."""
    crl = crl_until(pki.ca_dir, tmp_path / "ca.crl", datetime.now(UTC) + timedelta(seconds=2))
    with observed_firewall(tmp_path, listener_rules(pki, crl, tmp_path / "audit.jsonl")) as (
        running,
        _,
    ):
        time.sleep(max(0.0, crl_next_update(crl) - time.time()) + 0.5)
        error = handshake_error(running.port("front"), client_context(pki, pki.modality))
        refused = running.wait_for(lambda e: isinstance(e, Refused))
    assert error.reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED"  # OpenSSL's alert for the case
    assert isinstance(refused, Refused)
    assert (refused.cause, refused.detail) == (
        "crl_expired",
        "CERTIFICATE_VERIFY_FAILED: CRL has expired",
    )


def crl_next_update(path: Path) -> float:
    from cryptography import x509

    when = x509.load_pem_x509_crl(path.read_bytes()).next_update_utc
    assert when is not None
    return when.timestamp()
