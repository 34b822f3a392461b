"""Every TLS file the rules name is read before OpenSSL loads it, and a bad one is named with what
is wrong with it: in `dicomfw check`, at start (`dicomfw run`) and at reload, as an admin meets
them (the CLI as a subprocess, the daemon's log)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomfw.service.daemon import reload
from tests.harness import Pki, free_port, rules, running_firewall
from tests.opshelpers import dicomfw
from tests.pkihelpers import encrypted_key, stale_crl

#: A case: edits the rules text of ``rules(pki, ..., listener_tls=True)`` (files it made in the
#: directory it is given) and returns the edited rules and the error line `check` must print.
Case = Callable[[Path, Pki, str], tuple[str, str]]


def another_pairs_key(key: Path, setting: str, cert: Path) -> str:
    """The error line for ``key``, named at ``setting``, that is not ``cert``'s."""
    return (
        f"{key}: {setting}: does not belong to the certificate {cert} (their public keys differ:"
        " a key of another certificate, or a certificate renewed with a new key?)"
    )


def key_of_another_pair(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    edited = text.replace(f"key: {pki.fw_server.key}", f"key: {pki.pacs.key}")
    return edited, another_pairs_key(pki.pacs.key, "listeners.front.tls.key", pki.fw_server.cert)


def encrypted_key_without_password(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    key = encrypted_key(pki.fw_server.key, tmp / "fw.key", b"s3cret")
    return text.replace(f"key: {pki.fw_server.key}", f"key: {key}"), (
        f"{key}: listeners.front.tls.key: is encrypted: give key_password_file, a file holding"
        " its password"
    )


def wrong_password(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    key = encrypted_key(pki.fw_server.key, tmp / "fw.key", b"s3cret")
    (tmp / "fw.pass").write_text("secret\n")
    edited = text.replace(
        f"key: {pki.fw_server.key}", f"key: {key}, key_password_file: {tmp / 'fw.pass'}"
    )
    return edited, (
        f"{tmp / 'fw.pass'}: listeners.front.tls.key_password_file: does not open the key {key}"
        " (a wrong password, or a damaged key file)"
    )


def ca_as_certificate(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    edited = text.replace(f"cert: {pki.fw_server.cert}", f"cert: {pki.ca}")
    return edited, another_pairs_key(pki.fw_server.key, "listeners.front.tls.key", pki.ca) + (
        f"; {pki.ca} holds a CA certificate, CN=dicomfw site CA: is it the CA file given as cert?"
    )


def key_as_ca(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    listener_ca = f"key: {pki.fw_server.key}, ca: {pki.ca}"
    edited = text.replace(listener_ca, f"key: {pki.fw_server.key}, ca: {pki.fw_server.key}")
    return edited, (
        f"{pki.fw_server.key}: listeners.front.tls.ca: holds a private key, not a certificate"
    )


def expired_crl(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    crl = stale_crl(pki.ca_dir, tmp / "ca.crl")
    when = crl_next_update(crl)
    return with_crl(text, pki, crl), (
        f"{crl}: listeners.front.tls.crl: expired on {when} UTC (nextUpdate of the CRL of"
        " CN=dicomfw site CA): OpenSSL refuses every client certificate while it is loaded."
        " Renew it (dicomfw certs crl --ca CA_DIR --crl FILE, or fetch a current one from the"
        " CA) and reload"
    )


def crl_of_another_ca(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    crl = tmp / "other.crl"
    assert (
        dicomfw("certs", "crl", "--ca", pki.ca_dir.parent / "other-ca", "--crl", crl).returncode
        == 0
    )
    return with_crl(text, pki, crl), (
        f"{crl}: listeners.front.tls.crl: was not issued by a CA in {pki.ca} (its issuer is"
        " CN=somebody else's CA, or its signature does not verify): OpenSSL would find no CRL"
        " for the clients' certificates and refuse them all"
    )


def der_crl(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = tmp / "ca.crl.pem"
    assert dicomfw("certs", "crl", "--ca", pki.ca_dir, "--crl", pem).returncode == 0
    der = tmp / "ca.crl"
    crl = x509.load_pem_x509_crl(pem.read_bytes())
    der.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    return with_crl(text, pki, der), (
        f"{der}: listeners.front.tls.crl: is a DER CRL; OpenSSL loads PEM: openssl crl -inform"
        f" DER -in {der} -out {der}.pem"
    )


def upstream_key_of_another_pair(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    edited = text.replace(f"key: {pki.fw_client.key}", f"key: {pki.modality.key}")
    return edited, another_pairs_key(pki.modality.key, "upstreams.pacs.tls.key", pki.fw_client.cert)


def atna_key_of_another_pair(tmp: Path, pki: Pki, text: str) -> tuple[str, str]:
    atna = (
        f"audit: {{atna: {{host: 127.0.0.1, transport: tls, ca: {pki.ca},"
        f" cert: {pki.fw_client.cert}, key: {pki.pacs.key}}}}}\n"
    )
    return text + atna, another_pairs_key(pki.pacs.key, "audit.atna.key", pki.fw_client.cert)


def crl_next_update(path: Path) -> str:
    from cryptography import x509

    when = x509.load_pem_x509_crl(path.read_bytes()).next_update_utc
    assert when is not None
    return f"{when:%Y-%m-%d %H:%M}"


def with_crl(text: str, pki: Pki, crl: Path) -> str:
    listener_ca = f"key: {pki.fw_server.key}, ca: {pki.ca}"
    return text.replace(listener_ca, f"{listener_ca}, crl: {crl}")


CASES: dict[str, Case] = {
    "key of another pair": key_of_another_pair,
    "encrypted key without a password file": encrypted_key_without_password,
    "wrong password": wrong_password,
    "CA certificate as the certificate": ca_as_certificate,
    "key as the CA file": key_as_ca,
    "expired CRL": expired_crl,
    "CRL of another CA": crl_of_another_ca,
    "DER CRL": der_crl,
    "upstream key of another pair": upstream_key_of_another_pair,
    "ATNA collector key of another pair": atna_key_of_another_pair,
}


@pytest.mark.parametrize("case", CASES)
def test_check_names_the_tls_file_at_fault_and_what_is_wrong(
    tmp_path: Path, pki: Pki, case: str
) -> None:
    path = tmp_path / "rules.yaml"
    text, expected = CASES[case](tmp_path, pki, rules(pki, 11112, listener_tls=True))
    path.write_text(text)
    result = dicomfw("check", "--config", path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [expected, "dicomfw: 1 error(s); nothing was started"]


def test_the_daemon_does_not_start_with_an_expired_crl(tmp_path: Path, pki: Pki) -> None:
    text, expected = expired_crl(tmp_path, pki, rules(pki, 11112, listener_tls=True))
    path = tmp_path / "rules.yaml"
    path.write_text(text.replace('"127.0.0.1:0"', f'"127.0.0.1:{free_port()}"'))
    result = dicomfw("run", "--config", path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [expected, "dicomfw: 1 error(s); nothing was started"]


def test_a_reload_with_an_expired_crl_fails_naming_it_and_keeps_serving(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    good = rules(pki, 11112, listener_tls=True)
    with running_firewall(tmp_path, good) as firewall:
        text, expected = expired_crl(tmp_path, pki, good)
        (tmp_path / "rules.yaml").write_text(text)
        assert not firewall.call(lambda: reload(firewall.relay, tmp_path / "rules.yaml"))
    assert f'event=reload_failed error="{expected}"' in caplog.text


def test_check_warns_of_a_crl_near_its_next_update_and_still_passes(
    tmp_path: Path, pki: Pki
) -> None:
    crl = tmp_path / "ca.crl"
    assert dicomfw("certs", "crl", "--ca", pki.ca_dir, "--crl", crl, "--days", "3").returncode == 0
    path = tmp_path / "rules.yaml"
    path.write_text(with_crl(rules(pki, 11112, listener_tls=True), pki, crl))
    result = dicomfw("check", "--config", path)
    assert result.returncode == 0 and result.stdout.endswith(f"{path}: OK\n")
    assert result.stderr == (
        f"warning: {crl}: listeners.front.tls.crl: next update due on {crl_next_update(crl)} UTC:"
        " renew it (dicomfw certs crl) and reload before then, or the listener refuses every"
        " client certificate\n"
    )


def test_a_self_signed_server_certificate_from_openssl_req_still_loads(
    tmp_path: Path, pki: Pki
) -> None:
    """`openssl req -x509` marks its certificate a CA (basicConstraints cA): sites that pin
    such a certificate keep working; only a key that does not match is an error."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed")
    cert, key = tmp_path / "self.pem", tmp_path / "self.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=fw", "-days", "30"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    text = rules(pki, 11112, listener_tls=True)
    text = text.replace(f"cert: {pki.fw_server.cert}", f"cert: {cert}")
    path = tmp_path / "rules.yaml"
    path.write_text(text.replace(f"key: {pki.fw_server.key}", f"key: {key}"))
    result = dicomfw("check", "--config", path)
    assert (result.returncode, result.stderr) == (0, "")
