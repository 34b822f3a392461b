"""A tiny mutual-TLS SCP for the "1,000 associations held open" measurement.

``storescp --fork`` would need a process (and a full TLS handshake) per held association, so
the hold test uses this instead: one uvloop process that accepts any A-ASSOCIATE-RQ (every
context, its first transfer syntax), answers A-RELEASE-RQ with A-RELEASE-RP, and aborts on
anything else. It only stands behind the firewall or stunnel; its own memory is not measured.

    python bench/tiny_scp.py --port 11300 --cert scp.pem --key scp.key --ca ca.pem
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from dcm_pdus import (
    A_ASSOCIATE_RQ_TYPE,
    A_RELEASE_RQ_TYPE,
    abort,
    associate_ac_for,
    release_rp,
)

_HEADER = struct.Struct(">BxL")
_MAX_PDU = 1 << 20


class MiniScp(asyncio.Protocol):
    """One association: parse whole PDUs, answer the association and the release."""

    def __init__(self, answers: dict[bytes, bytes]) -> None:
        self._answers = answers  # A-ASSOCIATE-RQ bytes -> AC bytes (all RQs look alike here)
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 6:
            pdu_type, length = _HEADER.unpack_from(self._buffer)
            if length > _MAX_PDU:
                self._fail()
                return
            if len(self._buffer) < 6 + length:
                return
            raw = bytes(self._buffer[: 6 + length])
            del self._buffer[: 6 + length]
            self._handle(pdu_type, raw)

    def _handle(self, pdu_type: int, raw: bytes) -> None:
        assert self._transport is not None
        if pdu_type == A_ASSOCIATE_RQ_TYPE:
            answer = self._answers.get(raw)
            if answer is None:
                answer = self._answers[raw] = associate_ac_for(raw)
            self._transport.write(answer)
        elif pdu_type == A_RELEASE_RQ_TYPE:
            self._transport.write(release_rp())
            self._transport.close()
        else:
            self._fail()

    def _fail(self) -> None:
        assert self._transport is not None
        self._transport.write(abort())
        self._transport.close()


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def serve(port: int, context: ssl.SSLContext) -> None:
    answers: dict[bytes, bytes] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MiniScp(answers), "127.0.0.1", port, ssl=context, backlog=2048
    )
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    args = parser.parse_args(argv)
    context = server_context(args.cert, args.key, args.ca)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, context))
    else:
        uvloop.run(serve(args.port, context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
