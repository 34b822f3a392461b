"""TLS contexts for listeners and upstreams, following DICOM BCP 195 (non-downgrading profile).

Each reload builds *new* contexts (measured: a context in use keeps its session cache and
ignores a CRL loaded later), and upstream contexts resume sessions: without resumption every
one-image association pays a full mutual-TLS handshake. asyncio's ``create_connection`` takes no
``session=``, but both asyncio and uvloop create the TLS object through ``context.wrap_bio``,
so a context subclass that passes the cached session there resumes on either loop.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomfw.config.model import ClientTLS, ServerTLS
from dicomfw.core.policy import PresentedIdentity
from dicomfw.errors import ConfigError
from dicomfw.relay.resume import offer_session

#: BCP 195 / RFC 9325 recommended suites for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!eNULL:!MD5:!SHA1"
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class ResumingClientContext(ssl.SSLContext):
    """A client context that offers the last session it saw, one cache per upstream."""

    session_cache: ssl.SSLSession | None = None

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
        offered = session or self.session_cache
        if offered is not None and not offer_session(self, connection, offered):
            connection.session = offered  # CPython's own path, which copies the session
        return connection

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
        scratch = super().wrap_bio(
            ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=server_hostname
        )
        scratch.session = session
        return scratch.session or session


def _harden(context: ssl.SSLContext, min_version: str) -> None:
    context.minimum_version = _VERSIONS[min_version]
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE


def _password(path: Path | None) -> bytes | None:
    return path.read_bytes().strip() if path else None


def _load(action: str, path: Path, key: str, load: Any) -> None:
    """Run a loader and turn OpenSSL's terse errors into a ConfigError naming the file."""
    try:
        load()
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ConfigError(str(path), None, key, f"cannot {action}: {error}") from error


def server_context(tls: ServerTLS, where: str) -> ssl.SSLContext:
    """A listener context that requires a client certificate chaining to ``tls.ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, tls.min_version)
    _load(
        "load certificate/key",
        tls.cert,
        f"{where}.tls.cert",
        lambda: context.load_cert_chain(
            tls.cert, tls.key, password=_password(tls.key_password_file)
        ),
    )
    _load("load CA", tls.ca, f"{where}.tls.ca", lambda: context.load_verify_locations(tls.ca))
    if tls.crl is not None:
        crl = tls.crl
        _load("load CRL", crl, f"{where}.tls.crl", lambda: context.load_verify_locations(crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: ClientTLS, where: str) -> ResumingClientContext:
    """An upstream context: verifies the server (name and chain) and presents our client cert."""
    context = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, tls.min_version)
    _load("load CA", tls.ca, f"{where}.tls.ca", lambda: context.load_verify_locations(tls.ca))
    if tls.cert is not None and tls.key is not None:
        cert, key, password = tls.cert, tls.key, _password(tls.key_password_file)
        _load(
            "load certificate/key",
            cert,
            f"{where}.tls.cert",
            lambda: context.load_cert_chain(cert, key, password=password),
        )
    context.check_hostname = tls.verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    return context


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
