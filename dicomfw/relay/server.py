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
from typing import Any

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

    def __init__(self, relay: Relay, listener: Listener) -> None:
        self._relay = relay
        self._runtime = relay.runtime  # the rules it started with, whatever reloads come later
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._transports: dict[Side, asyncio.Transport] = {}
        self._session: Session | None = None
        self._early = bytearray()  # app data that arrived before the TLS set-up returned
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.info: AssociationInfo | None = None

    # ---- requester side (asyncio.Protocol) -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        host, port = transport.get_extra_info("peername")[:2]
        address = ipaddress.ip_address(host)
        self.info = AssociationInfo(self._listener.name, address, port)
        if not self._runtime.config.policy.admits_source(address):
            self._relay.notify(self.info, Refused("source_address_denied", f"{address}"))
            transport.abort()
            return
        _nodelay(transport)
        self._transports[Side.REQUESTER] = transport
        self._relay.associations.add(self)
        if self._listener.tls is None:
            self._begin(None)
        else:
            transport.pause_reading()
            self._spawn(self._start_tls(transport))

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        context = self._runtime.server_contexts[self._listener.name]
        assert self.info is not None
        try:
            tls_transport = await self._loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._runtime.config.limits.tls_handshake_seconds,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as error:
            self._relay.notify(self.info, Refused("tls_handshake_failed", _describe(error)))
            transport.abort()
            self._relay.associations.discard(self)
            return
        if tls_transport is None:  # the peer went away during the handshake
            self._relay.associations.discard(self)
            return
        self._transports[Side.REQUESTER] = tls_transport
        self.info.identity = presented_identity(tls_transport.get_extra_info("ssl_object"))
        self._begin(self.info.identity)

    def _begin(self, identity: PresentedIdentity | None) -> None:
        assert self.info is not None
        config = self._runtime.config
        self._session = Session(
            config.policy,
            self._listener.name,
            self.info.address,
            identity,
            config.limits.max_pdu_bytes,
        )
        self._last_activity = self._loop.time()
        self._timer = self._loop.call_later(config.limits.artim_seconds, self._on_timer)
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.data_received(early)

    def data_received(self, data: bytes) -> None:
        session = self._session
        if session is None:
            self._early += data
            return
        self._last_activity = self._loop.time()
        assert self.info is not None
        self.info.bytes_from_requester += len(data)
        self._execute(session.receive(Side.REQUESTER, data))

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
        assert self._session is not None and self.info is not None
        self._last_activity = self._loop.time()
        self.info.bytes_from_upstream += len(data)
        self._execute(self._session.receive(Side.UPSTREAM, data))

    async def _connect(self, name: str) -> None:
        config = self._runtime.config
        upstream = config.upstream(name)
        context = self._runtime.client_contexts.get(name)
        server_hostname = None
        if context is not None and upstream.tls is not None:
            server_hostname = upstream.tls.server_name or upstream.host
        assert self._session is not None and self.info is not None
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
        assert isinstance(transport, asyncio.Transport)
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
                assert self.info is not None
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
            self._execute(self._session.timed_out("shutdown"))
        for transport in list(self._transports.values()):
            transport.close()


def _describe(error: BaseException) -> str:
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
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.runtime.config.listeners:
            server = await loop.create_server(
                lambda listener=listener: Association(self, listener),  # type: ignore[misc]
                listener.host,
                listener.port,
                reuse_address=True,
                backlog=1024,
            )
            self._servers.append(server)

    def bound_ports(self) -> dict[str, int]:
        """Listener name -> the port it actually bound (useful with port 0 in tests)."""
        return {
            listener.name: server.sockets[0].getsockname()[1]
            for listener, server in zip(self.runtime.config.listeners, self._servers, strict=True)
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
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + drain_seconds
        while self.associations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for association in list(self.associations):
            association.abort()
        for server in self._servers:
            await server.wait_closed()
