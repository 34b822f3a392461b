"""Offer a cached TLS session to a new upstream connection without CPython's copy of it.

``SSLObject.session = s`` (and ``wrap_bio(session=s)``) first copies ``s`` by serialising it and
parsing it back (CPython's ``_ssl_session_dup``, a workaround for an OpenSSL 1.1.0 bug), so the
upstream's certificate chain is parsed again for every association: ~100 µs measured in
isolation, 250 µs on a busy event loop, out of ~2 ms that a resumed one-image association
costs the firewall. OpenSSL 3 shares a session between connections safely (it is reference
counted), so this module calls ``SSL_set_session`` itself.

That takes pointers out of CPython's ``_ssl`` objects (``libssl.py`` says when that is done),
and OpenSSL confirms them before each use: the connection belongs to the context, the session
has the session's time and timeout. Otherwise ``offer_session`` returns False and the caller
takes CPython's ordinary, copying path: slower, never wrong.
"""

from __future__ import annotations

import ssl

from dicomfw.relay.libssl import (
    LIBSSL,
    SESSION_CONTEXT,
    SESSION_SESSION,
    connection_handle,
    pointer,
)


def offer_session(
    context: ssl.SSLContext, connection: ssl.SSLObject, session: ssl.SSLSession
) -> bool:
    """Offer ``session`` on ``connection`` (made by ``context``, before its handshake) without
    copying it. False: not done (unknown layout, or a pointer OpenSSL did not confirm)."""
    lib = LIBSSL
    if (
        lib is None
        or pointer(session, SESSION_CONTEXT) != id(context)
        or connection.context is not context
    ):
        return False
    handle = connection_handle(lib, connection)
    if not handle or lib.init_finished(handle):
        return False
    native_session = pointer(session, SESSION_SESSION)
    if (
        not native_session
        or lib.session_time(native_session) != session.time
        or lib.session_timeout(native_session) != session.timeout
        or not lib.resumable(native_session)  # e.g. shared with a connection that failed
    ):
        return False
    if lib.set_session(handle, native_session) == 1:
        return True
    lib.clear_errors()  # leave no error queued for the next TLS call on this thread to report
    return False
