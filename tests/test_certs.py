"""The certificate life cycle, as an admin runs it: CLI handlers, files on disk, real TLS."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from dicomfw.pki import certs
from dicomfw.pki.checks import check_paths
from dicomfw.pki.cli import register
from tests.pkihelpers import stale_crl

TIMEOUT = 3.0


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Parse ``dicomfw certs …`` as the lead's CLI will, run the handler, capture its output."""
    parser = argparse.ArgumentParser(prog="dicomfw")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["certs", *map(str, argv)])
    status = args.func(args)
    out, err = capsys.readouterr()
    return status, out, err


@dataclass(frozen=True)
class Site:
    ca_dir: Path
    ca: Path
    out: Path
    server: certs.CertPaths
    client: certs.CertPaths


@pytest.fixture
def site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Site:
    """A site CA, a server certificate for 127.0.0.1/localhost and a client bound to CT01."""
    ca_dir, out = tmp_path / "ca", tmp_path / "out"
    assert run(capsys, "init-ca", "--dir", ca_dir)[0] == 0
    status, text, _ = run(
        capsys, "issue", "--ca", ca_dir, "--name", "fw", "--kind", "server",
        "--dns", "localhost", "--ip", "127.0.0.1", "--out", out,
    )  # fmt: skip
    assert status == 0 and "server certificate CN=fw" in text
    status, _, _ = run(
        capsys, "issue", "--ca", ca_dir, "--name", "ct01", "--kind", "client",
        "--ae", "CT01", "--out", out,
    )  # fmt: skip
    assert status == 0
    return Site(
        ca_dir=ca_dir,
        ca=ca_dir / "ca.pem",
        out=out,
        server=certs.CertPaths(out / "fw.pem", out / "fw.key"),
        client=certs.CertPaths(out / "ct01.pem", out / "ct01.key"),
    )


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A second CA with the same name as the site CA: only the signature tells them apart."""
    return certs.init_ca(tmp_path / "other-ca").cert.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- issuing ----------------------------------------------------------------------------------


def test_issued_certificates_carry_the_right_purposes_sans_and_ae_binding(site: Site) -> None:
    [server] = certs.inspect(site.server.cert, ca=site.ca)
    assert server.subject == "CN=fw"
    assert server.extended_key_usage == ("serverAuth",)
    assert server.dns_names == ("localhost",)
    assert server.ip_addresses == ("127.0.0.1",)
    assert server.ae_binding == ()
    assert server.chain_ok is True and not server.is_ca

    [client] = certs.inspect(site.client.cert, ca=site.ca)
    assert client.extended_key_usage == ("clientAuth",)
    assert client.uris == ("urn:dicom:ae:CT01",)
    assert client.ae_binding == ("CT01",)
    assert client.dns_names == () and client.chain_ok is True
    assert (client.key_type, client.key_size) == ("ec", 256)
    assert 823 <= client.days_left <= 825
    assert len(client.serial) == 40 and client.fingerprint_sha256.count(":") == 31

    for key in (site.ca_dir / "ca.key", site.server.key, site.client.key):
        assert mode(key) == 0o600


def test_ca_and_leaf_extensions_follow_rfc_5280(site: Site) -> None:
    ca = x509.load_pem_x509_certificate(site.ca.read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    leaf = x509.load_pem_x509_certificate(site.server.cert.read_bytes())
    assert len(x509.load_pem_x509_certificates(site.server.cert.read_bytes())) == 1
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_encipherment
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert 0 < leaf.serial_number < 2**159


def test_server_certificate_without_names_gets_its_name_as_dns_san(site: Site) -> None:
    paths = certs.issue(site.ca_dir, "pacs.example.org", "server", site.out)
    assert certs.inspect(paths.cert)[0].dns_names == ("pacs.example.org",)
    with pytest.raises(certs.CertError, match="is no DNS name"):
        certs.issue(site.ca_dir, "CT scanner 2", "server", site.out)


def test_rsa_certificate_is_3072_bits_with_key_encipherment(site: Site) -> None:
    paths = certs.issue(site.ca_dir, "legacy", "client", site.out, key_type="rsa")
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert certs.inspect(paths.cert)[0].key_size == 3072
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def test_a_certificate_cannot_outlive_its_ca(tmp_path: Path) -> None:
    ca_dir = certs.init_ca(tmp_path / "ca", days=30).cert.parent
    with pytest.raises(certs.CertError, match="renew the CA"):
        certs.issue(ca_dir, "fw", "server", tmp_path / "out")
    assert certs.issue(ca_dir, "fw", "server", tmp_path / "out", days=29).cert.exists()


@pytest.mark.parametrize("ae", ["", "   ", "X" * 17, "CT\\01", "CT\n01", "CTÄ01"])
def test_invalid_ae_title_is_refused(site: Site, ae: str) -> None:
    with pytest.raises(certs.CertError, match="AE title"):
        certs.issue(site.ca_dir, "bad", "client", site.out, ae_title=ae)
    assert not (site.out / "bad.pem").exists()


def test_ae_binding_uri_round_trips_an_inner_space() -> None:
    uri = certs.ae_binding_uri(" CT 01 ")
    assert uri == "urn:dicom:ae:CT%2001"
    assert certs.ae_from_uri(uri) == "CT 01"
    assert certs.ae_from_uri("URN:DICOM:AE:CT01") == "CT01"
    assert certs.ae_from_uri("urn:dicom:ae:" + "X" * 17) is None
    assert certs.ae_from_uri("https://example.org/") is None


def test_existing_files_are_not_overwritten_without_force(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_before = site.ca.read_bytes()
    status, _, err = run(capsys, "init-ca", "--dir", site.ca_dir)
    assert status == 2
    assert (
        err
        == f"dicomfw certs: {site.ca_dir / 'ca.key'}: already exists (use --force to replace it)\n"
    )
    assert site.ca.read_bytes() == ca_before

    leaf_before = site.client.cert.read_bytes()
    status, _, err = run(
        capsys, "issue", "--ca", site.ca_dir, "--name", "ct01", "--kind", "client",
        "--out", site.out,
    )  # fmt: skip
    assert status == 2 and "already exists" in err
    assert site.client.cert.read_bytes() == leaf_before

    status, _, _ = run(
        capsys, "issue", "--ca", site.ca_dir, "--name", "ct01", "--kind", "client",
        "--out", site.out, "--force",
    )  # fmt: skip
    assert status == 0 and site.client.cert.read_bytes() != leaf_before


def test_key_is_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        paths = certs.init_ca(tmp_path / "ca")
    finally:
        os.umask(old)
    assert mode(paths.key) == 0o600 and mode(paths.cert) == 0o644
    assert sorted(p.name for p in paths.key.parent.iterdir()) == ["ca.key", "ca.pem"]


def test_csr_carries_the_names_and_is_self_signed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, _ = run(
        capsys, "csr", "--name", "site", "--out", tmp_path, "--dns", "site.example",
        "--ae", "SITE",
    )  # fmt: skip
    assert status == 0 and mode(tmp_path / "site.key") == 0o600
    csr = x509.load_pem_x509_csr((tmp_path / "site.csr").read_bytes())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["site.example"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:dicom:ae:SITE"]


# --- install / rotate -------------------------------------------------------------------------


@pytest.fixture
def installed(site: Site, tmp_path: Path) -> tuple[Path, Path]:
    """The daemon's current pair: the site's server certificate."""
    dest = tmp_path / "etc"
    pair = certs.install(site.server.cert, site.server.key, dest / "fw.pem", dest / "fw.key")
    assert pair.previous_cert is None
    return pair.cert, pair.key


def test_install_with_a_mismatched_key_fails_and_leaves_dest_untouched(
    site: Site, installed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    dest_cert, dest_key = installed
    before = dest_cert.read_bytes(), dest_key.read_bytes()
    status, _, err = run(
        capsys, "rotate", "--cert", site.client.cert, "--key", site.server.key,
        "--dest-cert", dest_cert, "--dest-key", dest_key,
    )  # fmt: skip
    assert status == 2
    assert err.startswith(
        f"dicomfw certs: {site.server.key}: does not belong to the certificate {site.client.cert}"
    )
    assert (dest_cert.read_bytes(), dest_key.read_bytes()) == before
    assert sorted(p.name for p in dest_cert.parent.iterdir()) == ["fw.key", "fw.pem"]


def test_install_of_a_certificate_from_another_ca_fails_the_chain_check(
    site: Site, other_ca: Path, installed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = certs.issue(other_ca, "fw", "server", site.out / "stranger", dns=["localhost"])
    dest_cert, dest_key = installed
    before = dest_cert.read_bytes()
    status, _, err = run(
        capsys, "install", "--cert", stranger.cert, "--key", stranger.key,
        "--dest-cert", dest_cert, "--dest-key", dest_key, "--ca", site.ca,
    )  # fmt: skip
    assert status == 2
    assert err == (
        f"dicomfw certs: {stranger.cert}: does not chain to {site.ca}:"
        " signed by another key than the given CA's (was the CA re-created?)\n"
    )
    assert dest_cert.read_bytes() == before


def test_install_of_an_expired_certificate_is_refused(site: Site, tmp_path: Path) -> None:
    old = certs.issue(
        site.ca_dir, "old", "server", site.out,
        not_before=datetime.now(UTC) - timedelta(days=10), days=1,
    )  # fmt: skip
    with pytest.raises(certs.CertError, match="not valid now"):
        certs.install(old.cert, old.key, tmp_path / "x.pem", tmp_path / "x.key")
    assert not (tmp_path / "x.pem").exists()


def test_successful_rotation_keeps_the_previous_pair(
    site: Site, installed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    dest_cert, dest_key = installed
    old_cert, old_key = dest_cert.read_bytes(), dest_key.read_bytes()
    new = certs.issue(site.ca_dir, "fw2", "server", site.out, dns=["localhost"])
    status, text, _ = run(
        capsys, "rotate", "--cert", new.cert, "--key", new.key,
        "--dest-cert", dest_cert, "--dest-key", dest_key, "--ca", site.ca,
    )  # fmt: skip
    assert status == 0 and "fw.pem.prev" in text
    assert dest_cert.read_bytes() == new.cert.read_bytes()
    assert dest_key.read_bytes() == new.key.read_bytes()
    assert Path(f"{dest_cert}.prev").read_bytes() == old_cert
    assert Path(f"{dest_key}.prev").read_bytes() == old_key
    assert mode(dest_key) == 0o600 and mode(Path(f"{dest_key}.prev")) == 0o600
    assert sorted(p.name for p in dest_cert.parent.iterdir()) == [
        "fw.key", "fw.key.prev", "fw.pem", "fw.pem.prev",
    ]  # fmt: skip


def test_an_encrypted_key_is_checked_with_its_password_and_installed_as_is(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = serialization.load_pem_private_key(site.server.key.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    (tmp_path / "pw").write_text("s3cret\n")
    dest = tmp_path / "etc"
    argv: list[str | Path] = ["--cert", site.server.cert, "--key", encrypted]
    argv += ["--dest-cert", dest / "fw.pem", "--dest-key", dest / "fw.key"]
    status, _, err = run(capsys, "install", *argv)
    assert status == 2 and "encrypted" in err and not dest.exists()
    status, _, _ = run(capsys, "install", *argv, "--key-password-file", tmp_path / "pw")
    assert status == 0 and (dest / "fw.key").read_bytes() == encrypted.read_bytes()


# --- expiry and chain checks ------------------------------------------------------------------


def test_check_exits_1_for_a_certificate_expiring_within_the_window(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = certs.issue(site.ca_dir, "soon", "client", site.out, days=10)
    status, text, _ = run(
        capsys, "check", site.server.cert, soon.cert, "--warn-days", "30", "--ca", site.ca
    )
    assert status == 1
    assert text.startswith(f"{soon.cert}: CN=soon: expires on ")
    assert "fw.pem" not in text

    status, text, _ = run(capsys, "check", site.server.cert, soon.cert, "--warn-days", "5")
    assert (status, text) == (0, "OK: 2 certificate(s) in 2 file(s) valid for more than 5 days\n")


def test_an_expired_certificate_is_reported(site: Site) -> None:
    old = certs.issue(
        site.ca_dir, "old", "client", site.out,
        not_before=datetime.now(UTC) - timedelta(days=10), days=1,
    )  # fmt: skip
    status, text = check_paths([site.client.cert, old.cert], 0, site.ca)
    assert status == 1
    assert text.startswith(f"{old.cert}: CN=old: EXPIRED on ")
    assert text.endswith(" (9 days ago)\n") and text.count("\n") == 1
    [info] = certs.inspect(old.cert, ca=site.ca)
    assert info.chain_error is not None and "expired or not yet valid" in info.chain_error
    assert [(p, i.subject) for p, i in certs.expiring([site.client.cert, old.cert], 0)] == [
        (old.cert, "CN=old")
    ]
    assert certs.inspect(old.cert)[0].days_left == -10


def test_check_reports_a_chain_to_the_wrong_ca(site: Site, tmp_path: Path) -> None:
    other = certs.init_ca(tmp_path / "hospital-ca", name="Hospital CA")
    status, text = check_paths([site.client.cert, site.ca], 30, other.cert)
    assert status == 1
    assert text == (
        f"{site.client.cert}: CN=ct01: chain check failed: not issued by the given CA"
        " (its issuer is CN=dicomfw site CA)\n"
        f"{site.ca}: CN=dicomfw site CA: chain check failed:"
        " CA certificate is not issued by the given CA\n"
    )


def test_check_of_a_missing_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "check", tmp_path / "nope.pem")
    assert (status, out) == (2, "")
    assert err == f"dicomfw certs: {tmp_path / 'nope.pem'}: No such file or directory\n"


def test_show_tells_an_admin_what_matters(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    status, text, _ = run(capsys, "show", site.client.cert, "--ca", site.ca)
    assert status == 0
    [info] = certs.inspect(site.client.cert)
    for expected in (
        "subject     CN=ct01",
        "SAN         URI:urn:dicom:ae:CT01",
        "AE binding  CT01",
        "usage       clientAuth",
        "issuer      CN=dicomfw site CA",
        f"serial      {info.serial}",
        f"SHA-256     {info.fingerprint_sha256}",
        "days left)",
        "chain       ok",
    ):
        assert expected in text


# --- revocation -------------------------------------------------------------------------------


def test_revoke_adds_serials_to_one_growing_crl(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crl_path = tmp_path / "crl.pem"
    assert (
        run(capsys, "revoke", "--ca", site.ca_dir, "--cert", site.client.cert, "--crl", crl_path)[0]
        == 0
    )
    certs.revoke(site.ca_dir, site.server.cert, crl_path)
    certs.revoke(site.ca_dir, site.server.cert, crl_path)  # again: listed once
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    ca = x509.load_pem_x509_certificate(site.ca.read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    serials = sorted(entry.serial_number for entry in crl)
    leaves = [
        x509.load_pem_x509_certificate(p.read_bytes()) for p in (site.client.cert, site.server.cert)
    ]
    assert serials == sorted(c.serial_number for c in leaves)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3


def test_revoke_refuses_a_certificate_of_another_ca(
    site: Site, other_ca: Path, tmp_path: Path
) -> None:
    with pytest.raises(certs.CertError, match="not issued by the CA"):
        certs.revoke(other_ca, site.client.cert, tmp_path / "crl.pem")
    assert not (tmp_path / "crl.pem").exists()


# --- interoperability: OpenSSL and real TLS ---------------------------------------------------


def openssl(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("openssl CLI not installed")
    return subprocess.run(
        [binary, *map(str, argv)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_openssl_accepts_the_chain_for_each_purpose(site: Site) -> None:
    for purpose, path in (("sslserver", site.server.cert), ("sslclient", site.client.cert)):
        result = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", site.ca, path)
        assert result.returncode == 0, result.stdout + result.stderr
    wrong = openssl("verify", "-purpose", "sslserver", "-CAfile", site.ca, site.client.cert)
    assert wrong.returncode != 0  # a client certificate cannot serve a listener


def test_openssl_honours_the_crl(site: Site, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    certs.revoke(site.ca_dir, site.client.cert, crl)
    base = ("verify", "-crl_check", "-CAfile", site.ca, "-CRLfile", crl)
    assert openssl(*base, site.server.cert).returncode == 0
    revoked = openssl(*base, site.client.cert)
    assert revoked.returncode != 0 and "revoked" in revoked.stdout + revoked.stderr


def tls_context(purpose: ssl.Purpose, pair: certs.CertPaths, ca: Path) -> ssl.SSLContext:
    """A strict context as Python 3.13's defaults make it (VERIFY_X509_STRICT)."""
    side = (
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    context = ssl.SSLContext(side)
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(ca)
    context.load_cert_chain(pair.cert, pair.key)
    return context


@dataclass
class Handshake:
    server_saw: dict[str, object] | None = None
    server_error: OSError | None = None
    client_got: bytes | None = None
    client_error: OSError | None = None


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> Handshake:
    """One mutual-TLS exchange on 127.0.0.1, every step bounded by TIMEOUT."""
    result = Handshake()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            with server.wrap_socket(conn, server_side=True) as tls:
                result.server_saw = tls.getpeercert()  # type: ignore[assignment]
                tls.sendall(b"ok")
        except OSError as exc:  # ssl.SSLError included
            result.server_error = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
            client.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            result.client_got = tls.recv(2)
    except OSError as exc:
        result.client_error = exc
    finally:
        thread.join(TIMEOUT)
        listener.close()
    assert not thread.is_alive()
    return result


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_issued_certificates_work_for_mutual_tls(site: Site, hostname: str) -> None:
    server = tls_context(ssl.Purpose.CLIENT_AUTH, site.server, site.ca)
    client = tls_context(ssl.Purpose.SERVER_AUTH, site.client, site.ca)
    result = handshake(server, client, hostname)
    assert result.server_error is None and result.client_error is None
    assert result.client_got == b"ok"
    assert result.server_saw is not None
    assert ("URI", "urn:dicom:ae:CT01") in result.server_saw["subjectAltName"]  # type: ignore[operator]


def test_a_client_certificate_from_another_ca_is_refused(site: Site, other_ca: Path) -> None:
    stranger = certs.issue(other_ca, "ct01", "client", site.out / "stranger", ae_title="CT01")
    server = tls_context(ssl.Purpose.CLIENT_AUTH, site.server, site.ca)
    client = tls_context(ssl.Purpose.SERVER_AUTH, stranger, site.ca)
    result = handshake(server, client, "localhost")
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert result.client_got != b"ok"


def test_a_server_certificate_cannot_act_as_a_client(site: Site) -> None:
    server = tls_context(ssl.Purpose.CLIENT_AUTH, site.server, site.ca)
    client = tls_context(ssl.Purpose.SERVER_AUTH, site.server, site.ca)
    result = handshake(server, client, "localhost")
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert "unsuitable certificate purpose" in str(result.server_error)


def test_a_revoked_client_certificate_is_refused(site: Site, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    certs.revoke(site.ca_dir, site.client.cert, crl)
    server = tls_context(ssl.Purpose.CLIENT_AUTH, site.server, site.ca)
    server.load_verify_locations(crl)
    server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    client = tls_context(ssl.Purpose.SERVER_AUTH, site.client, site.ca)
    result = handshake(server, client, "localhost")
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert "revoked" in str(result.server_error)


# --- CRLs as files an admin reads, checks and renews --------------------------------------------


def test_show_reads_a_crl(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crl = tmp_path / "ca.crl"
    certs.revoke(site.ca_dir, site.client.cert, crl)
    [revoked] = certs.inspect(site.client.cert)
    status, text, err = run(capsys, "show", crl, "--ca", site.ca)
    assert (status, err) == (0, "")
    lines = text.splitlines()
    assert lines[:3] == [str(crl), "  CRL of      CN=dicomfw site CA", "  number      1"]
    assert lines[3].startswith("  this update ")
    assert lines[4].startswith("  next update ") and lines[4].endswith(" UTC (30 days left)")
    assert lines[5:7] == ["  revoked     1 serial(s)", f"              {revoked.serial} (revoked"
                          f" {lines[3].removeprefix('  this update ')})"]  # fmt: skip
    assert lines[7] == "  signature   ok"
    other = certs.init_ca(tmp_path / "other-ca").cert
    assert run(capsys, "show", crl, "--ca", other)[1].endswith(
        "  signature   FAILED: not by this CA\n"
    )


def test_check_fails_on_an_expired_crl_and_warns_before_its_next_update(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = stale_crl(site.ca_dir, tmp_path / "stale.crl", days_ago=1.2)
    status, text, _ = run(capsys, "check", stale)
    assert status == 1
    assert text.startswith(f"{stale}: CRL of CN=dicomfw site CA: EXPIRED on ")
    assert text.endswith(
        " UTC (1 day ago): a listener that loads it refuses every client certificate\n"
    )
    fresh = tmp_path / "fresh.crl"
    assert run(capsys, "crl", "--ca", site.ca_dir, "--crl", fresh, "--days", "5")[0] == 0
    status, text, _ = run(capsys, "check", fresh, site.client.cert)
    assert status == 1  # 5 days is within the CRL window of 7
    assert text.startswith(f"{fresh}: CRL of CN=dicomfw site CA: next update due on ")
    assert text.endswith(
        " UTC (5 days left): renew it (dicomfw certs crl) and reload before then\n"
    )
    status, text, _ = run(capsys, "check", fresh, site.client.cert, "--crl-warn-days", "4")
    assert (status, text) == (
        0, "OK: 1 certificate(s) and 1 CRL(s) in 2 file(s) valid for more than 30 days\n"
    )  # fmt: skip


def test_crl_renewal_keeps_what_it_lists_and_moves_its_next_update(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crl = tmp_path / "ca.crl"
    status, text, _ = run(capsys, "crl", "--ca", site.ca_dir, "--crl", crl)  # none yet: empty
    assert status == 0
    assert text.startswith(f"wrote {crl}, CRL number 1 with 0 revoked serial(s), valid until ")
    certs.revoke(site.ca_dir, site.client.cert, crl)
    before = x509.load_pem_x509_crl(crl.read_bytes())
    status, text, _ = run(capsys, "crl", "--ca", site.ca_dir, "--crl", crl, "--days", "60")
    after = x509.load_pem_x509_crl(crl.read_bytes())
    assert status == 0 and "CRL number 3 with 1 revoked serial(s)" in text
    assert [e.serial_number for e in after] == [e.serial_number for e in before]
    assert [e.revocation_date_utc for e in after] == [e.revocation_date_utc for e in before]
    assert after.next_update_utc is not None and before.next_update_utc is not None
    assert timedelta(days=29.9) < after.next_update_utc - before.next_update_utc < timedelta(30.1)
    other = certs.init_ca(tmp_path / "other-ca").cert.parent
    status, _, err = run(capsys, "crl", "--ca", other, "--crl", crl)
    assert status == 2
    assert err == f"dicomfw certs: {crl}: CRL was not signed by the CA in {other}\n"
    assert x509.load_pem_x509_crl(crl.read_bytes()) == after


def test_days_left_are_counted_as_an_admin_counts_them(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    short = certs.issue(site.ca_dir, "short", "client", site.out, days=3)
    assert run(capsys, "show", short.cert)[1].splitlines()[9].endswith(" (3 days left)")
    old = certs.issue(
        site.ca_dir, "old", "client", site.out,
        not_before=datetime.now(UTC) - timedelta(days=2), days=1,
    )  # fmt: skip
    status, text, _ = run(capsys, "check", old.cert)
    assert status == 1 and text.endswith(" UTC (1 day ago)\n")


def test_show_says_what_a_file_holds_when_it_is_no_certificate(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Never a parser's framing error: what the admin gave instead, and what to do."""
    status, out, err = run(capsys, "show", site.server.key)
    assert (status, out) == (2, "")
    assert err == f"dicomfw certs: {site.server.key}: holds a private key, not a certificate\n"
    pem = tmp_path / "ca.crl"
    certs.revoke(site.ca_dir, site.client.cert, pem)
    der = tmp_path / "ca.der"
    der.write_bytes(
        x509.load_pem_x509_crl(pem.read_bytes()).public_bytes(serialization.Encoding.DER)
    )
    status, _, err = run(capsys, "check", der)
    assert status == 2
    assert err == (
        f"dicomfw certs: {der}: is a DER CRL; OpenSSL loads PEM: openssl crl -inform DER -in"
        f" {der} -out {der}.pem\n"
    )
