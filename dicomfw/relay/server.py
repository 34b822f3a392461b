"""The asyncio relay: accept, (TLS-)handshake, connect upstream, move bytes, run the session.

The relay decides nothing. Every byte goes to the association's sans-IO ``Session`` and the relay
carries out the commands that come back (write, connect, close) and hands the events to the
observers (log, audit, metrics). What it owns is the I/O: TLS via ``loop.start_tls`` with the
context current at accept time (so a reload changes certificates without re-binding), TCP_NODELAY
on both sockets, backpressure both ways (a full write buffer on one side pauses reading on the
other), the ARTIM / idle / connect / handshake timers, and the once-a-second hand-over of each
association's request tally to the observers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

from dicomfw.config.model import Config, Listener
from dicomfw.core.policy import MONITOR, IPAddress, PresentedIdentity, Refuse, Reject, in_networks
from dicomfw.core.proxy import InvalidProxyHeader, ProxyHeader, ProxyHeaderReader
from dicomfw.core.ratelimit import Delay, Gate, Limiter, LimitQuery
from dicomfw.core.session import (
    AssociationEnded,
    CheckLimits,
    Close,
    Command,
    ConnectUpstream,
    Event,
    PauseReading,
    ResumeReading,
    Scan,
    Send,
    Session,
    Side,
    State,
    Wakeup,
    WouldRefuse,
)
from dicomfw.core.stream import Buffer
from dicomfw.logsetup import log_event
from dicomfw.relay import clamd
from dicomfw.relay.libssl import BufferRelease
from dicomfw.relay.tls import (
    RefusedCertificate,
    ResumingClientContext,
    ServerContext,
    accepting,
    client_context,
    presented_identity,
    refused_certificate,
    server_context,
)

log = logging.getLogger("dicomfw.relay")

#: After a drain, how long the A-ABORTs sent to what was left may take to be written.
_ABORT_FLUSH_SECONDS: Final = 1.0
#: Plaintext bytes taken from a TLS connection at once (uvloop's own plain read size); see
#: ``_TlsReads``. Below the 256 KiB from which ``service/heap.py`` has glibc map memory afresh.
READ_BYTES: Final = 256_000
#: Plaintext handed to a TLS transport at once. OpenSSL encrypts each write into the
#: connection's outgoing memory BIO, whose buffer grows by a third when full and keeps its size:
#: writes of up to 128 KiB keep it at ~175 KB, below ``service/heap.py``'s 256 KiB mapping
#: threshold. A whole 256,000-byte read took it to ~350 KB: a fresh mapping per association,
#: its pages faulted in (measured: 71 faults and ~0.15 ms of CPU per one-image association).
TLS_WRITE_BYTES: Final = 128 * 1024
#: How often open associations report what their requests came to (``RequestTally``).
_TALLY_SECONDS: Final = 1.0
#: A balancer sends the PROXY header with its first segment; a connection that has not within
#: this time is not from a working balancer.
_PROXY_HEADER_SECONDS: Final = 5.0


@dataclass(frozen=True)
class Runtime:
    """Everything one association needs, built and validated before it is swapped in."""

    config: Config
    server_contexts: dict[str, ServerContext] = field(default_factory=dict)
    client_contexts: dict[str, ResumingClientContext] = field(default_factory=dict)


def build_runtime(config: Config) -> Runtime:
    """Load every certificate and key now, so a bad file fails the start or the reload."""
    return Runtime(
        config,
        {
            listener.name: server_context(listener.tls, f"listeners.{listener.name}")
            for listener in config.listeners
            if listener.tls is not None
        },
        {
            upstream.name: client_context(upstream.tls, f"upstreams.{upstream.name}")
            for upstream in config.upstreams
            if upstream.tls is not None
        },
    )


@dataclass
class AssociationInfo:
    """What observers may want to know about an association besides the event itself."""

    listener: str
    address: IPAddress
    port: int
    identity: PresentedIdentity | None = None
    started: float = field(default_factory=time.monotonic)
    bytes_from_requester: int = 0
    bytes_from_upstream: int = 0
    tls_resumed_upstream: bool | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    route: str | None = None
    requests: int = 0  # requests the upstream answered with a final status
    requests_sent: int = 0  # requests passed to the upstream
    proxied_by: IPAddress | None = None  # the balancer, when ``address`` came in a PROXY header
    upstream_failure: str | None = None  # why the upstream connection failed (upstream_cause)


Observer = Callable[[AssociationInfo, "Event | Refused"], None]


class LimitStore(Protocol):
    """Where the association limits and per-peer request rates of every instance are kept
    (``Limiter(shared=True)``): one atomic decision per query. An association it admitted
    holds its slots until ``release`` (called once the connection is gone, however it ended)."""

    async def decide(self, query: LimitQuery, gate: Gate) -> Reject | Refuse | Delay | None: ...

    def release(self, gate: Gate) -> None: ...

    @property
    def accepting(self) -> bool:
        """False while every new association would be refused (the store cannot answer and
        the rules say ``fail: closed``): a load balancer should send them elsewhere."""
        ...


@dataclass(frozen=True, slots=True)
class Refused:
    """A connection refused before any DICOM was spoken (source address, TLS handshake).

    ``cause`` sorts a TLS handshake failure into a small fixed set (``handshake_cause``), so
    metrics can count by it without a label per OpenSSL message. ``certificate`` is the one the
    client presented, when the handshake refused it.
    """

    why: str
    detail: str
    cause: str = ""
    certificate: RefusedCertificate | None = None


def _write_in_pieces(transport: asyncio.Transport, buffer: Buffer, size: int) -> None:
    view = memoryview(buffer)
    for start in range(0, len(view), size):
        transport.write(view[start : start + size])


def _nodelay(sock: Any) -> None:
    """Nagle off on both sides: a DIMSE response must not wait ~40 ms for a delayed ACK."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _TlsReads(asyncio.BufferedProtocol):
    """Reads a TLS transport for ``protocol``, which sees ordinary ``data_received`` calls, and
    hands OpenSSL's record buffer back after each read.

    For memory, not speed: a TLS transport that calls ``data_received`` itself decrypts every
    read into a fresh 256 KiB bytes object (uvloop's ``SSL_READ_MAX_SIZE``), so glibc could not
    map blocks of that size on their own without paying for it on every read (``service/heap.py``);
    and uvloop's 256 KiB read buffer of each TLS connection then lands in the heap between the
    small allocations of the others. Measured with 1,000 idle associations: 34 KB each instead
    of 42 KB. Buffered, the transport decrypts into the relay's one ``read_buffer`` and each
    read is copied out at once (a copy of what arrived; the loop never runs in between). Plain
    transports are not wrapped: uvloop copies their reads out of its own shared buffer already.
    """

    def __init__(self, protocol: asyncio.Protocol, read_buffer: memoryview) -> None:
        self._protocol = protocol
        self._read_buffer = read_buffer
        self._buffers: BufferRelease | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called once the handshake is done, with the TLS transport."""
        self._buffers = BufferRelease(transport.get_extra_info("ssl_object"))
        self._protocol.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._protocol.data_received(bytes(self._read_buffer[:nbytes]))
        if self._buffers is not None:
            # OpenSSL's record buffer back to the heap until the next read: measured with
            # 1,000 associations held open, 50 -> 42 KB of RSS each (``BufferRelease``).
            self._buffers.release()

    def eof_received(self) -> bool | None:
        return self._protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()


def _tls_reads(
    protocol: asyncio.Protocol, context: ssl.SSLContext | None, read_buffer: memoryview
) -> asyncio.BaseProtocol:
    return protocol if context is None else _TlsReads(protocol, read_buffer)


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, association: Association) -> None:
        self._association = association

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        self._association.upstream_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._association.side_lost(Side.UPSTREAM)

    def pause_writing(self) -> None:
        self._association.writes_full(Side.UPSTREAM, True)

    def resume_writing(self) -> None:
        self._association.writes_full(Side.UPSTREAM, False)


class Association(asyncio.Protocol):
    """One accepted connection: its session, both transports and its timers."""

    def __init__(
        self,
        relay: Relay,
        listener: Listener,
        runtime: Runtime,
        info: AssociationInfo,
        gate: Gate,
    ) -> None:
        self._relay = relay
        self._runtime = runtime  # the rules it started with, whatever reloads come later
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._transports: dict[Side, asyncio.Transport] = {}
        self._session: Session | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._gate = gate  # this connection's lease on the relay's rate limits and caps
        self._wakeup: asyncio.TimerHandle | None = None  # a delayed request's timer
        self._full: set[Side] = set()  # sides whose write buffer is over its high-water mark
        self._session_pauses: set[Side] = set()  # ``PauseReading`` until ``ResumeReading``
        # Sides that speak TLS: what is written to them goes in pieces of TLS_WRITE_BYTES.
        self._requester_tls = False
        self._upstream_tls = False
        self.info = info

    # ---- requester side (asyncio.Protocol) -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called once TCP is up and, on a TLS listener, the handshake has verified the peer."""
        self._transports[Side.REQUESTER] = cast(asyncio.Transport, transport)
        self._relay.associations.add(self)
        ssl_object = transport.get_extra_info("ssl_object")
        self.info.identity = presented_identity(ssl_object)
        self._requester_tls = ssl_object is not None
        config = self._runtime.config
        self._session = Session(
            config.policy,
            self._listener.name,
            self.info.address,
            self.info.identity,
            config.limits.max_pdu_bytes,
            self._gate,
            time.monotonic,  # the loop's clock ticks in milliseconds: too coarse for round trips
            config.limits.max_refusals_per_association,
        )
        self._last_activity = self._loop.time()
        self._timer = self._loop.call_later(config.limits.artim_seconds, self._on_timer)

    def data_received(self, data: bytes) -> None:
        self.info.bytes_from_requester += len(data)
        self._receive(Side.REQUESTER, data)

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.side_lost(Side.REQUESTER)

    def pause_writing(self) -> None:
        self.writes_full(Side.REQUESTER, True)

    def resume_writing(self) -> None:
        self.writes_full(Side.REQUESTER, False)

    # ---- upstream side -------------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self.info.bytes_from_upstream += len(data)
        self._receive(Side.UPSTREAM, data)

    def _receive(self, side: Side, data: bytes) -> None:
        session = self._session
        assert session is not None
        self._last_activity = self._loop.time()
        try:
            commands = session.receive(side, data)
        except Exception as error:
            commands = _internal_error(session, error)
        self._execute(commands)

    async def _check_limits(self, query: LimitQuery) -> None:
        """Ask the relay's shared limit store; without one (or when it cannot answer and the
        rules say ``fail: open``) this process answers from its own counters."""
        store = self._relay.limit_store
        if store is None:
            answer = self._gate.decide_locally(query, time.monotonic())
        else:
            answer = await store.decide(query, self._gate)
        self._step(lambda session: session.limits_answered(answer))

    async def _scan(self, command: Scan) -> None:
        """The data set to clamd; its verdict to the session (the loader makes sure a route
        that scans has a scanner)."""
        scanner = self._runtime.config.scanner
        if scanner is None:
            result, detail = "error", "no scanner configured"
        else:
            result, detail = await clamd.scan(
                scanner.address, command.data, scanner.timeout_seconds
            )
        side = command.side
        self._step(lambda session: session.scan_done(side, result, detail))

    async def _connect(self, name: str) -> None:
        config = self._runtime.config
        upstream = config.upstream(name)
        context = self._runtime.client_contexts.get(name)
        server_hostname = None
        if context is not None and upstream.tls is not None:
            server_hostname = upstream.tls.server_name or upstream.host
        assert self._session is not None
        try:
            # asyncio.timeout, not wait_for: no extra task (and loop iteration) per association
            async with asyncio.timeout(config.limits.connect_timeout_seconds):
                transport, _ = await self._loop.create_connection(
                    lambda: _tls_reads(_UpstreamProtocol(self), context, self._relay.read_buffer),
                    upstream.host,
                    upstream.port,
                    ssl=context,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=config.limits.tls_handshake_seconds if context else None,
                )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            detail = f"{name}: {_describe(error)}{_presented(refused_certificate(error))}"
            cause = upstream_cause(error)
            self.info.upstream_failure = cause
            why = _UPSTREAM_WHY.get(cause, "upstream_unreachable")
            self._step(lambda session: session.upstream_failed(detail, why))
            return
        if self._session.state is State.CLOSED:
            transport.close()
            return
        self._transports[Side.UPSTREAM] = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if context is not None and ssl_object is not None:
            self.info.tls_resumed_upstream = ssl_object.session_reused
            self._upstream_tls = True
        self._step(Session.upstream_connected)

    # ---- shared plumbing -----------------------------------------------------------------------

    def side_lost(self, side: Side) -> None:
        transport = self._transports.pop(side, None)
        if transport is None:
            return
        if side is Side.UPSTREAM:
            self._remember_upstream_session(transport)
        self._step(lambda session: session.connection_lost(side))
        if not self._transports:
            self._finish()

    def _remember_upstream_session(self, transport: asyncio.Transport) -> None:
        """Keep the session of a full handshake for the next association, at close: TLS 1.3
        tickets arrive after the handshake. A resumed session is already the cached one, and
        reading and copying ``ssl_object.session`` costs ~0.2 ms, so it is skipped."""
        if self.info.tls_resumed_upstream is not False:
            return
        assert self._session is not None and self._session.route is not None
        context = self._runtime.client_contexts.get(self._session.route.upstream)
        ssl_object = transport.get_extra_info("ssl_object")
        if context is not None and ssl_object is not None:
            context.remember(ssl_object)

    def buffered_bytes(self) -> int:
        """Bytes waiting in our write buffers, both sides: what backpressure keeps bounded."""
        return sum(t.get_write_buffer_size() for t in self._transports.values())

    def writes_full(self, side: Side, full: bool) -> None:
        """Backpressure: ``side``'s write buffer passed its high-water mark (or drained below
        the low one). What the other side sends would pile up there, so it is not read
        meanwhile; nor is the requester when its own buffer is full, since the firewall's
        refusals of its requests would pile up there too (a requester that sends and never
        reads is held back by TCP, as a PACS that stops reading would hold it)."""
        if full:
            self._full.add(side)
        else:
            self._full.discard(side)
        self._update_reading(Side.REQUESTER)
        self._update_reading(Side.UPSTREAM)

    def _update_reading(self, side: Side) -> None:
        """Read ``side`` unless backpressure or the session says not to."""
        transport = self._transports.get(side)
        if transport is None:
            return
        paused = (
            side.other in self._full
            or side in self._session_pauses
            or (side is Side.REQUESTER and Side.REQUESTER in self._full)
        )
        if paused:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    def _wake(self) -> None:
        """A delayed request's time has come: forward it (the session resumes reading)."""
        self._wakeup = None
        self._last_activity = self._loop.time()
        self._step(Session.wakeup)

    def _step(self, step: Callable[[Session], list[Command]]) -> None:
        """Give the session one input (other than bytes, see ``_receive``) and carry out what
        it answers. An exception from the core is a bug: it costs this association only,
        loudly (A-ABORT both sides), and never escapes into the event loop, where it would
        leave the association hanging with its requester paused and its slot taken."""
        session = self._session
        if session is None:
            return
        try:
            commands = step(session)
        except Exception as error:
            commands = _internal_error(session, error)
        self._execute(commands)

    def _execute(self, commands: Iterable[Command]) -> None:
        for command in commands:
            kind = type(command)
            if kind is Send:
                assert isinstance(command, Send)
                transport = self._transports.get(command.side)
                if transport is not None:
                    tls = (
                        self._upstream_tls if command.side is Side.UPSTREAM else self._requester_tls
                    )
                    if not tls and len(command.data) > 1:
                        # e.g. a held message let go: its PDUs in one writev, not one send each
                        transport.writelines(command.data)
                        continue
                    for buffer in command.data:
                        if tls and len(buffer) > TLS_WRITE_BYTES:
                            _write_in_pieces(transport, buffer, TLS_WRITE_BYTES)
                        else:
                            transport.write(buffer)
            elif kind is Close:
                assert isinstance(command, Close)
                transport = self._transports.get(command.side)
                if transport is not None:
                    transport.close()
            elif kind is ConnectUpstream:
                assert isinstance(command, ConnectUpstream)
                self._spawn(self._connect(command.upstream))
            elif kind is Wakeup:
                assert isinstance(command, Wakeup)
                self._wakeup = self._loop.call_later(command.delay, self._wake)
            elif kind is CheckLimits:
                assert isinstance(command, CheckLimits)
                self._spawn(self._check_limits(command.query))
            elif kind is Scan:
                assert isinstance(command, Scan)
                self._spawn(self._scan(command))
            elif kind is PauseReading:
                assert isinstance(command, PauseReading)
                self._session_pauses.add(command.side)
                self._update_reading(command.side)
            elif kind is ResumeReading:
                assert isinstance(command, ResumeReading)
                self._session_pauses.discard(command.side)
                self._update_reading(command.side)
            else:
                if self.info.calling_ae is None:  # learnt from the A-ASSOCIATE-RQ, once
                    self._identify()
                if kind is AssociationEnded:
                    self.report(final=True)  # what the requests came to, before the end
                self._relay.notify(self.info, command)  # type: ignore[arg-type]

    def report(self, final: bool = False) -> None:
        """Hand what the session counted since its last report to the observers."""
        if self._session is not None:
            for event in self._session.take_report(final):
                self._relay.notify(self.info, event)

    def _identify(self) -> None:
        """Copy who is talking into the info observers read (set once the RQ was decoded)."""
        session = self._session
        assert session is not None
        self.info.calling_ae = session.calling_ae or None
        self.info.called_ae = session.called_ae or None
        self.info.route = session.route.name if session.route else None

    def _on_timer(self) -> None:
        session = self._session
        if session is None or session.state is State.CLOSED:
            return
        limits = self._runtime.config.limits
        if session.state is State.AWAIT_RQ:
            self._step(lambda session: session.timed_out("artim"))
            return
        quiet = self._loop.time() - self._last_activity
        if session.holding:  # waiting for a delayed request is not idleness
            quiet = 0.0
        if quiet >= limits.idle_seconds:
            self._step(lambda session: session.timed_out("idle"))
        else:
            self._timer = self._loop.call_later(limits.idle_seconds - quiet, self._on_timer)

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._wakeup is not None:
            self._wakeup.cancel()
        self._gate.release()
        if self._relay.limit_store is not None:
            self._relay.limit_store.release(self._gate)
        self._relay.associations.discard(self)

    def _spawn(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def abort(self) -> None:
        """Used by shutdown: A-ABORT both sides now."""
        self._step(lambda session: session.abort("shutdown", "the daemon is stopping"))
        for transport in list(self._transports.values()):
            transport.close()


def _internal_error(session: Session, error: Exception) -> list[Command]:
    """A bug in the core must cost its association only, and loudly: log it with its stack,
    A-ABORT both sides."""
    log.exception("event=internal_error")
    return session.abort("internal_error", repr(error))


async def _read_proxy_header(connection: socket.socket) -> ProxyHeader:
    """Exactly the header's bytes: what follows is the client's, for TLS or the session."""
    loop = asyncio.get_running_loop()
    reader = ProxyHeaderReader()
    while True:
        data = await loop.sock_recv(connection, reader.need)
        if not data:
            raise InvalidProxyHeader("the connection closed before the PROXY header ended")
        header = reader.feed(data)
        if header is not None:
            return header


async def _first_byte(
    loop: asyncio.AbstractEventLoop, connection: socket.socket, timeout: float
) -> bool:
    """Wait, at most ``timeout`` (else TimeoutError), for a TLS client's first byte: True once
    it has sent one (left in the socket for the handshake: peeked, not read), False if it
    closed or reset the connection without one.

    A load balancer's or a monitor's TCP health check connects and closes at once. Handed to
    the TLS handshake, that ends as a handshake failure (a connection reset, or EOF), which
    would be logged and counted as a refused client every few seconds; it is a probe, as on a
    plain listener. Asking first costs one readiness wait per TLS connection, which the
    handshake would have waited for anyway."""
    readable = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(connection.fileno(), ready)
    try:
        async with asyncio.timeout(timeout):
            await readable
    finally:
        loop.remove_reader(connection.fileno())
    try:
        return bool(connection.recv(1, socket.MSG_PEEK))
    except BlockingIOError:  # a spurious wake-up: the handshake will wait for the bytes
        return True
    except ConnectionError:  # reset before a byte: some balancers close their checks so
        return False


def _describe(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"{error.reason}: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


def _presented(certificate: RefusedCertificate | None) -> str:
    """What an upstream whose certificate did not verify presented, for the detail."""
    if certificate is None:
        return ""
    return (
        f" (it presented {certificate.subject}, issued by {certificate.issuer},"
        f" serial {certificate.serial})"
    )


#: The start of the message asyncio's and uvloop's SSL protocols abort a handshake with when
#: ``ssl_handshake_timeout`` passes.
_HANDSHAKE_TIMED_OUT: Final = "SSL handshake is taking longer than"
#: OpenSSL verify results (X509_V_ERR_*) that say which of a client certificate's checks failed.
_VERIFY_CAUSES: Final = {
    2: "unknown_ca",  # unable to get issuer certificate
    18: "unknown_ca",  # self-signed certificate
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    10: "certificate_expired",
    23: "certificate_revoked",
    # The listener's CRL, not the client, is at fault: every client is refused until it is
    # renewed (expired) or replaced (the rest).
    12: "crl_expired",
    **dict.fromkeys((3, 5, 8, 11, 15, 16, 33, 35, 36, 44, 54), "crl_invalid"),
}
#: OpenSSL reason codes of handshakes that failed before certificates were compared.
_REASON_CAUSES: Final = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "WRONG_SSL_VERSION": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "WRONG_VERSION_NUMBER": "not_tls",  # e.g. plain DICOM sent to a TLS listener
    "HTTP_REQUEST": "not_tls",
    "HTTPS_PROXY_REQUEST": "not_tls",
}


def handshake_cause(error: BaseException) -> str:
    """Why a listener's TLS handshake failed, as one of a fixed set of labels: no_certificate,
    unknown_ca, certificate_expired, certificate_revoked, certificate_invalid, crl_expired,
    crl_invalid, protocol_version, no_shared_cipher, not_tls, peer_alert (the client refused
    us), timeout, connection_lost, other."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_CAUSES.get(error.verify_code, "certificate_invalid")
    if isinstance(error, ssl.SSLError):
        reason = error.reason or ""
        return _REASON_CAUSES.get(reason, "peer_alert" if "_ALERT_" in reason else "other")
    if isinstance(error, TimeoutError) or (
        # asyncio and uvloop both end a handshake past ``ssl_handshake_timeout`` this way
        isinstance(error, ConnectionAbortedError) and _HANDSHAKE_TIMED_OUT in str(error)
    ):
        return "timeout"
    if isinstance(error, OSError):  # ConnectionResetError, EOF in the handshake, ...
        return "connection_lost"
    return "other"


#: The ``AssociationRejected`` why of an upstream connection failure that is not the PACS
#: being unreachable: a certificate problem is fixed elsewhere than a PACS that is down.
_UPSTREAM_WHY: Final = {
    "certificate_invalid": "upstream_certificate_invalid",
    "tls_handshake_failed": "upstream_tls_failed",
}


def upstream_cause(error: BaseException) -> str:
    """Why an upstream connection failed, as one of a fixed set of labels: certificate_invalid
    (its certificate did not verify: another CA, expired, another name), tls_handshake_failed
    (the handshake failed otherwise: it refused our certificate, no common version),
    refused, timeout (connect or handshake), connection_lost, unreachable (no route, no such
    host), other."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return "certificate_invalid"
    if isinstance(error, ssl.SSLError):
        return "tls_handshake_failed"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, TimeoutError) or _HANDSHAKE_TIMED_OUT in str(error):
        return "timeout"
    if isinstance(error, ConnectionError):
        return "connection_lost"
    if isinstance(error, OSError):
        return "unreachable"
    return "other"


def bind_listeners(listeners: Sequence[Listener]) -> list[socket.socket]:
    """A listening socket per listener, in order; on failure none is left open."""
    sockets: list[socket.socket] = []
    try:
        for listener in listeners:
            sockets.append(
                socket.create_server(
                    (listener.host, listener.port),
                    family=socket.AF_INET6 if ":" in listener.host else socket.AF_INET,
                    backlog=1024,
                    reuse_port=False,
                )
            )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Relay:
    """All listeners of one daemon process, sharing the current ``Runtime``."""

    def __init__(self, runtime: Runtime, observers: Iterable[Observer] = ()) -> None:
        self.runtime = runtime
        self.observers = list(observers)
        self.associations: set[Association] = set()
        self.connections = 0  # accepted so far, refused ones included
        self.read_buffer = memoryview(bytearray(READ_BYTES))  # see ``_TlsReads``
        self.limiter = Limiter()  # survives reloads: counts of open associations stay true
        self.limit_store: LimitStore | None = None  # with ``Limiter(shared=True)``
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        self._tallying: asyncio.Task[None] | None = None

    async def start(self, sockets: Sequence[socket.socket] | None = None) -> None:
        """Bind every listener, or accept on ``sockets`` (one per listener, in order) that a
        supervisor bound for all its workers. Accepting is ours (not ``create_server``'s) so
        that each connection is checked against the source allowlist before a byte is read,
        and gets the TLS context current at that moment: a reload needs no re-bind."""
        listeners = self.runtime.config.listeners
        if sockets is None:
            sockets = bind_listeners(listeners)
        for listener, sock in zip(listeners, sockets, strict=True):
            sock.setblocking(False)
            self._sockets.append(sock)
            task = asyncio.get_running_loop().create_task(self._accept(listener, sock))
            self._accepting.append(task)
        self._tallying = asyncio.get_running_loop().create_task(self._report_tallies())

    async def _report_tallies(self) -> None:
        """Every ``_TALLY_SECONDS``, each open association reports its requests, so metrics
        of long associations stay current without a call per request."""
        while True:
            await asyncio.sleep(_TALLY_SECONDS)
            for association in list(self.associations):
                association.report()

    async def _accept(self, listener: Listener, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, peer = await loop.sock_accept(sock)
            except OSError as error:  # e.g. EMFILE: back off instead of spinning
                log_event(
                    log, logging.ERROR, "accept_failed", listener=listener.name, error=str(error)
                )
                await asyncio.sleep(0.5)
                continue
            self._admit(listener, connection, peer)

    def _admit(self, listener: Listener, connection: socket.socket, peer: Any) -> None:
        self.connections += 1
        runtime = self.runtime
        # The listener as the current rules define it (PROXY settings follow a reload).
        listener = next((x for x in runtime.config.listeners if x.name == listener.name), listener)
        info = AssociationInfo(listener.name, ipaddress.ip_address(peer[0]), peer[1])
        if listener.proxy_protocol:
            if not in_networks(listener.proxy_from, info.address):
                self.notify(info, Refused("proxy_source_denied", str(info.address)))
                connection.close()
                return
            self._spawn_handshake(self._proxied(listener, runtime, info, connection))
            return
        gate = self._check_source(listener, runtime, info, connection)
        if gate is not None:
            self._spawn_handshake(self._open(listener, runtime, info, connection, gate))

    def _check_source(
        self, listener: Listener, runtime: Runtime, info: AssociationInfo, connection: socket.socket
    ) -> Gate | None:
        """The source allowlist and the pending-connection cap, before a byte of TLS or DICOM is
        read; on refusal the connection is closed and ``None`` returned."""
        policy = runtime.config.policy
        if not policy.admits_source(info.address):
            if policy.listener_mode(listener.name) != MONITOR:
                self.notify(info, Refused("source_address_denied", str(info.address)))
                connection.close()
                return None
            would = WouldRefuse(
                "connection", "source_address_denied", str(info.address), "connection closed"
            )
            self.notify(info, would)
        gate = self.limiter.connect(runtime.config.limits.rates, listener.name, info.address)
        if gate is None:  # too many connections from there that have not associated yet
            self.notify(info, Refused("pending_limit_exceeded", str(info.address)))
            connection.close()
            return None
        _nodelay(connection)
        return gate

    def _spawn_handshake(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _proxied(
        self, listener: Listener, runtime: Runtime, info: AssociationInfo, connection: socket.socket
    ) -> None:
        """A listener behind a load balancer: read its PROXY v2 header (bounded in size and
        time, and never a byte beyond it), then go on as if the real client had connected."""
        try:
            async with asyncio.timeout(_PROXY_HEADER_SECONDS):
                header = await _read_proxy_header(connection)
        except (InvalidProxyHeader, OSError, TimeoutError) as error:
            self.notify(info, Refused("proxy_header_invalid", _describe(error)))
            connection.close()
            return
        except asyncio.CancelledError:
            connection.close()
            raise
        if header.source is not None:  # PROXY; LOCAL is the balancer's own connection
            info.proxied_by = info.address
            info.address, info.port = header.source
        gate = self._check_source(listener, runtime, info, connection)
        if gate is not None:
            await self._open(listener, runtime, info, connection, gate)

    async def _open(
        self,
        listener: Listener,
        runtime: Runtime,
        info: AssociationInfo,
        connection: socket.socket,
        gate: Gate,
    ) -> None:
        loop = asyncio.get_running_loop()
        context = runtime.server_contexts.get(listener.name)
        handshake_seconds = runtime.config.limits.tls_handshake_seconds
        if context is not None:
            started = loop.time()
            ended: Refused | AssociationEnded | None = None
            try:
                if not await _first_byte(loop, connection, handshake_seconds):
                    # as on a plain listener (``Session.connection_lost``)
                    ended = AssociationEnded("probe", "closed_without_a_byte")
            except TimeoutError:
                detail = f"no TLS ClientHello within {handshake_seconds:g} s"
                ended = Refused("tls_handshake_failed", detail, "timeout")
            except asyncio.CancelledError:  # the daemon stopped first
                connection.close()
                gate.release()
                raise
            if ended is not None:
                self.notify(info, ended)
                connection.close()
                gate.release()
                return
            handshake_seconds = max(0.001, handshake_seconds - (loop.time() - started))
            accepting(connection)  # where a refused handshake sends its alert
        try:
            await loop.connect_accepted_socket(
                lambda: _tls_reads(
                    Association(self, listener, runtime, info, gate), context, self.read_buffer
                ),
                connection,
                ssl=context,
                ssl_handshake_timeout=handshake_seconds if context else None,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as error:
            refused = Refused(
                "tls_handshake_failed",
                _describe(error),
                handshake_cause(error),
                refused_certificate(error),
            )
            self.notify(info, refused)
            connection.close()
            gate.release()
        except asyncio.CancelledError:  # the daemon stopped before the handshake ended
            connection.close()
            gate.release()
            raise

    def bound_ports(self) -> dict[str, int]:
        """Listener name -> the port it actually bound (useful with port 0 in tests)."""
        return {
            listener.name: sock.getsockname()[1]
            for listener, sock in zip(self.runtime.config.listeners, self._sockets, strict=True)
        }

    def swap(self, runtime: Runtime) -> None:
        """New associations use ``runtime``; open ones keep the one they started with."""
        self.runtime = runtime

    def notify(self, info: AssociationInfo, event: Event | Refused) -> None:
        for observer in self.observers:
            try:
                observer(info, event)
            except Exception:  # an observer must never break the relay
                log.exception("event=observer_failed")

    async def close_listeners(self) -> None:
        """Stop accepting: from now on the kernel refuses new connections (idempotent)."""
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        for sock in self._sockets:
            sock.close()

    async def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop accepting; let open associations finish up to ``drain_seconds``; abort the rest.

        The listening sockets close first, so from then on the kernel refuses new connections
        (a balancer or the modality retries elsewhere or later). What is still open at the
        deadline gets A-ABORT on both sides (PS3.8 §9.3.8), so no peer takes an unfinished
        transfer for a stored one; the aborts are given a moment to be written.
        """
        await self.close_listeners()
        deadline = time.monotonic() + drain_seconds
        while (self.associations or self._handshakes) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for handshake in list(self._handshakes):
            handshake.cancel()
        for association in list(self.associations):
            association.abort()
        deadline = time.monotonic() + _ABORT_FLUSH_SECONDS
        while self.associations and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._tallying is not None:
            self._tallying.cancel()
            await asyncio.gather(self._tallying, return_exceptions=True)
