"""Upstream session resumption without CPython's session copy (dicomfw/relay/resume.py).

Real TLS 1.3 handshakes on 127.0.0.1 against a server that issues session tickets.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import threading
from collections.abc import Iterator

import pytest

from dicomfw.config.model import ClientTLS
from dicomfw.relay.resume import offer_session
from dicomfw.relay.tls import ResumingClientContext, client_context
from tests.harness import WAIT, Pki, server_context

KNOWN_LAYOUT = sys.version_info[:2] == (3, 11) and ssl.OPENSSL_VERSION_INFO >= (3, 0)


@contextlib.contextmanager
def tls_server(pki: Pki, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> Iterator[int]:
    """Accepts mutual-TLS connections, answers one byte per connection (so the client reads
    the TLS 1.3 session tickets that precede it), until the test ends."""
    context = server_context(pki, pki.pacs)
    context.maximum_version = version
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), context.wrap_socket(connection, True) as tls:
                tls.settimeout(WAIT)
                tls.recv(1)
                tls.sendall(b"!")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        yield port
    finally:
        stop.set()
        with contextlib.suppress(OSError):  # wake the accept() so the thread sees ``stop``
            socket.create_connection(("127.0.0.1", port), WAIT).close()
        thread.join(WAIT)
        listener.close()


def exchange(port: int, context: ResumingClientContext, ragged_eof: bool = True) -> ssl.SSLObject:
    """One connection through ``context.wrap_bio`` (as the relay's event loop makes them):
    handshake, send a byte, read the answer (and with it the session tickets)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), WAIT) as sock:

        def pump(step: object) -> object:
            for _ in range(100):
                try:
                    return step()  # type: ignore[operator]
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    data = sock.recv(65536)
                    if not data:
                        raise AssertionError("server closed the connection") from None
                    incoming.write(data)
            raise AssertionError("no progress")

        pump(connection.do_handshake)
        connection.write(b"?")
        sock.sendall(outgoing.read())
        assert pump(lambda: connection.read(1)) == b"!"
        if not ragged_eof:
            return connection
        # The server closes without a TLS close_notify, as DICOM peers do after A-RELEASE-RP.
        incoming.write(b"".join(iter(lambda: sock.recv(65536), b"")))
        incoming.write_eof()
        with pytest.raises(ssl.SSLEOFError):
            connection.read(1)
    return connection


def upstream_context(pki: Pki) -> ResumingClientContext:
    tls = ClientTLS(ca=pki.ca, cert=pki.fw_client.cert, key=pki.fw_client.key)
    return client_context(tls, "upstreams.pacs")


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLSv1.3", "TLSv1.2"]
)
def test_a_remembered_session_is_resumed_through_wrap_bio(
    pki: Pki, version: ssl.TLSVersion
) -> None:
    context = upstream_context(pki)
    with tls_server(pki, version) as port:
        first = exchange(port, context, ragged_eof=False)
        assert not first.session_reused and first.version() == version.name.replace("_", ".")
        context.remember(first)
        assert context.session_cache is not None
        if KNOWN_LAYOUT:  # the sessions below are offered without CPython's copy
            scratch = ssl.SSLContext.wrap_bio(
                context, ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1"
            )
            assert offer_session(context, scratch, context.session_cache)
        again = [exchange(port, context).session_reused for _ in range(3)]
    assert again == [True, True, True]


@pytest.mark.skipif(not KNOWN_LAYOUT, reason="the native path knows CPython 3.11's layout")
def test_the_session_is_offered_natively_where_the_layout_is_known(pki: Pki) -> None:
    context = upstream_context(pki)
    with tls_server(pki) as port:
        first = exchange(port, context)
        # OpenSSL marked the connection's own session not resumable when it ended without
        # close_notify; what the context remembers is a private copy that it can offer.
        fresh = ssl.SSLContext.wrap_bio(
            context, ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1"
        )
        assert first.session is not None
        assert not offer_session(context, fresh, first.session)
        context.remember(first)
        session = context.session_cache
        assert session is not None
        fresh = ssl.SSLContext.wrap_bio(
            context, ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1"
        )
        assert offer_session(context, fresh, session)
        # Refused, untouched: a connection whose handshake is done, a session of another
        # context (CPython's own path refuses that too).
        assert not offer_session(context, exchange(port, context, ragged_eof=False), session)
        other = upstream_context(pki)
        stranger = ssl.SSLContext.wrap_bio(
            other, ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1"
        )
        assert not offer_session(other, stranger, session)
        with pytest.raises(ValueError, match="different SSLContext"):
            stranger.session = session
