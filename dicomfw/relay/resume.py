"""Offer a cached TLS session to a new upstream connection without CPython's copy of it.

``SSLObject.session = s`` (and ``wrap_bio(session=s)``) first copies ``s`` by serialising it and
parsing it back (CPython's ``_ssl_session_dup``, a workaround for an OpenSSL 1.1.0 bug), so the
upstream's certificate chain is parsed again for every association: ~100 µs measured in
isolation, 250 µs on a busy event loop, out of ~2 ms that a resumed one-image association
costs the firewall. OpenSSL 3 shares a session between connections safely (it is reference
counted), so this module calls ``SSL_set_session`` itself.

That takes three pointers out of CPython's ``_ssl`` objects. They are used only when the object
layouts are the ones this module knows (CPython 3.11 release build: the type sizes below) and
the libssl in this process is the one ``_ssl`` was built for; and before each use OpenSSL
confirms them (the connection belongs to the context, the session has the session's time and
timeout). Otherwise ``offer_session`` returns False and the caller takes CPython's ordinary,
copying path: slower, never wrong.
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ctypes import _NamedFuncPointer as _Function

#: (_SSLContext, SSLSession, _SSLSocket) sizes of the layouts below, per CPython version.
_KNOWN_SIZES: Final = {(3, 11): (96, 32, 96)}
_HEAD: Final = 16  # PyObject_HEAD of a 64-bit release build
_CONTEXT_CTX: Final = _HEAD  # PySSLContext.ctx (SSL_CTX *)
_SESSION_SESSION: Final = _HEAD  # PySSLSession.session (SSL_SESSION *)
_SESSION_CONTEXT: Final = _HEAD + 8  # PySSLSession.ctx (PySSLContext *)
_SOCKET_SSL: Final = _HEAD + 8  # PySSLSocket.ssl (SSL *), after PyObject *Socket


class _LibSsl:
    """The libssl functions used, bound with their C signatures."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, long = ctypes.c_void_p, ctypes.c_long
        self.ctx_options = _bind(library.SSL_CTX_get_options, ctypes.c_uint64, pointer)
        self.ssl_ctx = _bind(library.SSL_get_SSL_CTX, pointer, pointer)
        self.session_time = _bind(library.SSL_SESSION_get_time, long, pointer)
        self.session_timeout = _bind(library.SSL_SESSION_get_timeout, long, pointer)
        self.init_finished = _bind(library.SSL_is_init_finished, ctypes.c_int, pointer)
        self.resumable = _bind(library.SSL_SESSION_is_resumable, ctypes.c_int, pointer)
        self.set_session = _bind(library.SSL_set_session, ctypes.c_int, pointer, pointer)
        self.clear_errors = _bind(library.ERR_clear_error, None)  # libcrypto's, found via libssl


def _bind(function: _Function, result: type | None, *arguments: type) -> _Function:
    function.restype = result
    function.argtypes = list(arguments)
    return function


def _load() -> _LibSsl | None:
    """libssl as ``_ssl`` uses it, if this interpreter's object layouts are known."""
    sizes = (
        _ssl._SSLContext.__basicsize__,
        _ssl.SSLSession.__basicsize__,
        _ssl._SSLSocket.__basicsize__,  # type: ignore[attr-defined]  # not in typeshed
    )
    if (
        sys.implementation.name != "cpython"
        or hasattr(sys, "gettotalrefcount")  # a debug build has a larger PyObject_HEAD
        or ctypes.sizeof(ctypes.c_void_p) != 8
        or _KNOWN_SIZES.get(sys.version_info[:2]) != sizes
        or ssl.OPENSSL_VERSION_INFO < (3, 0)
    ):
        return None
    path = _mapped_libssl()
    if path is None:
        return None
    library = ctypes.CDLL(path)
    version = library.OpenSSL_version_num
    version.restype = ctypes.c_ulong
    if version() != ssl.OPENSSL_VERSION_NUMBER:
        return None
    return _LibSsl(library)


def _mapped_libssl() -> str | None:
    """The libssl file mapped into this process (the one ``_ssl`` links to)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.rsplit(" ", 1)[-1]
        if "/libssl.so" in path:
            return path
    return None


_LIBSSL: Final = _load()


def _pointer(obj: object, offset: int) -> int:
    return ctypes.c_void_p.from_address(id(obj) + offset).value or 0


def offer_session(
    context: ssl.SSLContext, connection: ssl.SSLObject, session: ssl.SSLSession
) -> bool:
    """Offer ``session`` on ``connection`` (made by ``context``, before its handshake) without
    copying it. False: not done (unknown layout, or a pointer OpenSSL did not confirm)."""
    lib = _LIBSSL
    native = getattr(connection, "_sslobj", None)
    if lib is None or native is None or _pointer(session, _SESSION_CONTEXT) != id(context):
        return False
    ctx = _pointer(context, _CONTEXT_CTX)
    if not ctx or lib.ctx_options(ctx) != context.options:
        return False
    handle = _pointer(native, _SOCKET_SSL)
    if not handle or lib.ssl_ctx(handle) != ctx or lib.init_finished(handle):
        return False
    native_session = _pointer(session, _SESSION_SESSION)
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
