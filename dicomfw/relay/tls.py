"""TLS contexts for listeners and upstreams, following DICOM BCP 195 (non-downgrading profile).

Each reload builds *new* contexts (measured: a context in use keeps its session cache and
ignores a CRL loaded later), and upstream contexts resume sessions: without resumption every
one-image association pays a full mutual-TLS handshake. asyncio's ``create_connection`` takes no
``session=``, but both asyncio and uvloop create the TLS object through ``context.wrap_bio``,
so a context subclass that passes the cached session there resumes on either loop.

Every file is read and checked by ``tlsfiles`` before OpenSSL loads it, so an error names the
file at fault. The same ``wrap_bio`` hook gives each connection a subclass of ``SSLObject``
that keeps the certificate a refused peer presented (for the log and audit) and, on a
listener, sends the refused client the TLS alert that the event loops would otherwise drop.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography import x509

from dicomfw.config.model import AtnaCollector, ClientTLS, ServerTLS
from dicomfw.core.policy import PresentedIdentity
from dicomfw.errors import ConfigError
from dicomfw.relay.libssl import RefusedCertificates, refused_certificates
from dicomfw.relay.resume import offer_session
from dicomfw.relay.tlsfiles import (
    Served,
    TlsFileError,
    check_crl,
    next_update,
    read_certificates,
    read_crls,
    read_pair,
)

#: BCP 195 / RFC 9325 recommended suites for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!eNULL:!MD5:!SHA1"
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


#: The accepted socket whose TLS handshake the running task starts (``accepting``).
_ACCEPTED: ContextVar[socket.socket | None] = ContextVar("dicomfw_accepted", default=None)
#: The attribute of a handshake's ``ssl.SSLError`` that carries the refused certificate.
_PRESENTED: Final = "dicomfw_presented_certificate"


@dataclass(frozen=True, slots=True)
class RefusedCertificate:
    """The certificate a peer presented in a handshake that refused it: what the log line and
    the audit record of the refusal name (it comes from the network, like an AE title)."""

    subject: str
    issuer: str
    serial: str  # whole octets in upper-case hex, as ``openssl x509 -serial`` prints it
    sha256: str

    @classmethod
    def of(cls, der: bytes) -> RefusedCertificate | None:
        try:
            certificate = x509.load_der_x509_certificate(der)
            subject, issuer = certificate.subject, certificate.issuer
            return cls(
                subject.rfc4514_string(),
                issuer.rfc4514_string(),
                f"{certificate.serial_number:X}".rjust(2 * _octets(certificate.serial_number), "0"),
                hashlib.sha256(der).hexdigest(),
            )
        except ValueError:  # OpenSSL parsed it, cryptography's stricter reader may not
            return None


def _octets(number: int) -> int:
    return max(1, (number.bit_length() + 7) // 8)


def refused_certificate(error: BaseException) -> RefusedCertificate | None:
    """The certificate the peer presented, when ``error`` ended a handshake that refused it."""
    presented = getattr(error, _PRESENTED, None)
    return presented if isinstance(presented, RefusedCertificate) else None


def accepting(connection: socket.socket) -> None:
    """Say that the running task is about to hand ``connection`` to the event loop for a TLS
    handshake with a ``ServerContext``.

    asyncio and uvloop create the connection's TLS object (``ServerContext.wrap_bio``) in the
    transport's callbacks, which run in a copy of the context of the task that accepted: a
    context variable is the one way to the socket from there that costs neither a context per
    connection nor a file descriptor.
    """
    _ACCEPTED.set(connection)


class _Connection(ssl.SSLObject):
    """A TLS connection that hangs the certificate its peer presented on the error of a
    handshake that refused it, for ``refused_certificate`` (see ``RefusedCertificates``)."""

    _refused: RefusedCertificates | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as error:
            self._failed(error)
            raise

    def _failed(self, error: ssl.SSLError) -> None:
        der = self._refused.take(self) if self._refused is not None else None
        if der is not None:
            setattr(error, _PRESENTED, RefusedCertificate.of(der))


class _ServerConnection(_Connection):
    """A listener's TLS connection, which also tells a refused client why.

    When OpenSSL refuses a client, it writes the TLS alert for the case (RFC 8446 §6.2,
    RFC 5246 §7.2.2: unknown_ca, certificate_expired, certificate_required, protocol_version,
    ...) into the connection's outgoing buffer, but asyncio's and uvloop's SSL protocols then
    close the transport without sending it, so the client sees its connection dropped. This
    sends the alert on the socket itself before the error goes on (the server's flight has
    left the socket by then: the client answered it).
    """

    _outgoing: ssl.MemoryBIO | None = None
    _socket: socket.socket | None = None

    def _failed(self, error: ssl.SSLError) -> None:
        super()._failed(error)
        alert = self._outgoing.read() if self._outgoing is not None else b""
        if alert and self._socket is not None:
            with contextlib.suppress(OSError):  # the client may be gone already
                self._socket.send(alert)


def _keeping_refused(context: _Context) -> None:
    """Have ``context`` keep the certificate a peer presented when OpenSSL refuses it."""
    refused = refused_certificates()
    if refused is not None and refused.install(context):
        context.refused = refused


class _Context(ssl.SSLContext):
    """A context whose connections keep the certificate a refused peer presented."""

    sslobject_class = _Connection
    refused: RefusedCertificates | None = None

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        connection = super().wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname
        )
        assert isinstance(connection, _Connection)
        connection._refused = self.refused
        self._prepare(connection, outgoing, session)
        return connection

    def _prepare(
        self, connection: _Connection, outgoing: ssl.MemoryBIO, session: ssl.SSLSession | None
    ) -> None:
        """What a kind of context does to each new connection before its handshake."""


class ServerContext(_Context):
    """A listener's context: connections that send their refusal's alert, and what the log and
    the metrics say about it (the certificate it presents, the soonest nextUpdate of its CRLs).
    """

    sslobject_class = _ServerConnection
    served: Served | None = None
    crl_next_update: datetime | None = None

    def _prepare(
        self, connection: _Connection, outgoing: ssl.MemoryBIO, session: ssl.SSLSession | None
    ) -> None:
        assert isinstance(connection, _ServerConnection)
        connection._outgoing = outgoing
        connection._socket = _ACCEPTED.get()


class ResumingClientContext(_Context):
    """A client context that offers the last session it saw, one cache per upstream, and
    keeps the certificate an upstream presented when it did not verify."""

    session_cache: ssl.SSLSession | None = None
    served: Served | None = None  # our client certificate, if the upstream gets one

    def _prepare(
        self, connection: _Connection, outgoing: ssl.MemoryBIO, session: ssl.SSLSession | None
    ) -> None:
        offered = session or self.session_cache
        if offered is not None and not offer_session(self, connection, offered):
            connection.session = offered  # CPython's own path, which copies the session

    def remember(self, ssl_object: Any) -> None:
        """Keep the session of a finished handshake (for TLS 1.3, once its ticket arrived)."""
        session = getattr(ssl_object, "session", None)
        if session is not None and (session.has_ticket or session.id):
            self.session_cache = self._private_copy(session, ssl_object.server_hostname)

    def _private_copy(self, session: ssl.SSLSession, server_hostname: str | None) -> ssl.SSLSession:
        """A copy of ``session`` that no connection shares. ``ssl_object.session`` is the
        connection's own, and OpenSSL marks that not resumable when the connection ends
        without a TLS close_notify (most DICOM peers just close after A-RELEASE-RP), which
        would spoil it for ``offer_session``. CPython's setter copies the session into a
        scratch connection that never starts, and its getter hands the copy back."""
        scratch = ssl.SSLContext.wrap_bio(  # no offer of the cached session (``_prepare``)
            self, ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=server_hostname
        )
        scratch.session = session
        return scratch.session or session


def _harden(context: ssl.SSLContext, min_version: str) -> None:
    context.minimum_version = _VERSIONS[min_version]
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE


T = TypeVar("T")


def _checked(where: str, read: Callable[[], T], section: str = ".tls") -> T:
    """Run a ``tlsfiles`` reader; its error names the TLS file and the setting that names it
    (``where`` + ``section`` + the file's key, e.g. ``listeners.front.tls.key``)."""
    try:
        return read()
    except TlsFileError as error:
        setting = f"{where}{section}.{error.field}"
        raise ConfigError(str(error.path), None, setting, error.message) from error


def _load(action: str, path: Path, key: str, load: Callable[[], None]) -> None:
    """Run an OpenSSL loader; what it still refuses after ``tlsfiles`` read the file (an
    algorithm this OpenSSL lacks, say) is a ConfigError naming the file."""
    try:
        load()
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ConfigError(str(path), None, key, f"OpenSSL cannot {action}: {error}") from error


def _load_pair(
    context: ssl.SSLContext, cert: Path, key: Path, password_file: Path | None, where: str
) -> Served:
    """Check the pair (``tlsfiles.read_pair``), then load it; what the endpoint will present."""
    pair = _checked(where, lambda: read_pair(cert, key, password_file))
    _load(
        "load the certificate and key",
        cert,
        f"{where}.tls.cert",
        lambda: context.load_cert_chain(cert, key, password=pair.password),
    )
    return Served.of(pair.leaf)


def _load_ca(context: ssl.SSLContext, ca: Path, where: str) -> list[x509.Certificate]:
    cas = _checked(where, lambda: read_certificates(ca, "ca"))
    _load("load the CA", ca, f"{where}.tls.ca", lambda: context.load_verify_locations(ca))
    return cas


def _current_crls(
    path: Path, cas: list[x509.Certificate], ca: Path, now: datetime
) -> list[x509.CertificateRevocationList]:
    crls = read_crls(path)
    for crl in crls:
        check_crl(path, crl, cas, ca, now)
    return crls


def server_context(tls: ServerTLS, where: str, now: datetime | None = None) -> ServerContext:
    """A listener context that requires a client certificate chaining to ``tls.ca``.

    Every file is read and checked first (``tlsfiles``), so an error names the file at fault;
    a CRL that would refuse every client (expired, not yet valid, from another CA) is one.
    """
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, tls.min_version)
    _keeping_refused(context)
    context.served = _load_pair(context, tls.cert, tls.key, tls.key_password_file, where)
    cas = _load_ca(context, tls.ca, where)
    if tls.crl is not None:
        crl, moment = tls.crl, now or datetime.now(UTC)
        crls = _checked(where, lambda: _current_crls(crl, cas, tls.ca, moment))
        _load("load the CRL", crl, f"{where}.tls.crl", lambda: context.load_verify_locations(crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        context.crl_next_update = next_update(crls)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: ClientTLS, where: str) -> ResumingClientContext:
    """An upstream context: verifies the server (name and chain) and presents our client cert."""
    context = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, tls.min_version)
    _keeping_refused(context)
    _load_ca(context, tls.ca, where)
    if tls.cert is not None and tls.key is not None:
        context.served = _load_pair(context, tls.cert, tls.key, tls.key_password_file, where)
    context.check_hostname = tls.verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def check_collector_files(atna: AtnaCollector) -> None:
    """Read the ATNA collector's TLS files as a listener's are read, so ``dicomfw check``, a
    start and a reload name a bad one (its context is made when the audit trail starts)."""
    ca, cert, key = atna.ca, atna.cert, atna.key
    if ca is not None:
        _checked("audit.atna", lambda: read_certificates(ca, "ca"), "")
    if cert is not None and key is not None:
        _checked("audit.atna", lambda: read_pair(cert, key, None), "")


def presented_identity(ssl_object: Any) -> PresentedIdentity | None:
    """The verified peer certificate of a TLS connection, in the terms policy matches on."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return identity_of(der, ssl_object.getpeercert() or {})


def identity_of(der: bytes, decoded: Mapping[str, Any]) -> PresentedIdentity:
    """A certificate, as DER and decoded the way ``SSLSocket.getpeercert()`` decodes it, in the
    terms policy matches on. ``dicomfw explain --cert`` reads a PEM file through this too, so
    what it says about a certificate is what the relay would see."""
    subject_cn = next(
        (value for rdn in decoded.get("subject", ()) for key, value in rdn if key == "commonName"),
        None,
    )
    sans = decoded.get("subjectAltName", ())
    return PresentedIdentity(
        subject_cn=subject_cn,
        san_dns=tuple(value for kind, value in sans if kind == "DNS"),
        san_uri=tuple(value for kind, value in sans if kind == "URI"),
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
    )
