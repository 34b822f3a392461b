"""The libssl objects behind CPython's ``ssl`` module, for two calls it does not offer.

dicomfw needs two things from OpenSSL that ``ssl`` has no API for: offering a cached session
without CPython's copy of it (``resume.py``), and handing an idle connection's record buffers
back (``BufferRelease``). Both take pointers out of CPython's ``_ssl`` objects. That is done
only when the object layouts are the ones this module knows (CPython 3.11 release build: the
type sizes below) and the libssl in this process is the one ``_ssl`` was built for; and before
each use OpenSSL confirms the pointers (the connection belongs to the context it claims).
Otherwise every function here declines and the caller keeps CPython's ordinary behaviour:
slower or larger, never wrong.
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
SESSION_SESSION: Final = _HEAD  # PySSLSession.session (SSL_SESSION *)
SESSION_CONTEXT: Final = _HEAD + 8  # PySSLSession.ctx (PySSLContext *)
_SOCKET_SSL: Final = _HEAD + 8  # PySSLSocket.ssl (SSL *), after PyObject *Socket

#: Per OpenSSL 3 branch, the first patch release whose ``SSL_free_buffers`` cannot free a
#: buffer still in use (CVE-2024-4741). Later branches (3.4 on) never had the bug.
_FREE_BUFFERS_FIXED: Final = {(3, 0): 14, (3, 1): 6, (3, 2): 2, (3, 3): 1}


class LibSsl:
    """The libssl functions used, bound with their C signatures."""

    def __init__(self, library: ctypes.CDLL, free_buffers_safe: bool) -> None:
        pointer, long = ctypes.c_void_p, ctypes.c_long
        self.ctx_options = _bind(library.SSL_CTX_get_options, ctypes.c_uint64, pointer)
        self.ssl_ctx = _bind(library.SSL_get_SSL_CTX, pointer, pointer)
        self.session_time = _bind(library.SSL_SESSION_get_time, long, pointer)
        self.session_timeout = _bind(library.SSL_SESSION_get_timeout, long, pointer)
        self.init_finished = _bind(library.SSL_is_init_finished, ctypes.c_int, pointer)
        self.resumable = _bind(library.SSL_SESSION_is_resumable, ctypes.c_int, pointer)
        self.set_session = _bind(library.SSL_set_session, ctypes.c_int, pointer, pointer)
        self.clear_errors = _bind(library.ERR_clear_error, None)  # libcrypto's, found via libssl
        self.free_buffers: _Function | None = None
        if free_buffers_safe:
            self.free_buffers = _bind(library.SSL_free_buffers, ctypes.c_int, pointer)


def _bind(function: _Function, result: type | None, *arguments: type) -> _Function:
    function.restype = result
    function.argtypes = list(arguments)
    return function


def free_buffers_safe(version_info: tuple[int, ...]) -> bool:
    """Whether this OpenSSL (``ssl.OPENSSL_VERSION_INFO``: 3.x.y is ``(3, x, 0, y, 0)``) has
    the fixed ``SSL_free_buffers``."""
    major, minor, patch = version_info[0], version_info[1], version_info[3]
    fixed = _FREE_BUFFERS_FIXED.get((major, minor))
    if fixed is None:
        return (major, minor) > (3, 3)
    return patch >= fixed


def _load() -> LibSsl | None:
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
    return LibSsl(library, free_buffers_safe(ssl.OPENSSL_VERSION_INFO))


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


LIBSSL: Final = _load()


def pointer(obj: object, offset: int) -> int:
    """The C pointer stored ``offset`` bytes into the CPython object ``obj`` (0 if NULL)."""
    return ctypes.c_void_p.from_address(id(obj) + offset).value or 0


def connection_handle(lib: LibSsl, connection: ssl.SSLObject) -> int:
    """The ``SSL *`` behind ``connection``, confirmed by OpenSSL to belong to the connection's
    context; 0 when it cannot be had."""
    native = getattr(connection, "_sslobj", None)
    if native is None:
        return 0
    context = connection.context
    ctx = pointer(context, _CONTEXT_CTX)
    if not ctx or lib.ctx_options(ctx) != context.options:
        return 0
    handle = pointer(native, _SOCKET_SSL)
    if not handle or lib.ssl_ctx(handle) != ctx:
        return 0
    return handle


class BufferRelease:
    """Hands a TLS connection's record buffers back to the heap once the relay has read it dry.

    OpenSSL 3.0 keeps a connection's ~17 KB record read buffer after a read that took a
    post-handshake message, ``SSL_MODE_RELEASE_BUFFERS`` (which CPython sets) notwithstanding;
    and every TLS 1.3 server sends session tickets after the handshake. Measured: 35.3 KB of
    heap per client connection after its first read, 18.7 KB after ``SSL_free_buffers``. An
    idle association would carry it for as long as it stays open. ``SSL_free_buffers`` frees
    only buffers holding nothing unread or unsent, and a later read allocates afresh.
    Holding ``connection`` keeps its ``SSL *`` alive: ``_ssl`` frees it only with the object.
    """

    __slots__ = ("_connection", "_free", "_handle")

    def __init__(self, connection: ssl.SSLObject) -> None:
        lib = LIBSSL
        self._connection = connection
        self._handle = connection_handle(lib, connection) if lib is not None else 0
        self._free = lib.free_buffers if lib is not None and self._handle else None

    @property
    def active(self) -> bool:
        """False where this interpreter or OpenSSL does not allow it: ``release`` does nothing."""
        return self._free is not None

    def release(self) -> None:
        if self._free is not None:
            self._free(self._handle)  # 0 = something still buffered: kept, which is right
