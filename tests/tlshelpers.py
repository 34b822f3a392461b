"""A mutual-TLS server thread and a memory-BIO client, as the relay's event loop drives TLS.

Real TLS handshakes on 127.0.0.1: the client goes through ``context.wrap_bio`` with memory BIOs
(as uvloop and asyncio do), so dicomfw's native calls on those connections (``relay/libssl.py``)
are tested on the objects they meet in the daemon.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import pytest

from dicomfw.config.model import ClientTLS
from dicomfw.relay.tls import ResumingClientContext, client_context
from tests.harness import WAIT, Pki, server_context

T = TypeVar("T")


@contextlib.contextmanager
def tls_server(
    pki: Pki,
    version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    replies: Sequence[bytes] = (b"!",),
) -> Iterator[int]:
    """Accepts mutual-TLS connections until the test ends. On each, it answers every byte it
    receives with the next of ``replies`` (the first answer comes after the TLS 1.3 session
    tickets, so a client that reads it has them), then closes without a close_notify."""
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
                for reply in replies:
                    tls.recv(1)
                    tls.sendall(reply)

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


class MemoryBioClient:
    """One client connection through ``context.wrap_bio`` over a blocking socket."""

    def __init__(self, port: int, context: ResumingClientContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.connection = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname="127.0.0.1"
        )
        self.sock = socket.create_connection(("127.0.0.1", port), WAIT)

    def pump(self, step: Callable[[], T]) -> T:
        """Run ``step``, feeding it from the socket for as long as it wants to read."""
        for _ in range(100):
            try:
                return step()
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                if not data:
                    raise AssertionError("server closed the connection") from None
                self.incoming.write(data)
        raise AssertionError("no progress")

    def ask(self, size: int = 1) -> bytes:
        """Send one byte; return the first ``size`` bytes of the answer."""
        self.connection.write(b"?")
        self.sock.sendall(self.outgoing.read())
        return self.pump(lambda: self.connection.read(size))

    def read_to_ragged_eof(self) -> None:
        """The server closes without a TLS close_notify, as DICOM peers do after A-RELEASE-RP."""
        self.incoming.write(b"".join(iter(lambda: self.sock.recv(65536), b"")))
        self.incoming.write_eof()
        with pytest.raises(ssl.SSLEOFError):
            self.connection.read(1)


@contextlib.contextmanager
def connected(port: int, context: ResumingClientContext) -> Iterator[MemoryBioClient]:
    """A ``MemoryBioClient`` whose handshake is done; its socket is closed afterwards."""
    client = MemoryBioClient(port, context)
    try:
        client.pump(client.connection.do_handshake)
        yield client
    finally:
        client.sock.close()


def exchange(port: int, context: ResumingClientContext, ragged_eof: bool = True) -> ssl.SSLObject:
    """One connection (handshake, a byte each way, with it the session tickets); unless
    ``ragged_eof`` is False, read on until the server closes."""
    with connected(port, context) as client:
        assert client.ask() == b"!"
        if ragged_eof:
            client.read_to_ragged_eof()
    return client.connection


def upstream_context(pki: Pki) -> ResumingClientContext:
    tls = ClientTLS(ca=pki.ca, cert=pki.fw_client.cert, key=pki.fw_client.key)
    return client_context(tls, "upstreams.pacs")
