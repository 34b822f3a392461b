"""Upstream session resumption without CPython's session copy (dicomfw/relay/resume.py).

Real TLS 1.3 handshakes on 127.0.0.1 against a server that issues session tickets.
"""

from __future__ import annotations

import ssl
import sys

import pytest

from dicomfw.relay.resume import offer_session
from tests.harness import Pki
from tests.tlshelpers import exchange, tls_server, upstream_context

KNOWN_LAYOUT = sys.version_info[:2] == (3, 11) and ssl.OPENSSL_VERSION_INFO >= (3, 0)


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
