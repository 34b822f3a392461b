"""Certificates in a running firewall: round trip from the CLI, rotation under load, refusals,
bad reloads, and TLS session resumption that must not outlive trust."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomfw.core.session import AssociationAccepted
from dicomfw.pki import certs
from dicomfw.relay.server import Refused
from dicomfw.service.daemon import reload
from tests.harness import (
    WAIT,
    Firewall,
    associate_rq,
    ct_image,
    dcmtk,
    encoded,
    running_firewall,
    running_scp,
    scu,
    slow_tcp_proxy,
)
from tests.opshelpers import cli

DICOMFW = shutil.which("dicomfw")


class Site:
    """A site PKI made with the CLI, with the firewall's files where the rules point."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_dir = directory / "ca"
        self.ca = self.ca_dir / "ca.pem"
        self.crl = self.ca_dir / "ca.crl"
        self.live = directory / "live"  # what the rules file names
        cli("certs", "init-ca", "--dir", self.ca_dir, "--name", "Test Hospital CA")
        self.issue("fw", "server", self.live, "--dns", "localhost", "--ip", "127.0.0.1")
        self.issue("ct01", "client", directory / "clients", "--ae", "CT01")
        # A CRL from the start (revoking a certificate nobody uses), so rules can name it.
        retired = self.issue("retired", "client", directory / "clients")
        certs.revoke(self.ca_dir, retired.cert, self.crl)

    def issue(self, name: str, kind: str, out: Path, *extra: str) -> certs.CertPaths:
        cli(
            "certs",
            "issue",
            "--ca",
            self.ca_dir,
            "--name",
            name,
            "--kind",
            kind,
            "--out",
            out,
            *extra,
        )
        return certs.CertPaths(out / f"{name}.pem", out / f"{name}.key")

    def client_context(self, pair: certs.CertPaths) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(self.ca)
        context.load_cert_chain(pair.cert, pair.key)
        return context

    def rules(self, upstream_port: int) -> str:
        return f"""\
listeners:
  - name: remote
    bind: "127.0.0.1:0"
    tls: {{cert: live/fw.pem, key: live/fw.key, ca: ca/ca.pem, crl: ca/ca.crl}}
upstreams:
  pacs: {{host: 127.0.0.1, port: {upstream_port}}}
peers:
  - {{ae_title: CT01, networks: [127.0.0.0/8], certificate: {{san_uri: "urn:dicom:ae:CT01"}}}}
routes:
  - {{listener: remote, called_ae: PACS, upstream: pacs,
     allow: [{{services: [C-ECHO, C-STORE], sop_classes: [CTImageStorage]}}]}}
"""


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def tls_association(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, str, ssl.SSLSession | None, bool]:
    """Open TLS, request an association, read the first PDU. Returns (first PDU or b"",
    server certificate SHA-256, the session to resume later, whether this one resumed)."""
    with socket.create_connection(("127.0.0.1", port), WAIT) as raw:
        try:
            sock = context.wrap_socket(raw, server_hostname="localhost", session=session)
        except (ssl.SSLError, OSError):
            return b"", "", None, False
        sock.settimeout(WAIT)
        peer = hashlib.sha256(sock.getpeercert(binary_form=True) or b"").hexdigest()
        try:
            sock.sendall(associate_rq("CT01", "PACS"))
            header = sock.recv(6)
        except (ssl.SSLError, OSError):  # TLS 1.3: a refused client learns on its first read
            return b"", peer, None, sock.session_reused
        return header, peer, sock.session, sock.session_reused


def served_certificate(port: int, context: ssl.SSLContext) -> str:
    """SHA-256 of the certificate a new TLS connection to ``port`` is shown."""
    with (
        socket.create_connection(("127.0.0.1", port), WAIT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        return hashlib.sha256(sock.getpeercert(binary_form=True) or b"").hexdigest()


def fingerprint(path: Path) -> str:
    return certs.inspect(path)[0].fingerprint_sha256_hex


@pytest.fixture
def firewall(site: Site) -> Iterator[Firewall]:
    with running_scp() as pacs, running_firewall(site.dir, site.rules(pacs.port)) as running:
        yield running


def test_round_trip_from_the_cli_to_dcmtk_storescu_over_mutual_tls(site: Site) -> None:
    image = site.dir / "image.dcm"
    ct_image(seed=1, pixel_bytes=100_000).save_as(image, enforce_file_format=True)
    client = certs.CertPaths(site.dir / "clients/ct01.pem", site.dir / "clients/ct01.key")
    with running_scp() as pacs, running_firewall(site.dir, site.rules(pacs.port)) as firewall:
        store = dcmtk(
            "storescu",
            "+tls",
            client.key,
            client.cert,
            "+cf",
            site.ca,
            "-aet",
            "CT01",
            "-aec",
            "PACS",
            "127.0.0.1",
            str(firewall.port("remote")),
            image,
        )
    assert store.returncode == 0, store.stderr
    assert len(pacs.stored) == 1


def test_rotating_the_server_certificate_under_load_keeps_the_transfer_and_serves_the_new_one(
    site: Site,
) -> None:
    image = ct_image(seed=2, pixel_bytes=12_000_000)
    client = certs.CertPaths(site.dir / "clients/ct01.pem", site.dir / "clients/ct01.key")
    old = fingerprint(site.live / "fw.pem")
    with (
        running_scp() as pacs,
        slow_tcp_proxy(pacs.port, bytes_per_second=5_000_000) as slow_port,
        running_firewall(site.dir, site.rules(slow_port)) as firewall,
    ):
        port = firewall.port("remote")
        association = scu("CT01").associate(
            "127.0.0.1", port, ae_title="PACS", tls_args=(site.client_context(client), "localhost")
        )
        assert association.is_established
        result: list[int] = []
        sender = threading.Thread(
            target=lambda: result.append(association.send_c_store(image).Status), daemon=True
        )
        sender.start()
        # Mid-transfer: a new certificate, installed with the CLI, then a reload.
        staged = site.issue(
            "fw", "server", site.dir / "staged", "--dns", "localhost", "--ip", "127.0.0.1"
        )
        cli(
            "certs",
            "install",
            "--cert",
            staged.cert,
            "--key",
            staged.key,
            "--dest-cert",
            site.live / "fw.pem",
            "--dest-key",
            site.live / "fw.key",
            "--ca",
            site.ca,
        )
        assert sender.is_alive(), "the transfer should still be running during the reload"
        assert firewall.call(lambda: reload(firewall.relay, site.dir / "rules.yaml"))
        served = served_certificate(port, site.client_context(client))
        sender.join(60)
        association.release()
    new = fingerprint(site.live / "fw.pem")
    assert new != old and (site.live / "fw.pem.prev").exists()
    assert served == new  # a new association sees the new certificate
    assert result == [0x0000]  # the running transfer completed
    assert pacs.stored == [encoded(image)]


def test_an_expired_client_certificate_is_refused(site: Site, firewall: Firewall) -> None:
    expired = certs.issue(
        site.ca_dir,
        "old-ct",
        "client",
        site.dir / "clients",
        ae_title="CT01",
        days=1,
        not_before=datetime.now(UTC) - timedelta(days=10),
    )
    answer, _, _, _ = tls_association(firewall.port("remote"), site.client_context(expired))
    refused = firewall.wait_for(lambda e: isinstance(e, Refused))
    assert answer == b""
    assert isinstance(refused, Refused) and "expired" in refused.detail


def test_a_revoked_client_certificate_is_refused_after_the_crl_is_reloaded(
    site: Site, firewall: Firewall
) -> None:
    client = certs.CertPaths(site.dir / "clients/ct01.pem", site.dir / "clients/ct01.key")
    port = firewall.port("remote")
    context = site.client_context(client)  # a session resumes only with its own context
    first, _, session, _ = tls_association(port, context)
    assert first[:1] == b"\x02"
    resumed, _, _, was_resumed = tls_association(port, context, session)
    assert resumed[:1] == b"\x02" and was_resumed  # resumption works while trust holds
    certs.revoke(site.ca_dir, client.cert, site.crl)
    assert firewall.call(lambda: reload(firewall.relay, site.dir / "rules.yaml"))
    # Neither a resumed session nor a full handshake gets the revoked client back in.
    after_resume, _, _, _ = tls_association(port, context, session)
    after_full, _, _, _ = tls_association(port, site.client_context(client))
    assert after_resume == b"" and after_full == b""
    assert any(isinstance(e, Refused) and "revoked" in e.detail for _, e in firewall.events)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_a_tls_1_1_only_client_is_refused(site: Site, firewall: Firewall) -> None:
    client = certs.CertPaths(site.dir / "clients/ct01.pem", site.dir / "clients/ct01.key")
    context = site.client_context(client)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    answer, _, _, _ = tls_association(firewall.port("remote"), context)
    refused = firewall.wait_for(lambda e: isinstance(e, Refused))
    assert answer == b""
    assert isinstance(refused, Refused) and refused.why == "tls_handshake_failed"
    assert refused.detail == "UNSUPPORTED_PROTOCOL"


def test_a_bad_reload_keeps_serving_with_the_old_material(
    site: Site, firewall: Firewall, caplog: pytest.LogCaptureFixture
) -> None:
    client = certs.CertPaths(site.dir / "clients/ct01.pem", site.dir / "clients/ct01.key")
    port = firewall.port("remote")
    before = fingerprint(site.live / "fw.pem")
    # 1. A key that does not belong to the certificate.
    stranger = site.issue("other", "server", site.dir / "staged")
    good_key = (site.live / "fw.key").read_bytes()
    (site.live / "fw.key").write_bytes(stranger.key.read_bytes())
    assert not firewall.call(lambda: reload(firewall.relay, site.dir / "rules.yaml"))
    assert (
        f"{site.live / 'fw.key'}: listeners.remote.tls.key: does not belong to the certificate"
        f" {site.live / 'fw.pem'} (their public keys differ" in caplog.text
    )
    answer, served, _, _ = tls_association(port, site.client_context(client))
    assert answer[:1] == b"\x02" and served == before
    # 2. A rules file that does not parse.
    (site.live / "fw.key").write_bytes(good_key)
    (site.dir / "rules.yaml").write_text("listeners: [\n")
    assert not firewall.call(lambda: reload(firewall.relay, site.dir / "rules.yaml"))
    assert "rules.yaml:2: YAML syntax error" in caplog.text
    answer, _, _, _ = tls_association(port, site.client_context(client))
    assert answer[:1] == b"\x02"


def test_a_certificate_of_another_peer_cannot_claim_its_ae_title(
    site: Site, firewall: Firewall
) -> None:
    other = site.issue("mr01", "client", site.dir / "clients", "--ae", "MR01")
    answer, _, _, _ = tls_association(firewall.port("remote"), site.client_context(other))
    assert answer == bytes((0x03, 0, 0, 0, 0, 4))  # A-ASSOCIATE-RJ header ...
    accepted = [e for _, e in firewall.events if isinstance(e, AssociationAccepted)]
    assert accepted == []


def test_upstream_sessions_are_resumed_and_dropped_on_reload(tmp_path: Path) -> None:
    from tests.harness import echo_works, make_pki, rules, server_context

    pki = make_pki(tmp_path / "pki")
    with (
        running_scp(ssl_context=server_context(pki, pki.pacs)) as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=True)) as firewall,
    ):
        port = firewall.port("front")
        assert echo_works(port) and echo_works(port)
        assert firewall.call(lambda: reload(firewall.relay, tmp_path / "rules.yaml"))
        assert echo_works(port) and echo_works(port)
    resumed = [
        i.tls_resumed_upstream for i, e in firewall.events if isinstance(e, AssociationAccepted)
    ]
    assert resumed == [False, True, False, True]


def test_a_reload_applies_to_new_associations_and_leaves_open_ones_running(tmp_path: Path) -> None:
    """Rules are reloaded without dropping associations: one that is open keeps the rules it
    started with (here: its peer is removed), new ones get the new rules at once."""
    from tests.harness import associate_rq, ct_image, exchange, make_pki, rules, scu

    pki = make_pki(tmp_path / "pki")
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False)) as firewall,
    ):
        port = firewall.port("front")
        held = scu("CT01").associate("127.0.0.1", port, ae_title="PACS")
        assert held.is_established
        path = tmp_path / "rules.yaml"
        path.write_text(path.read_text().replace("ae_title: CT01,", "ae_title: CT02,"))
        assert firewall.call(lambda: reload(firewall.relay, path))
        # calling AE not recognized (1, 1, 3) for a new association ...
        assert exchange(port, associate_rq("CT01", "PACS")) == bytes(
            (0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3)
        )
        # ... while the open one goes on under the rules it started with.
        assert held.send_c_echo().Status == 0x0000
        assert held.send_c_store(ct_image(seed=3)).Status == 0x0000
        held.release()
    assert pacs.requests == ["C-ECHO", "C-STORE"]


def test_certs_check_with_the_rules_file_checks_every_certificate_it_uses(site: Site) -> None:
    (site.dir / "rules.yaml").write_text(site.rules(104))
    assert DICOMFW is not None
    check = [DICOMFW, "certs", "check", "--config", str(site.dir / "rules.yaml")]
    fine = subprocess.run(
        [*check, "--warn-days", "30"], capture_output=True, text=True, timeout=60, check=False
    )
    soon = subprocess.run(
        [*check, "--warn-days", "900"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (fine.returncode, fine.stderr) == (0, "")
    assert fine.stdout == (
        f"OK: {site.dir / 'rules.yaml'}: 1 certificate(s), 1 key(s), 1 CA file(s), 1 CRL file(s);"
        " no certificate expires within 30 days nor CRL within 7, every key matches its"
        " certificate, every chain verifies against its endpoint's CA\n"
    )
    assert soon.returncode == 1
    assert soon.stdout.startswith(
        f"{site.live / 'fw.pem'}: listeners.remote.tls.cert: CN=fw: expires on "
    )


def test_a_passphrase_protected_key_is_unlocked_from_its_password_file(site: Site) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((site.live / "fw.key").read_bytes(), None)
    (site.live / "fw.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"correct horse"),
        )
    )
    (site.dir / "fw.pass").write_text("correct horse\n")
    client = certs.CertPaths(site.dir / "clients/ct01.pem", site.dir / "clients/ct01.key")
    rules = site.rules(104).replace(
        "crl: ca/ca.crl}", "crl: ca/ca.crl, key_password_file: fw.pass}"
    )
    with running_firewall(site.dir, rules) as firewall:
        assert served_certificate(firewall.port("remote"), site.client_context(client)) == (
            fingerprint(site.live / "fw.pem")
        )
    (site.dir / "fw.pass").write_text("wrong\n")
    assert DICOMFW is not None
    check = subprocess.run(
        [DICOMFW, "check", "--config", str(site.dir / "rules.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 1
    assert check.stderr.splitlines()[0] == (
        f"{site.dir / 'fw.pass'}: listeners.remote.tls.key_password_file: does not open the key"
        f" {site.live / 'fw.key'} (a wrong password, or a damaged key file)"
    )
