"""A bare plain->TLS byte pump on uvloop: the floor any asyncio relay starts from.

No DICOM at all: each accepted connection gets a mutual-TLS connection to the upstream (with
dicomfw's own TLS client context, so the same ciphers and session resumption) and bytes are
copied both ways with backpressure. The benchmark runs it next to dicomfw so the cost of
dicomfw's inspection and policy shows separately from the cost of uvloop + Python's ssl.

    python bench/bare_relay.py --listen 11113 --upstream-port 2762 \
        --ca ca.pem --cert fw.pem --key fw.key
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from dicomfw.config.model import ClientTLS
from dicomfw.relay.tls import ResumingClientContext, client_context


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Upstream(asyncio.Protocol):
    def __init__(self, downstream: Pump) -> None:
        self.downstream = downstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.downstream.to_requester(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.downstream.close()

    def pause_writing(self) -> None:
        self.downstream.pause_requester()

    def resume_writing(self) -> None:
        self.downstream.resume_requester()


class Pump(asyncio.Protocol):
    """One accepted connection and its upstream; early bytes wait for the upstream."""

    def __init__(self, target: tuple[str, int], context: ResumingClientContext) -> None:
        self.target, self.context = target, context
        self.requester: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.requester = cast(asyncio.Transport, transport)
        _nodelay(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Upstream(self),
                    *self.target,
                    ssl=self.context,
                    server_hostname=self.target[0],
                ),
                timeout=10,
            )
        except (OSError, TimeoutError):
            self.close()
            return
        self.upstream = transport
        self.context.remember(transport.get_extra_info("ssl_object"))
        for data in self.early:
            transport.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def to_requester(self, data: bytes) -> None:
        if self.requester is not None:
            self.requester.write(data)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def pause_requester(self) -> None:
        if self.requester is not None:
            self.requester.pause_reading()

    def resume_requester(self) -> None:
        if self.requester is not None:
            self.requester.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        for transport in (self.requester, self.upstream):
            if transport is not None:
                transport.close()


async def serve(port: int, target: tuple[str, int], context: ResumingClientContext) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Pump(target, context), "127.0.0.1", port, backlog=1024
    )
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream-host", default="127.0.0.1")
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    args = parser.parse_args(argv)
    context = client_context(ClientTLS(ca=args.ca, cert=args.cert, key=args.key), "bare")
    import uvloop

    uvloop.run(serve(args.listen, (args.upstream_host, args.upstream_port), context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
