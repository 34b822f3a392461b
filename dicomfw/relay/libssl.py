"""The libssl objects behind CPython's ``ssl`` module, for three calls it does not offer.

dicomfw needs three things from OpenSSL that ``ssl`` has no API for: offering a cached session
without CPython's copy of it (``resume.py``), handing an idle connection's record buffers
back (``BufferRelease``), and learning which certificate a refused peer presented
(``RefusedCertificates``). All take pointers out of CPython's ``_ssl`` objects. That is done
only when the object layouts are the ones this module knows (CPython 3.11 release build: the
type sizes below) and the libssl in this process is the one ``_ssl`` was built for; and before
each use OpenSSL confirms the pointers (the connection belongs to the context it claims).
Otherwise every function here declines and the caller keeps CPython's ordinary behaviour:
slower or larger, never wrong.
"""

from __future__ import annotations

import _ssl
import ctypes
import logging
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ctypes import _NamedFuncPointer as _Function

log = logging.getLogger("dicomfw.relay")

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


#: ``int (*)(X509_STORE_CTX *, void *)``: SSL_CTX_set_cert_verify_callback(3)'s callback.
CertVerifyCallback: Final = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class LibSsl:
    """The libssl functions used, bound with their C signatures.

    ``verifying`` holds the functions a certificate verify callback calls. They come from a
    ``PyDLL`` handle of the same library, which keeps the GIL during the call: the callback
    runs with the GIL it took on entry, and giving it up around each call would only let
    another thread take it while the handshake waits.
    """

    def __init__(
        self, library: ctypes.CDLL, verifying: ctypes.PyDLL, free_buffers_safe: bool
    ) -> None:
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
        self.set_cert_verify_callback = _bind(
            library.SSL_CTX_set_cert_verify_callback, None, pointer, CertVerifyCallback, pointer
        )
        self.verify_cert = _bind(verifying.X509_verify_cert, ctypes.c_int, pointer)
        self.store_certificate = _bind(verifying.X509_STORE_CTX_get0_cert, pointer, pointer)
        self.store_data = _bind(
            verifying.X509_STORE_CTX_get_ex_data, pointer, pointer, ctypes.c_int
        )
        ssl_index = _bind(verifying.SSL_get_ex_data_X509_STORE_CTX_idx, ctypes.c_int)
        self.store_ssl_index: int = ssl_index()  # where a store keeps its SSL * (fixed)
        self.certificate_der = _bind(
            verifying.i2d_X509, ctypes.c_int, pointer, ctypes.POINTER(ctypes.c_void_p)
        )


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
    return LibSsl(library, ctypes.PyDLL(path), free_buffers_safe(ssl.OPENSSL_VERSION_INFO))


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


def context_handle(lib: LibSsl, context: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` behind ``context``, confirmed by OpenSSL (its options are the
    context's); 0 when it cannot be had."""
    ctx = pointer(context, _CONTEXT_CTX)
    if not ctx or lib.ctx_options(ctx) != context.options:
        return 0
    return ctx


def connection_handle(lib: LibSsl, connection: ssl.SSLObject) -> int:
    """The ``SSL *`` behind ``connection``, confirmed by OpenSSL to belong to the connection's
    context; 0 when it cannot be had."""
    native = getattr(connection, "_sslobj", None)
    if native is None:
        return 0
    ctx = context_handle(lib, connection.context)
    if not ctx:
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


class RefusedCertificates:
    """Keeps the certificate a peer presented when OpenSSL refuses it, for the log and audit.

    OpenSSL frees a peer's certificate chain when its verification fails, before the
    handshake error reaches Python, so ``getpeercert`` has nothing to show. A certificate
    verify callback (SSL_CTX_set_cert_verify_callback(3)) runs OpenSSL's own verification,
    ``X509_verify_cert``, exactly as it would have run, and when that fails keeps the leaf's
    DER encoding under its connection's ``SSL *`` until ``take`` collects it. The verdict is
    always OpenSSL's. Cost: one callback per full handshake that verifies a certificate (a
    client's on a listener, the upstream's toward it; resumed sessions verify nothing): ~1 µs
    (entering a ctypes callback ~0.4 µs, one call) against the ~1.1 ms of server CPU such a
    handshake takes; 30 paired rounds of 200 handshakes with and without it differed by
    nothing beyond the noise.
    """

    __slots__ = ("_callback", "_lib", "_refused")

    #: More refused connections than this without a ``take`` would be a bug; the oldest go.
    _LIMIT: Final = 64

    def __init__(self, lib: LibSsl) -> None:
        self._lib = lib
        self._refused: dict[int, bytes] = {}
        self._callback = CertVerifyCallback(self._verify)  # referenced as long as the context

    def install(self, context: ssl.SSLContext) -> bool:
        """Verify ``context``'s peer certificates through this object; False if declined."""
        ctx = context_handle(self._lib, context)
        if ctx:
            self._lib.set_cert_verify_callback(ctx, self._callback, None)
        return bool(ctx)

    def take(self, connection: ssl.SSLObject) -> bytes | None:
        """The DER certificate ``connection``'s peer presented, if OpenSSL refused it."""
        handle = connection_handle(self._lib, connection)
        return self._refused.pop(handle, None) if handle else None

    def _verify(self, store: int, _arg: int) -> int:
        verdict: int = self._lib.verify_cert(store)
        if verdict <= 0:
            try:
                self._keep(store)
            except Exception:  # never let remembering the certificate change the verdict
                log.exception("event=refused_certificate_not_kept")
        return verdict

    def _keep(self, store: int) -> None:
        lib = self._lib
        certificate = lib.store_certificate(store)
        connection = lib.store_data(store, lib.store_ssl_index)
        size = lib.certificate_der(certificate, None) if certificate and connection else 0
        if size <= 0:
            return
        der = ctypes.create_string_buffer(size)
        cursor = ctypes.c_void_p(ctypes.addressof(der))  # i2d_X509 writes and advances it
        if lib.certificate_der(certificate, ctypes.byref(cursor)) != size:
            return
        if len(self._refused) >= self._LIMIT:
            self._refused.pop(next(iter(self._refused)))
        self._refused[connection] = der.raw


def refused_certificates() -> RefusedCertificates | None:
    """A keeper of refused peer certificates, or None where this interpreter declines."""
    return RefusedCertificates(LIBSSL) if LIBSSL is not None else None
