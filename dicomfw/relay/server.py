"""The asyncio relay: accept, (TLS-)handshake, connect upstream, move bytes, run the session.

The relay decides nothing. Every byte goes to the association's sans-IO ``Session`` and the relay
carries out the commands that come back (write, connect, close) and hands the events to the
observers (log, audit, metrics). What it owns is the I/O: TLS via ``loop.start_tls`` with the
context current at accept time (so a reload changes certificates without re-binding), TCP_NODELAY
on both sockets, backpressure both ways (a full write buffer on one side pauses reading on the
other), and the ARTIM / idle / connect / handshake timers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from dicomfw.config.model import Config, Listener
from dicomfw.core.policy import IPAddress, PresentedIdentity
from dicomfw.core.session import (
    Close,
    Command,
    ConnectUpstream,
    Event,
    Send,
    Session,
    Side,
    State,
)
from dicomfw.logsetup import log_event
from dicomfw.relay.tls import (
    ResumingClientContext,
    client_context,
    presented_identity,
    server_context,
)

log = logging.getLogger("dicomfw.relay")


@dataclass(frozen=True)
class Runtime:
    """Everything one association needs, built and validated before it is swapped in."""

    config: Config
    server_contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)
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


Observer = Callable[[AssociationInfo, "Event | Refused"], None]


@dataclass(frozen=True, slots=True)
class Refused:
    """A connection refused before any DICOM was spoken (source address, TLS handshake)."""

    why: str
    detail: str


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, association: Association) -> None:
        self._association = association

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self._association.upstream_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._association.side_lost(Side.UPSTREAM)

    def pause_writing(self) -> None:
        self._association.pause_reading(Side.REQUESTER)

    def resume_writing(self) -> None:
        self._association.resume_reading(Side.REQUESTER)


class Association(asyncio.Protocol):
    """One accepted connection: its session, both transports and its timers."""

    def __init__(self, relay: Relay, listener: Listener, runtime: Runtime, info: AssociationInfo):
        self._relay = relay
        self._runtime = runtime  # the rules it started with, whatever reloads come later
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._transports: dict[Side, asyncio.Transport] = {}
        self._session: Session | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.info = info

    # ---- requester side (asyncio.Protocol) -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called once TCP is up and, on a TLS listener, the handshake has verified the peer."""
        self._transports[Side.REQUESTER] = cast(asyncio.Transport, transport)
        self._relay.associations.add(self)
        self.info.identity = presented_identity(transport.get_extra_info("ssl_object"))
        config = self._runtime.config
        self._session = Session(
            config.policy,
            self._listener.name,
            self.info.address,
            self.info.identity,
            config.limits.max_pdu_bytes,
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
        self.pause_reading(Side.UPSTREAM)

    def resume_writing(self) -> None:
        self.resume_reading(Side.UPSTREAM)

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
        except Exception as error:  # a bug must cost this association only, and loudly
            log.exception("event=internal_error side=%s", side.value)
            commands = session.abort("internal_error", repr(error))
        self._execute(commands)

    async def _connect(self, name: str) -> None:
        config = self._runtime.config
        upstream = config.upstream(name)
        context = self._runtime.client_contexts.get(name)
        server_hostname = None
        if context is not None and upstream.tls is not None:
            server_hostname = upstream.tls.server_name or upstream.host
        assert self._session is not None
        try:
            transport, _ = await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: _UpstreamProtocol(self),
                    upstream.host,
                    upstream.port,
                    ssl=context,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=config.limits.tls_handshake_seconds if context else None,
                ),
                timeout=config.limits.connect_timeout_seconds,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            self._execute(self._session.upstream_failed(f"{name}: {_describe(error)}"))
            return
        if self._session.state is State.CLOSED:
            transport.close()
            return
        self._transports[Side.UPSTREAM] = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if context is not None and ssl_object is not None:
            self.info.tls_resumed_upstream = ssl_object.session_reused
            context.remember(ssl_object)
        self._execute(self._session.upstream_connected())

    # ---- shared plumbing -----------------------------------------------------------------------

    def side_lost(self, side: Side) -> None:
        transport = self._transports.pop(side, None)
        if transport is None:
            return
        if side is Side.UPSTREAM:
            self._remember_upstream_session(transport)
        if self._session is not None:
            self._execute(self._session.connection_lost(side))
        if not self._transports:
            self._finish()

    def _remember_upstream_session(self, transport: asyncio.Transport) -> None:
        """TLS 1.3 tickets arrive after the handshake: keep the freshest one at close."""
        assert self._session is not None
        if self._session.route is None:
            return
        context = self._runtime.client_contexts.get(self._session.route.upstream)
        ssl_object = transport.get_extra_info("ssl_object")
        if context is not None and ssl_object is not None:
            context.remember(ssl_object)

    def buffered_bytes(self) -> int:
        """Bytes waiting in our write buffers, both sides: what backpressure keeps bounded."""
        return sum(t.get_write_buffer_size() for t in self._transports.values())

    def pause_reading(self, side: Side) -> None:
        transport = self._transports.get(side)
        if transport is not None and transport.is_reading():
            transport.pause_reading()

    def resume_reading(self, side: Side) -> None:
        transport = self._transports.get(side)
        if transport is not None and not transport.is_reading():
            transport.resume_reading()

    def _execute(self, commands: Iterable[Command]) -> None:
        for command in commands:
            kind = type(command)
            if kind is Send:
                assert isinstance(command, Send)
                transport = self._transports.get(command.side)
                if transport is not None:
                    for buffer in command.data:
                        transport.write(buffer)
            elif kind is Close:
                assert isinstance(command, Close)
                transport = self._transports.get(command.side)
                if transport is not None:
                    transport.close()
            elif kind is ConnectUpstream:
                assert isinstance(command, ConnectUpstream)
                self._spawn(self._connect(command.upstream))
            else:
                assert self._session is not None
                session = self._session
                self.info.calling_ae = session.calling_ae or None
                self.info.called_ae = session.called_ae or None
                self.info.route = session.route.name if session.route else None
                self._relay.notify(self.info, command)  # type: ignore[arg-type]

    def _on_timer(self) -> None:
        session = self._session
        if session is None or session.state is State.CLOSED:
            return
        limits = self._runtime.config.limits
        if session.state is State.AWAIT_RQ:
            self._execute(session.timed_out("artim"))
            return
        quiet = self._loop.time() - self._last_activity
        if quiet >= limits.idle_seconds:
            self._execute(session.timed_out("idle"))
        else:
            self._timer = self._loop.call_later(limits.idle_seconds - quiet, self._on_timer)

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._relay.associations.discard(self)

    def _spawn(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def abort(self) -> None:
        """Used by shutdown: A-ABORT both sides now."""
        if self._session is not None:
            self._execute(self._session.abort("shutdown", "the daemon is stopping"))
        for transport in list(self._transports.values()):
            transport.close()


def _describe(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"{error.reason}: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


class Relay:
    """All listeners of one daemon process, sharing the current ``Runtime``."""

    def __init__(self, runtime: Runtime, observers: Iterable[Observer] = ()) -> None:
        self.runtime = runtime
        self.observers = list(observers)
        self.associations: set[Association] = set()
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind every listener. Accepting is ours (not ``create_server``'s) so that each
        connection is checked against the source allowlist before a byte is read, and gets
        the TLS context current at that moment: a reload needs no re-bind."""
        for listener in self.runtime.config.listeners:
            sock = socket.create_server(
                (listener.host, listener.port),
                family=socket.AF_INET6 if ":" in listener.host else socket.AF_INET,
                backlog=1024,
                reuse_port=False,
            )
            sock.setblocking(False)
            self._sockets.append(sock)
            task = asyncio.get_running_loop().create_task(self._accept(listener, sock))
            self._accepting.append(task)

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
        runtime = self.runtime
        info = AssociationInfo(listener.name, ipaddress.ip_address(peer[0]), peer[1])
        if not runtime.config.policy.admits_source(info.address):
            self.notify(info, Refused("source_address_denied", str(info.address)))
            connection.close()
            return
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = runtime.server_contexts.get(listener.name)
        task = asyncio.get_running_loop().create_task(
            self._open(listener, runtime, info, connection, context)
        )
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _open(
        self,
        listener: Listener,
        runtime: Runtime,
        info: AssociationInfo,
        connection: socket.socket,
        context: ssl.SSLContext | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: Association(self, listener, runtime, info),
                connection,
                ssl=context,
                ssl_handshake_timeout=runtime.config.limits.tls_handshake_seconds
                if context
                else None,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as error:
            self.notify(info, Refused("tls_handshake_failed", _describe(error)))
            connection.close()

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

    async def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop accepting; let open associations finish up to ``drain_seconds``; abort the rest."""
        for task in self._accepting:
            task.cancel()
        for sock in self._sockets:
            sock.close()
        deadline = time.monotonic() + drain_seconds
        while self.associations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for association in list(self.associations):
            association.abort()
