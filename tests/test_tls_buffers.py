"""An idle TLS connection gives its record buffers back (dicomfw/relay/libssl.py).

Real TLS 1.3 connections on 127.0.0.1; the heap is read with glibc's ``mallinfo2``.
"""

from __future__ import annotations

import ssl

import pytest

from dicomfw.relay.libssl import LIBSSL, BufferRelease, free_buffers_safe
from tests.harness import Pki
from tests.mallinfo import HAS_MALLINFO2, heap_in_use
from tests.tlshelpers import connected, tls_server, upstream_context

FREES_BUFFERS = LIBSSL is not None and LIBSSL.free_buffers is not None and HAS_MALLINFO2
needs_native = pytest.mark.skipif(
    not FREES_BUFFERS, reason="needs CPython 3.11's _ssl layout, a fixed OpenSSL 3 and glibc"
)


@pytest.mark.parametrize(
    ("version", "safe"),
    [
        ((3, 0, 0, 13, 0), False),
        ((3, 0, 0, 14, 0), True),
        ((3, 0, 0, 19, 0), True),
        ((3, 1, 0, 5, 0), False),
        ((3, 1, 0, 6, 0), True),
        ((3, 2, 0, 1, 0), False),
        ((3, 2, 0, 2, 0), True),
        ((3, 3, 0, 0, 0), False),
        ((3, 3, 0, 1, 0), True),
        ((3, 4, 0, 0, 0), True),
        ((1, 1, 1, 23, 15), False),
    ],
)
def test_free_buffers_is_used_only_where_cve_2024_4741_is_fixed(
    version: tuple[int, ...], safe: bool
) -> None:
    assert free_buffers_safe(version) is safe


@needs_native
def test_an_idle_connection_gives_its_read_buffer_back_and_keeps_working(pki: Pki) -> None:
    with (
        tls_server(pki, replies=(b"!", b"!", b"!")) as port,
        connected(port, upstream_context(pki)) as client,
    ):
        release = BufferRelease(client.connection)
        assert release.active
        assert client.ask() == b"!"  # with it, the session tickets
        before = heap_in_use()
        release.release()
        freed = before - heap_in_use()
        for _ in range(2):  # later reads allocate a buffer again as they need, and work
            assert client.ask() == b"!"
            release.release()
    # OpenSSL 3.0 keeps its ~17 KB record read buffer after the read that took the tickets.
    assert freed > 12_000, freed


@needs_native
def test_unread_data_is_never_released(pki: Pki) -> None:
    """A read that took part of a record: the rest stays readable (SSL_free_buffers refuses)."""
    with (
        tls_server(pki, replies=(b"abc",)) as port,
        connected(port, upstream_context(pki)) as client,
    ):
        release = BufferRelease(client.connection)
        assert client.ask(size=1) == b"a"
        release.release()
        assert client.connection.read(2) == b"bc"


def test_a_connection_without_native_access_is_left_alone(pki: Pki) -> None:
    """An ``SSLObject`` whose ``SSL *`` cannot be confirmed (here: no ``_sslobj``) is not
    touched, whatever the interpreter."""

    class Opaque(ssl.SSLObject):
        pass

    context = upstream_context(pki)
    connection = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")
    disguised = Opaque.__new__(Opaque)
    disguised._sslobj = None  # type: ignore[attr-defined]
    disguised._context = context  # type: ignore[attr-defined]
    assert BufferRelease(connection).active is FREES_BUFFERS
    release = BufferRelease(disguised)
    assert not release.active
    release.release()  # a no-op, no crash
