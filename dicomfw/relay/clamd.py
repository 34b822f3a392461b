"""Hand a data set to a running ClamAV daemon (clamd(8), the INSTREAM command) and read its verdict.

Content validation finds what a DICOM parser must not see; a virus scanner finds what a person
opening a document must not get (an infected PDF, an executable disguised as one). clamd is
Debian's ``clamav-daemon``: it listens on a Unix socket (``unix:/run/clamav/clamd.ctl``) or TCP
(``HOST:PORT``). INSTREAM sends the data in chunks, each behind its length as a 4-byte big-endian
integer, ends with a zero length, and clamd answers one line: ``stream: OK``, ``stream: NAME
FOUND`` or ``... ERROR`` (e.g. over its StreamMaxLength). The whole exchange is bounded by one
timeout; what cannot be answered in time is an error, for the route's ``fail`` to decide.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final

#: INSTREAM chunk size: clamd reads each into memory; 64 KiB keeps both sides' buffers small.
_CHUNK: Final = 65_536
_LENGTH: Final = struct.Struct(">L")
#: A verdict line longer than this is not clamd's.
_MAX_REPLY: Final = 4096


async def scan(address: str, data: bytes, timeout: float) -> tuple[str, str]:
    """``("clean", "")``, ``("found", signature)`` or ``("error", why)``."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(address)
            try:
                writer.write(b"zINSTREAM\0")
                view = memoryview(data)
                for start in range(0, len(view), _CHUNK):
                    chunk = view[start : start + _CHUNK]
                    writer.write(_LENGTH.pack(len(chunk)))
                    writer.write(chunk)
                    await writer.drain()
                writer.write(_LENGTH.pack(0))
                reply = await reader.readuntil(b"\0")
            finally:
                writer.close()
    except TimeoutError:
        return "error", f"no answer from {address} within {timeout:g} s"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
        return "error", f"{address}: {error.strerror if isinstance(error, OSError) else error}"
    return verdict(reply)


def verdict(reply: bytes) -> tuple[str, str]:
    """clamd's one-line answer to INSTREAM, sorted (the signature name is cut and escaped: it
    comes from the scanner's database, but ends up in logs)."""
    text = reply[:_MAX_REPLY].rstrip(b"\0").decode("ascii", "backslashreplace").strip()
    if text.endswith(" FOUND"):
        signature = text.removeprefix("stream:").removesuffix(" FOUND").strip()
        return "found", signature[:128]
    if text.endswith(": OK"):
        return "clean", ""
    return "error", text[:128] or "an empty answer"


async def _connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.startswith("unix:"):
        return await asyncio.open_unix_connection(address[5:], limit=_MAX_REPLY)
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port), limit=_MAX_REPLY)
