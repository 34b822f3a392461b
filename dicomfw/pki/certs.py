"""The certificate life cycle for a site: a small CA, leaf certificates, CSRs, CRLs, rotation.

The DICOM BCP 195 TLS profiles (PS3.15 Annex B) ask for mutual TLS between DICOM nodes with X.509
certificates (RFC 5280). Most hospitals have no PKI tooling at the DICOM edge, so this module
gives network admins the few operations they need, with safe defaults:

* ``init_ca`` — a site CA that can sign leaf certificates only (``pathLenConstraint`` 0).
* ``issue`` — server certificates (listeners) and client certificates (upstream connections,
  remote sites), optionally *bound to a DICOM AE title* with a URI SAN ``urn:dicom:ae:<AE>``.
* ``make_csr`` — a key and request for sites that sign with their own PKI.
* ``revoke`` — a CRL (RFC 5280 §5) the daemon loads to refuse a lost or retired peer.
* ``install`` — rotation: verify a new pair, then atomically replace the files the daemon loads.
* ``inspect`` / ``expiring`` — what a file holds and when it runs out.

This is an edge module: stdlib and ``cryptography`` only, no asyncio. Private keys are written
unencrypted (the daemon starts unattended) with mode 0600 from the moment they are created.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from dicomfw.errors import DicomfwError
from dicomfw.relay.tlsfiles import (
    TlsFileError,
    certificates_in,
    crl_issuer,
    holds_crls,
    is_ca,
    read_crls,
    read_pair,
    same_public_key,
)

__all__ = [
    "AE_URI_PREFIX",
    "CertError",
    "CertInfo",
    "CertPaths",
    "CsrPaths",
    "InstalledPair",
    "ae_binding_uri",
    "ae_from_uri",
    "expiring",
    "init_ca",
    "inspect",
    "install",
    "issue",
    "make_csr",
    "revoke",
]

#: The URI SAN prefix that binds a certificate to a DICOM AE title (dicomfw's convention; the
#: AE title is percent-encoded as in RFC 3986 so an AE with an inner space stays a valid URI).
AE_URI_PREFIX: Final = "urn:dicom:ae:"

#: Issued certificates start this much in the past so a peer whose clock runs a little behind
#: does not refuse a certificate issued a moment ago.
CLOCK_SKEW: Final = timedelta(minutes=5)

CA_CERT_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca.key"
KEY_MODE: Final = 0o600
CERT_MODE: Final = 0o644

_EKU_NAMES: Final[dict[x509.ObjectIdentifier, str]] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CertError(DicomfwError):
    """A certificate operation failed; ``path`` names the file at fault when there is one."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)


@dataclass(frozen=True)
class CertPaths:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CsrPaths:
    """Where a certificate signing request (PKCS #10, RFC 2986) and its key were written."""

    csr: Path
    key: Path


@dataclass(frozen=True)
class InstalledPair:
    """The installed pair, and the backups of the pair it replaced (None on a first install)."""

    cert: Path
    key: Path
    previous_cert: Path | None
    previous_key: Path | None


@dataclass(frozen=True)
class CertInfo:
    """What an admin needs to know about one certificate (RFC 5280 §4.1 fields, decoded).

    ``days_left`` is rounded down and negative once the certificate has expired.
    ``chain_ok`` is None when no CA was given; ``chain_error`` says why the chain failed.
    """

    subject: str
    issuer: str
    serial: str
    fingerprint_sha256: str
    fingerprint_sha256_hex: str
    not_before: datetime
    not_after: datetime
    days_left: int
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    uris: tuple[str, ...]
    ae_binding: tuple[str, ...]
    extended_key_usage: tuple[str, ...]
    key_type: str
    key_size: int
    is_ca: bool
    chain_ok: bool | None
    chain_error: str | None

    def expires_within(self, days: int, now: datetime) -> bool:
        """True when the certificate has expired at ``now`` or will within ``days``."""
        return self.not_after <= now + timedelta(days=days)


@dataclass(frozen=True)
class CrlInfo:
    """What an admin needs to know about one CRL (RFC 5280 §5.1 fields, decoded).

    ``revoked`` holds (serial as ``openssl crl`` prints it, revocation date). ``issuer_ok`` is
    None when no CA was given, else whether a CA given issued and signed the CRL.
    """

    issuer: str
    number: int | None
    this_update: datetime
    next_update: datetime | None
    revoked: tuple[tuple[str, datetime], ...]
    issuer_ok: bool | None

    def days_left(self, now: datetime) -> int | None:
        """Whole days until nextUpdate, rounded down; negative once it has passed."""
        if self.next_update is None:
            return None
        return (self.next_update - now) // timedelta(days=1)


# --- AE title binding -------------------------------------------------------------------------


def _check_ae_title(ae_title: str) -> str:
    """Return the AE title without its insignificant spaces, or raise CertError.

    PS3.5 §6.2 (VR AE): at most 16 characters of the default repertoire, no backslash and no
    control characters; leading and trailing spaces are not significant; all-space is empty.
    """
    ae = ae_title.strip(" ")
    if not 1 <= len(ae) <= 16:
        raise CertError(f"AE title {ae_title!r} must be 1 to 16 characters (PS3.5 §6.2)")
    if any(not (0x20 <= ord(c) <= 0x7E) or c == "\\" for c in ae):
        raise CertError(
            f"AE title {ae_title!r} may hold only printable ASCII without backslash (PS3.5 §6.2)"
        )
    return ae


def ae_binding_uri(ae_title: str) -> str:
    """The URI SAN that binds a certificate to ``ae_title``: ``urn:dicom:ae:<AE>``.

    A SAN is the place RFC 5280 §4.2.1.6 gives for identities beyond the subject name, and a
    URI keeps the binding apart from DNS names, which the TLS hostname check uses.
    """
    return AE_URI_PREFIX + quote(_check_ae_title(ae_title), safe="")


def ae_from_uri(uri: str) -> str | None:
    """The AE title a URI SAN binds to, or None when it is no valid ``urn:dicom:ae:`` URI.

    The ``urn:`` scheme and namespace are case-insensitive (RFC 8141); the AE is not.
    """
    if not uri.lower().startswith(AE_URI_PREFIX):
        return None
    ae = unquote(uri[len(AE_URI_PREFIX) :])
    try:
        return _check_ae_title(ae) if ae == ae.strip(" ") else None
    except CertError:
        return None


# --- files ------------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertError(exc.strerror or str(exc), path) from exc


@contextlib.contextmanager
def _file_errors() -> Iterator[None]:
    """A ``tlsfiles`` reader's error as a CertError on the same file."""
    try:
        yield
    except TlsFileError as exc:
        raise CertError(exc.message, exc.path) from exc


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a new temporary file next to ``path``, created with ``mode``, fsynced.

    Creating the file with its final mode (never chmod afterwards) means a private key is not
    readable by others for even a moment.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _ensure_dir(directory: Path, mode: int) -> None:
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(f"cannot create the directory: {exc.strerror or exc}", directory) from exc


def _write_files(files: Sequence[tuple[Path, bytes, int]], *, overwrite: bool) -> None:
    """Write every ``(path, data, mode)``, each by an atomic ``os.replace``, in the given order.

    Nothing is replaced until every file is staged, so a full disk or a bad directory leaves
    the old files as they were. Without ``overwrite`` an existing file stops everything first.
    """
    if not overwrite:
        for path, _, _ in files:
            if path.exists():
                raise CertError("already exists (use --force to replace it)", path)
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            try:
                staged.append((_stage(path, data, mode), path))
            except OSError as exc:
                raise CertError(f"cannot write: {exc.strerror or exc}", path) from exc
        for tmp, path in staged:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise CertError(f"cannot replace: {exc.strerror or exc}", path) from exc
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for directory in {path.parent for _, path in staged}:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_certs(path: Path) -> list[x509.Certificate]:
    data = _read(path)
    with _file_errors():
        return certificates_in(path, "cert", data)


def _load_key(path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertError(f"cannot load the private key: {exc}", path) from exc


# --- building blocks --------------------------------------------------------------------------


def _new_key(key_type: str) -> SigningKey:
    """EC P-256 or RSA 3072: both meet BCP 195 (RFC 9325) and NIST's 128-bit level."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise CertError(f"unknown key type {key_type!r} (use 'ec' or 'rsa')")


def _check_name(name: str) -> None:
    """A name is the subject CN and the file stem, so it must suit both.

    RFC 5280 Appendix A bounds a common name at 64 characters.
    """
    if not 1 <= len(name) <= 64:
        raise CertError(f"name {name!r} must be 1 to 64 characters (RFC 5280 ub-common-name)")
    if name.startswith(".") or any(c in name for c in "/\\\0") or not name.isprintable():
        raise CertError(f"name {name!r} must be a plain file name (no '/', no leading '.')")


def _check_days(days: int) -> None:
    if days < 1:
        raise CertError(f"validity must be at least 1 day, not {days}")


def _is_dns_name(name: str) -> bool:
    """A SAN dNSName is an IA5String (RFC 5280 §4.2.1.6); 253 characters is DNS's own limit."""
    return 1 <= len(name) <= 253 and name.isascii() and name.isprintable() and " " not in name


def _subject(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _general_names(
    dns: Sequence[str], ips: Sequence[str], ae_title: str | None
) -> list[x509.GeneralName]:
    """The SAN entries (RFC 5280 §4.2.1.6): DNS names, IP addresses, the AE binding URI."""
    names: list[x509.GeneralName] = []
    for dns_name in dns:
        if not _is_dns_name(dns_name):
            raise CertError(f"DNS name {dns_name!r} must be 1 to 253 ASCII characters, no spaces")
        names.append(x509.DNSName(dns_name))
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise CertError(f"{ip!r} is not an IP address") from exc
    if ae_title is not None:
        names.append(x509.UniformResourceIdentifier(ae_binding_uri(ae_title)))
    return names


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI (RFC 5280 §4.2.1.1) copies the CA's SKI, which is what OpenSSL matches on."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_public_signing_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _public_signing_key(
    cert: x509.Certificate,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CertError(f"CA key type {type(key).__name__} is not supported (EC or RSA only)")
    return key


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, SigningKey]:
    """Load ``ca.pem`` and ``ca.key`` from ``ca_dir`` and check they belong together."""
    cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    ca_cert = _load_certs(cert_path)[0]
    ca_key = _load_key(key_path)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertError("CA key must be EC or RSA", key_path)
    if not same_public_key(ca_cert, ca_key):
        raise CertError(f"key does not match the CA certificate {cert_path}", key_path)
    if not is_ca(ca_cert):
        raise CertError("not a CA certificate (basicConstraints cA is not set)", cert_path)
    return ca_cert, ca_key


# --- operations -------------------------------------------------------------------------------


def _save_pair(
    paths: CertPaths, key: SigningKey, cert: x509.Certificate, dir_mode: int, force: bool
) -> CertPaths:
    """Write a new key (0600) and its certificate together, refusing to overwrite unless forced."""
    _ensure_dir(paths.cert.parent, dir_mode)
    _write_files(
        [(paths.key, _key_pem(key), KEY_MODE), (paths.cert, _cert_pem(cert), CERT_MODE)],
        overwrite=force,
    )
    return paths


def init_ca(
    directory: Path,
    name: str = "dicomfw site CA",
    days: int = 3650,
    key_type: str = "ec",
    force: bool = False,
) -> CertPaths:
    """Create a self-signed site CA in ``directory`` (``ca.pem``, ``ca.key`` with mode 0600).

    Why these extensions (RFC 5280 §4.2.1): basicConstraints cA with pathLenConstraint 0,
    critical, so the CA can sign leaf certificates but no sub-CA; keyUsage keyCertSign and
    cRLSign, critical, so its key signs certificates and CRLs and nothing else (no TLS); and a
    subjectKeyIdentifier, which the leaves' authorityKeyIdentifier points at for path building.
    """
    if not 1 <= len(name) <= 64:
        raise CertError(f"CA name {name!r} must be 1 to 64 characters (RFC 5280 ub-common-name)")
    _check_days(days)
    key = _new_key(key_type)
    now = datetime.now(UTC)
    subject = _subject(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _save_pair(
        CertPaths(cert=directory / CA_CERT_FILE, key=directory / CA_KEY_FILE),
        key,
        cert,
        0o700,
        force,
    )


def issue(
    ca_dir: Path,
    name: str,
    kind: Literal["server", "client"],
    out_dir: Path,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    ae_title: str | None = None,
    days: int = 825,
    key_type: str = "ec",
    force: bool = False,
    not_before: datetime | None = None,
) -> CertPaths:
    """Issue a TLS leaf certificate signed by the CA in ``ca_dir``: ``<name>.pem``/``.key``.

    A server certificate (a dicomfw listener, a PACS) carries extendedKeyUsage serverAuth and,
    by default, the SAN DNS name ``name`` that TLS clients check (RFC 6125). A client
    certificate (a modality, a remote site, dicomfw toward a PACS) carries clientAuth. BCP 195
    peers check these purposes, so one certificate per role keeps each usable only for it.
    ``ae_title`` adds the URI SAN ``urn:dicom:ae:<AE>`` that binds the certificate to a DICOM
    AE title. keyUsage is digitalSignature (plus keyEncipherment for RSA key transport),
    critical (RFC 5280 §4.2.1.3). 825 days is the longest lifetime macOS and iOS accept for
    any TLS server certificate, private CAs included. The serial is 159 random bits (RFC 5280
    §4.1.2.2: positive, at most 20 octets, unpredictable).
    ``not_before`` back-dates the certificate, e.g. to produce an expired one for tests.
    """
    if kind not in ("server", "client"):
        raise CertError(f"kind must be 'server' or 'client', not {kind!r}")
    _check_name(name)
    _check_days(days)
    if kind == "server" and not dns and not ips:
        if not _is_dns_name(name):
            raise CertError(f"name {name!r} is no DNS name: give the server's DNS names or IPs")
        dns = (name,)
    sans = _general_names(dns, ips, ae_title)
    ca_cert, ca_key = _load_ca(ca_dir)
    now = datetime.now(UTC)
    start = not_before if not_before is not None else now - CLOCK_SKEW
    end = start + timedelta(days=days)
    if not ca_cert.not_valid_before_utc <= now <= ca_cert.not_valid_after_utc:
        raise CertError("the CA certificate is not valid now", ca_dir / CA_CERT_FILE)
    if end > ca_cert.not_valid_after_utc:
        raise CertError(
            f"the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before this certificate"
            f" would ({end:%Y-%m-%d}); issue for fewer days or renew the CA",
            ca_dir / CA_CERT_FILE,
        )
    key = _new_key(key_type)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _save_pair(
        CertPaths(cert=out_dir / f"{name}.pem", key=out_dir / f"{name}.key"),
        key,
        cert,
        0o755,
        force,
    )


def make_csr(
    name: str,
    out_dir: Path,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    ae_title: str | None = None,
    key_type: str = "ec",
    force: bool = False,
) -> CsrPaths:
    """Write a new key and a PKCS #10 request (RFC 2986) for a site that signs with its own PKI.

    The request carries subject CN ``name`` and the SANs (including the AE binding URI) so the
    site CA can copy them; the key never leaves this machine.
    """
    _check_name(name)
    sans = _general_names(dns, ips, ae_title)
    key = _new_key(key_type)
    builder = x509.CertificateSigningRequestBuilder().subject_name(_subject(name))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    paths = CsrPaths(csr=out_dir / f"{name}.csr", key=out_dir / f"{name}.key")
    _ensure_dir(out_dir, 0o755)
    _write_files(
        [
            (paths.key, _key_pem(key), KEY_MODE),
            (paths.csr, csr.public_bytes(serialization.Encoding.PEM), CERT_MODE),
        ],
        overwrite=force,
    )
    return paths


def _crl_entries(
    crl_path: Path, ca_dir: Path, ca_cert: x509.Certificate
) -> tuple[list[x509.RevokedCertificate], int]:
    """What the CA's CRL at ``crl_path`` lists and its cRLNumber (none and 0 when missing)."""
    if not crl_path.exists():
        return [], 0
    with _file_errors():
        old = read_crls(crl_path)[0]
    if crl_issuer(old, [ca_cert]) is None:
        raise CertError(f"CRL was not signed by the CA in {ca_dir}", crl_path)
    numbers = [e.value.crl_number for e in old.extensions if isinstance(e.value, x509.CRLNumber)]
    return list(old), max(numbers, default=0)


def _issue_crl(
    ca: tuple[x509.Certificate, SigningKey],
    ca_dir: Path,
    crl_path: Path,
    days: int,
    revoke: x509.Certificate | None = None,
) -> CrlInfo:
    """Sign the CA's CRL anew: what it listed (plus ``revoke``), a cRLNumber one higher
    (RFC 5280 §5.2.3), the authorityKeyIdentifier naming the CA (§5.2.1), and a nextUpdate
    ``days`` from now; then replace ``crl_path`` atomically."""
    _check_days(days)
    ca_cert, ca_key = ca
    now = datetime.now(UTC)
    revoked, crl_number = _crl_entries(crl_path, ca_dir, ca_cert)
    if revoke is not None and all(e.serial_number != revoke.serial_number for e in revoked):
        revoked.append(
            x509.RevokedCertificateBuilder()
            .serial_number(revoke.serial_number)
            .revocation_date(now)
            .build()
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(crl_number + 1), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_files(
        [(crl_path, crl.public_bytes(serialization.Encoding.PEM), CERT_MODE)], overwrite=True
    )
    return describe_crl(crl, [ca_cert])


def revoke(ca_dir: Path, cert_path: Path, crl_path: Path, days: int = 30) -> CrlInfo:
    """Add the certificate's serial to the CA's CRL at ``crl_path`` (created when missing).

    A CRL (RFC 5280 §5) is how a TLS peer learns that a certificate it would otherwise accept
    (a stolen laptop, a retired modality) must be refused. Earlier entries are kept (a serial
    already listed is kept once). The CRL is valid for ``days``: peers that check CRLs refuse
    *every* certificate once nextUpdate has passed, so ``renew_crl`` must run before then.
    """
    ca = _load_ca(ca_dir)
    cert = _load_certs(cert_path)[0]
    try:
        cert.verify_directly_issued_by(ca[0])
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertError(f"not issued by the CA in {ca_dir}", cert_path) from exc
    return _issue_crl(ca, ca_dir, crl_path, days, cert)


def renew_crl(ca_dir: Path, crl_path: Path, days: int = 30) -> CrlInfo:
    """Issue the CA's CRL again with what it lists and a new nextUpdate ``days`` from now, or
    an empty one when ``crl_path`` does not exist yet: for cron or a systemd timer, well before
    nextUpdate (a listener that loaded an expired CRL refuses every client)."""
    return _issue_crl(_load_ca(ca_dir), ca_dir, crl_path, days)


#: What a certificate is for, by the role its endpoint plays in the handshake.
_PURPOSE: Final = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
}
_ROLE_HINT: Final = {
    "server": "a listener presents it to its clients: issue one with --kind server",
    "client": "dicomfw presents it to an upstream: issue one with --kind client",
}


def role_problem(cert: x509.Certificate, presents: str) -> str | None:
    """Why ``cert`` cannot be the certificate a TLS ``presents`` ("server": a listener's,
    "client": the one dicomfw shows an upstream), or None when it can.

    RFC 5280 §4.2.1.12: an extendedKeyUsage must list the purpose (or anyExtendedKeyUsage);
    without one any purpose goes. §4.2.1.3: a keyUsage must allow digitalSignature, since with
    BCP 195's ECDHE suites and in TLS 1.3 (RFC 8446 §4.4.3) the certificate's key signs the
    handshake. OpenSSL refuses such a certificate in the peer's handshake, not when it loads.
    """
    wanted = _PURPOSE[presents]
    try:
        purposes = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        purposes = [wanted]
    if not {wanted, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(purposes):
        names = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in purposes)
        return (
            f"its extendedKeyUsage ({names}) does not allow {_EKU_NAMES[wanted]}"
            f" ({_ROLE_HINT[presents]})"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not usage.digital_signature:
        return "its keyUsage does not allow digitalSignature, which TLS needs to sign the handshake"
    return None


def install(
    cert: Path,
    key: Path,
    dest_cert: Path,
    dest_key: Path,
    ca: Path | None = None,
    key_password_file: Path | None = None,
    presents: str | None = None,
) -> InstalledPair:
    """Rotate: check a new certificate/key pair, then atomically put it where the daemon reads.

    Checked before anything is written: the key belongs to the certificate (the first one in
    ``cert``; any following ones are intermediates), the certificate is valid now, given
    ``presents`` ("server" for a listener, "client" for an upstream) it is fit for that role
    (``role_problem``), and given ``ca`` it chains to that CA as a TLS peer would check it
    (RFC 5280 §6 path validation). Each destination is replaced by ``os.replace`` of an
    fsynced file in the same directory (the key created 0600), so the daemon never reads half
    a file; the pair it replaces is kept as ``<dest>.prev``. Reload the daemon afterwards; it
    keeps its old context when the new pair fails to load. The files are copied byte for byte:
    an encrypted key stays encrypted, ``key_password_file`` only opens it for the check.
    """
    if dest_cert == dest_key:
        raise CertError("the certificate and the key need separate destination files", dest_key)
    cert_bytes, key_bytes = _read(cert), _read(key)
    with _file_errors():
        chain = read_pair(cert, key, key_password_file).chain
    leaf = chain[0]
    now = datetime.now(UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise CertError(
            f"certificate is not valid now (valid {leaf.not_valid_before_utc:%Y-%m-%d %H:%M}"
            f" to {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)",
            cert,
        )
    problem = role_problem(leaf, presents) if presents is not None else None
    if problem is not None:
        raise CertError(f"not a {presents} certificate: {problem}", cert)
    if ca is not None:
        problem = chain_problem(leaf, chain[1:], _load_certs(ca), now)
        if problem is not None:
            raise CertError(f"does not chain to {ca}: {problem}", cert)
    files: list[tuple[Path, bytes, int]] = []
    previous: dict[Path, Path] = {}
    for dest, mode in ((dest_cert, CERT_MODE), (dest_key, KEY_MODE)):
        _ensure_dir(dest.parent, 0o755)
        if dest.exists():
            previous[dest] = dest.with_name(dest.name + ".prev")
            files.append((previous[dest], _read(dest), mode))
    files += [(dest_key, key_bytes, KEY_MODE), (dest_cert, cert_bytes, CERT_MODE)]
    _write_files(files, overwrite=True)
    return InstalledPair(dest_cert, dest_key, previous.get(dest_cert), previous.get(dest_key))


# --- inspection -------------------------------------------------------------------------------


def _tls_purpose(
    _policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
) -> None:
    """Accept a leaf for either TLS role: a dicomfw pair may serve a listener or an upstream.

    No extendedKeyUsage means any purpose (RFC 5280 §4.2.1.12).
    """
    if eku is not None and not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(eku):
        raise ValueError("extendedKeyUsage allows neither serverAuth nor clientAuth")


def chain_problem(
    cert: x509.Certificate,
    untrusted: list[x509.Certificate],
    anchors: list[x509.Certificate],
    now: datetime,
) -> str | None:
    """Why ``cert`` does not chain to one of ``anchors`` at ``now``, or None when it does.

    Leaves go through cryptography's RFC 5280 path validation with the Web PKI profile, with
    two relaxations that DICOM sites need: the SAN may be absent (identity in the subject CN),
    and the purpose may be server or client. A CA certificate passes when it is one of the
    anchors or is signed directly by one.
    """
    if is_ca(cert):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return "the CA certificate is not valid at this time"
        for anchor in anchors:
            if cert == anchor:
                return None
            try:
                cert.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return None
        return "CA certificate is not issued by the given CA"
    ee_policy = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _tls_purpose)
    )
    verifier = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(now)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(cert, untrusted)
    except VerificationError as exc:
        reason = str(exc).removeprefix("validation failed: ").split(" (encountered processing")[0]
        if reason == "candidates exhausted: signature does not match":
            return "signed by another key than the given CA's (was the CA re-created?)"
        if reason.startswith("candidates exhausted"):
            return f"not issued by the given CA (its issuer is {cert.issuer.rfc4514_string()})"
        if reason == "cert is not valid at validation time":
            return f"a certificate in the chain is expired or not yet valid at {now:%Y-%m-%d %H:%M}"
        return reason
    return None


def _serial_hex(serial: int) -> str:
    """Whole octets in upper-case hex, as ``openssl x509 -serial`` and ``openssl crl`` print."""
    return serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big").hex().upper()


def _key_description(cert: x509.Certificate) -> tuple[str, int]:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec", key.curve.key_size
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa", key.key_size
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519", 256
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448", 456
    if isinstance(key, dsa.DSAPublicKey):
        return "dsa", key.key_size
    return type(key).__name__, 0


def _info(
    cert: x509.Certificate, chain_problem: str | None, checked: bool, now: datetime
) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns, ips, uris = (), (), ()
    try:
        ekus = tuple(
            _EKU_NAMES.get(oid, oid.dotted_string)
            for oid in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        )
    except x509.ExtensionNotFound:
        ekus = ()
    digest = cert.fingerprint(hashes.SHA256())
    key_type, key_size = _key_description(cert)
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=_serial_hex(cert.serial_number),
        fingerprint_sha256=digest.hex(":").upper(),
        fingerprint_sha256_hex=digest.hex(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        days_left=(cert.not_valid_after_utc - now) // timedelta(days=1),
        dns_names=dns,
        ip_addresses=ips,
        uris=uris,
        ae_binding=tuple(ae for ae in map(ae_from_uri, uris) if ae is not None),
        extended_key_usage=ekus,
        key_type=key_type,
        key_size=key_size,
        is_ca=is_ca(cert),
        chain_ok=(chain_problem is None) if checked else None,
        chain_error=chain_problem,
    )


def describe(cert: x509.Certificate, now: datetime) -> CertInfo:
    """What ``cert`` holds, its chain not checked."""
    return _info(cert, None, False, now)


def inspect(path: Path, ca: Path | None = None, now: datetime | None = None) -> list[CertInfo]:
    """Describe every certificate in the PEM file ``path``, in file order.

    Given ``ca`` (a PEM file of trusted CA certificates), each certificate's chain is checked
    at ``now``, with the file's other certificates as possible intermediates.
    """
    when = now if now is not None else datetime.now(UTC)
    certs = _load_certs(path)
    anchors = _load_certs(ca) if ca is not None else []
    infos = []
    for cert in certs:
        problem = None
        if ca is not None:
            problem = chain_problem(cert, [c for c in certs if c is not cert], anchors, when)
        infos.append(_info(cert, problem, ca is not None, when))
    return infos


def describe_crl(
    crl: x509.CertificateRevocationList, cas: list[x509.Certificate] | None
) -> CrlInfo:
    number: int | None = None
    with contextlib.suppress(x509.ExtensionNotFound):
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return CrlInfo(
        issuer=crl.issuer.rfc4514_string(),
        number=number,
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        revoked=tuple((_serial_hex(e.serial_number), e.revocation_date_utc) for e in crl),
        issuer_ok=None if cas is None else crl_issuer(crl, cas) is not None,
    )


def is_crl_file(path: Path) -> bool:
    """Whether ``path`` holds CRLs (PEM, or DER) rather than certificates: ``certs show`` and
    ``check`` take both."""
    return holds_crls(_read(path))


def inspect_crls(path: Path, ca: Path | None = None) -> list[CrlInfo]:
    """Describe every CRL in the PEM file ``path``; given ``ca``, check who signed each."""
    with _file_errors():
        crls = read_crls(path)
    cas = _load_certs(ca) if ca is not None else None
    return [describe_crl(crl, cas) for crl in crls]


def expiring(
    paths: Iterable[Path], warn_days: int, now: datetime | None = None
) -> list[tuple[Path, CertInfo]]:
    """Every certificate in ``paths`` that expires within ``warn_days`` or already has.

    A certificate that lapses takes its TLS links down with it; this is the list to act on
    (and what ``dicomfw certs check`` alerts on).
    """
    when = now if now is not None else datetime.now(UTC)
    return [
        (path, info)
        for path in paths
        for info in inspect(path, now=when)
        if info.expires_within(warn_days, when)
    ]
