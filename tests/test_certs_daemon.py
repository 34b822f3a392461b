"""Certificates in daily operation of `dicomfw run`, as an admin drives it with the CLI: a CRL
near its next update is warned of and exported, renewed by `certs crl` and taken by a reload
(the revoked client stays refused), and `ready`/`reloaded` name the certificate each TLS
listener and upstream presents, so a rotation shows in the log."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
from pathlib import Path

from cryptography import x509

from dicomfw.pki import certs
from tests.harness import (
    WAIT,
    Pki,
    associate_rq,
    client_context,
    free_port,
    rules,
    running_process,
    running_scp,
    server_context,
)
from tests.obs_harness import scrape, value, wait_until
from tests.opshelpers import cli, installed_dicomfw


def first_byte(port: int, context: ssl.SSLContext) -> bytes | str:
    """The first byte of the answer to an A-ASSOCIATE-RQ over TLS, or the TLS alert's name."""
    with socket.create_connection(("127.0.0.1", port), WAIT) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.settimeout(WAIT)
            tls.sendall(associate_rq("CT01", "PACS"))
            return tls.recv(1)
        except ssl.SSLError as error:
            return str(error.reason)


def next_update(crl: Path) -> float:
    when = x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc
    assert when is not None
    return when.timestamp()


def log_fields(certificate: Path, prefix: str) -> str:
    [info] = certs.inspect(certificate)
    return (
        f'{prefix}.subject="{info.subject}" {prefix}.sha256={info.fingerprint_sha256_hex}'
        f" {prefix}.not_after={info.not_after:%Y-%m-%dT%H:%M:%SZ}"
    )


def live_rules(tmp_path: Path, pki: Pki, pacs_port: int, port: int, metrics: int) -> Path:
    """A TLS listener on ``port`` whose certificate, key and CRL are in ``live/`` (copies the
    test may replace), TLS to the PACS, and metrics on ``metrics``."""
    live = tmp_path / "live"
    live.mkdir()
    text = rules(pki, pacs_port, listener_tls=True).replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"')
    for path in (pki.fw_server.cert, pki.fw_server.key):
        shutil.copy(path, live / path.name)
        text = text.replace(f": {path}", f": {live / path.name}")
    text = text.replace(f"ca: {pki.ca}}}", f"ca: {pki.ca}, crl: {live / 'ca.crl'}}}")
    path = tmp_path / "rules.yaml"
    path.write_text(text + f'metrics: {{bind: "127.0.0.1:{metrics}"}}\n')
    return path


def test_crl_renewal_and_certificate_rotation_through_the_running_daemon(
    tmp_path: Path, pki: Pki
) -> None:
    port, metrics = free_port(), free_port()
    lost = certs.issue(pki.ca_dir, "lost-laptop", "client", tmp_path / "clients", ae_title="CT01")
    revoked, good = client_context(pki, lost), client_context(pki, pki.modality)
    crl = tmp_path / "live" / "ca.crl"

    def crl_gauge() -> float:
        return value(scrape(metrics), "dicomfw_crl_next_update_timestamp_seconds")

    with running_scp(ssl_context=server_context(pki, pki.pacs)) as pacs:
        path = live_rules(tmp_path, pki, pacs.port, port, metrics)
        cli("certs", "revoke", "--ca", pki.ca_dir, "--cert", lost.cert, "--crl", crl,
            "--days", "3")  # fmt: skip
        with running_process(
            installed_dicomfw(), "run", "--config", path, ready_port=metrics
        ) as daemon:
            assert crl_gauge() == next_update(crl)
            assert first_byte(port, revoked) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
            assert first_byte(port, good) == b"\x02"  # A-ASSOCIATE-AC
            # The admin's chores: the CRL renewed, the listener's certificate rotated.
            cli("certs", "crl", "--ca", pki.ca_dir, "--crl", crl, "--days", "30")
            new = certs.issue(pki.ca_dir, "fw-server", "server", tmp_path / "new", ["localhost"])
            cli("certs", "install", "--cert", new.cert, "--key", new.key,
                "--config", path, "--listener", "front")  # fmt: skip
            daemon.send_signal(signal.SIGHUP)
            wait_until(lambda: crl_gauge() == next_update(crl), "the renewed CRL's next update")
            assert first_byte(port, revoked) == "SSLV3_ALERT_CERTIFICATE_REVOKED"
            assert first_byte(port, good) == b"\x02"
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(WAIT) == 0
            log = daemon.stderr.read().decode() if daemon.stderr else ""
    [ready] = [line for line in log.splitlines() if "event=ready" in line]
    [reloaded] = [line for line in log.splitlines() if "event=reloaded" in line]
    upstream = log_fields(pki.fw_client.cert, "upstream.pacs")
    previous = tmp_path / "live" / "fw-server.pem.prev"
    assert ready.endswith(f"{log_fields(previous, 'listener.front')} {upstream}")
    assert reloaded.endswith(f"{log_fields(new.cert, 'listener.front')} {upstream}")
    [warning] = [line for line in log.splitlines() if "event=crl_expires_soon" in line]
    assert f"listener=front crl={crl} next_update=" in warning  # at start only: renewed since
    assert log.index("event=crl_expires_soon") < log.index("event=reloaded")
