"""The TLS files a rules file names, read and checked before OpenSSL loads them.

OpenSSL's own load errors name neither the file at fault nor the problem in an admin's words: a
key that belongs to another certificate is ``KEY_VALUES_MISMATCH`` reported against the
certificate, a wrong passphrase ``[SSL] PEM lib``. Reading each file with ``cryptography`` first
lets every error name the file that is wrong (certificate, key, password file, CA, CRL) and say
what is wrong with it, the same way in ``dicomfw check``, at start, at reload and in ``dicomfw
certs check --config``. OpenSSL still loads the files afterwards and stays the authority on
what a handshake accepts.

A CRL is checked for what locks every client out: once its nextUpdate has passed, OpenSSL
refuses every client certificate ("CRL has expired", RFC 5280 §6.3.3 (a)(2) lets a verifier use
only a current CRL), and a CRL that no CA of the listener issued is never found for a client's
certificate ("unable to get certificate CRL"), with the same result.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from dicomfw.errors import DicomfwError

__all__ = [
    "CRL_WARN_DAYS",
    "Pair",
    "Served",
    "TlsFileError",
    "certificates_in",
    "check_crl",
    "crl_issuer",
    "holds_crls",
    "is_ca",
    "next_update",
    "read_certificates",
    "read_crls",
    "read_pair",
    "same_public_key",
]

#: How close to its nextUpdate a CRL gets a warning (at start and reload, in ``dicomfw check``
#: and by default in ``dicomfw certs check``): CRLs are issued for days or weeks and renewed
#: well before then (daily, say, by systemd/dicomfw-crl.timer), so a window of a week is
#: news, where certificates' 30 days would flag every healthy CRL.
CRL_WARN_DAYS: Final = 7
_CRL_PEM: Final = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
#: Both PEM forms of an encrypted key carry this word: PKCS #8's "BEGIN ENCRYPTED PRIVATE KEY"
#: and the traditional "Proc-Type: 4,ENCRYPTED" header (RFC 1421).
_ENCRYPTED: Final = b"ENCRYPTED"


class TlsFileError(DicomfwError):
    """A TLS file is unusable. ``field`` is its key under ``tls:`` in the rules file (``cert``,
    ``key``, ``key_password_file``, ``ca``, ``crl``), so the caller can say which setting names
    it."""

    def __init__(self, path: Path, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True, slots=True)
class Served:
    """The certificate an endpoint presents, as the log names it after a start or reload."""

    subject: str
    sha256: str  # lower-case hex, as peers' ``fingerprint_sha256`` and the audit trail write it
    not_after: datetime

    @classmethod
    def of(cls, certificate: x509.Certificate) -> Served:
        return cls(
            certificate.subject.rfc4514_string(),
            certificate.fingerprint(hashes.SHA256()).hex(),
            certificate.not_valid_after_utc,
        )


@dataclass(frozen=True, slots=True)
class Pair:
    """A certificate chain (leaf first) with its private key, and the password that opened it
    (for OpenSSL, which loads the files again)."""

    chain: list[x509.Certificate]
    key: PrivateKeyTypes
    password: bytes | None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsFileError(path, field, f"cannot read: {error.strerror or error}") from error


def read_certificates(path: Path, field: str) -> list[x509.Certificate]:
    """Every PEM certificate in ``path``, in file order (a leaf and its chain, or CAs)."""
    return certificates_in(path, field, _read(path, field))


def certificates_in(path: Path, field: str, data: bytes) -> list[x509.Certificate]:
    """Every PEM certificate in ``data``, read from ``path``; when there is none, what the file
    holds instead, as far as it can be told (a key, a CRL, a DER certificate)."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        pass
    if b"PRIVATE KEY-----" in data:
        problem = "holds a private key, not a certificate"
    elif _CRL_PEM.search(data):
        problem = "holds a CRL, not a certificate"
    elif _parses(x509.load_der_x509_certificate, data):
        problem = (
            f"is a DER certificate; OpenSSL loads PEM: openssl x509 -inform DER -in {path}"
            f" -out {path}.pem"
        )
    else:
        problem = "holds no readable PEM certificate (-----BEGIN CERTIFICATE-----)"
    raise TlsFileError(path, field, problem)


def _parses(load: Callable[[bytes], object], data: bytes) -> bool:
    try:
        load(data)
    except ValueError:
        return False
    return True


def holds_crls(data: bytes) -> bool:
    """Whether a file's ``data`` holds CRLs (PEM, or a DER CRL) rather than certificates."""
    return bool(_CRL_PEM.search(data)) or _parses(x509.load_der_x509_crl, data)


def _password(path: Path) -> bytes:
    """The first line's worth of a password file: surrounding white space, the trailing newline
    an editor adds in particular, is not part of the password."""
    password = _read(path, "key_password_file").strip()
    if not password:
        raise TlsFileError(path, "key_password_file", "is empty")
    return password


def _private_key(path: Path, password_file: Path | None) -> tuple[PrivateKeyTypes, bytes | None]:
    """The key in ``path``, opened with the password in ``password_file`` when it is encrypted.

    A wrong password is blamed on the password file, an encrypted key without one on the key.
    """
    data = _read(path, "key")
    encrypted = _ENCRYPTED in data
    if encrypted and password_file is None:
        raise TlsFileError(
            path, "key", "is encrypted: give key_password_file, a file holding its password"
        )
    password = _password(password_file) if encrypted and password_file is not None else None
    try:
        return serialization.load_pem_private_key(data, password), password
    except UnsupportedAlgorithm as error:
        raise TlsFileError(
            path, "key", f"holds a key of a type that cannot be used: {error}"
        ) from error
    except (ValueError, TypeError) as error:
        if password_file is not None and password is not None:
            raise TlsFileError(
                password_file,
                "key_password_file",
                f"does not open the key {path} (a wrong password, or a damaged key file)",
            ) from error
        raise TlsFileError(
            path, "key", "holds no readable PEM private key (-----BEGIN PRIVATE KEY-----)"
        ) from error


def same_public_key(certificate: x509.Certificate, key: PrivateKeyTypes) -> bool:
    """Whether ``key`` is the private half of the key ``certificate`` certifies."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    mine: bytes = key.public_key().public_bytes(der, spki)
    return mine == certificate.public_key().public_bytes(der, spki)


def is_ca(certificate: x509.Certificate) -> bool:
    """basicConstraints cA (RFC 5280 §4.2.1.9): a certificate that signs others."""
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def read_pair(cert: Path, key: Path, password_file: Path | None) -> Pair:
    """The certificate an endpoint presents and its private key, checked to belong together.

    A CA certificate is allowed (a self-signed server certificate often has basicConstraints
    cA), but when the key does not match one, the likely mistake is named: the CA file given
    as ``cert``.
    """
    chain = read_certificates(cert, "cert")
    private, password = _private_key(key, password_file)
    if not same_public_key(chain[0], private):
        hint = (
            f"; {cert} holds a CA certificate, {chain[0].subject.rfc4514_string()}: is it the CA"
            " file given as cert?"
            if is_ca(chain[0])
            else ""
        )
        raise TlsFileError(
            key,
            "key",
            f"does not belong to the certificate {cert} (their public keys differ: a key of"
            f" another certificate, or a certificate renewed with a new key?){hint}",
        )
    return Pair(chain, private, password)


def _crl_blocks(path: Path, data: bytes) -> list[bytes]:
    """The PEM CRLs in ``data``; a DER CRL gets the command that converts it."""
    blocks: list[bytes] = _CRL_PEM.findall(data)
    if blocks:
        return blocks
    if not _parses(x509.load_der_x509_crl, data):
        raise TlsFileError(path, "crl", "holds no PEM CRL (-----BEGIN X509 CRL-----)")
    raise TlsFileError(
        path,
        "crl",
        f"is a DER CRL; OpenSSL loads PEM: openssl crl -inform DER -in {path} -out {path}.pem",
    )


def read_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Every PEM CRL in ``path``, in file order."""
    crls = []
    for block in _crl_blocks(path, _read(path, "crl")):
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError as error:
            raise TlsFileError(
                path, "crl", "holds a damaged CRL (its PEM does not decode)"
            ) from error
    return crls


def crl_issuer(
    crl: x509.CertificateRevocationList, cas: list[x509.Certificate]
) -> x509.Certificate | None:
    """The CA among ``cas`` that issued and signed ``crl`` (RFC 5280 §6.3.3 (f)), if any."""
    for ca in cas:
        if ca.subject != crl.issuer:
            continue
        try:
            if crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return ca
        except TypeError:  # a key type that cannot sign (X25519, X448)
            continue
    return None


def check_crl(
    path: Path,
    crl: x509.CertificateRevocationList,
    cas: list[x509.Certificate],
    ca_path: Path,
    now: datetime,
) -> None:
    """Raise TlsFileError when OpenSSL would refuse every client because of ``crl``: it has
    expired, is not valid yet, or no CA in ``ca_path`` issued it."""
    issuer = crl.issuer.rfc4514_string()
    if crl_issuer(crl, cas) is None:
        raise TlsFileError(
            path,
            "crl",
            f"was not issued by a CA in {ca_path} (its issuer is {issuer}, or its signature"
            " does not verify): OpenSSL would find no CRL for the clients' certificates and"
            " refuse them all",
        )
    if crl.last_update_utc > now:
        raise TlsFileError(
            path,
            "crl",
            f"is not valid before {crl.last_update_utc:%Y-%m-%d %H:%M} UTC (thisUpdate; is a"
            " clock wrong?): OpenSSL refuses every client certificate until then",
        )
    next_update = crl.next_update_utc
    if next_update is not None and next_update <= now:
        raise TlsFileError(
            path,
            "crl",
            f"expired on {next_update:%Y-%m-%d %H:%M} UTC (nextUpdate of the CRL of {issuer}):"
            " OpenSSL refuses every client certificate while it is loaded. Renew it (dicomfw"
            " certs crl --ca CA_DIR --crl FILE, or fetch a current one from the CA) and reload",
        )


def next_update(crls: list[x509.CertificateRevocationList]) -> datetime | None:
    """The soonest nextUpdate among ``crls`` (None: none of them has one)."""
    return min((c.next_update_utc for c in crls if c.next_update_utc is not None), default=None)
