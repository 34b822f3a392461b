"""The PROXY protocol, version 2 (binary), as sent by an L4 load balancer: sans-IO and strict.

Behind HAProxy, IPVS-with-a-proxy or a cloud balancer, every TCP connection comes from the
balancer; the PROXY header it sends first says who the real client is, so allowlists, limits,
audit and logs see that address. Reference: "The PROXY protocol, Versions 1 & 2" (haproxy.org,
doc/proxy-protocol.txt), §2.2 for the binary format:

    bytes 0-11   signature \\r\\n\\r\\n\\0\\r\\nQUIT\\n
    byte 12      version (high nibble, 2) and command (low nibble: 0 LOCAL, 1 PROXY)
    byte 13      address family (high nibble: 1 INET, 2 INET6) and transport (low: 1 STREAM)
    bytes 14-15  length of what follows, big-endian
    then         source address, destination address, source port, destination port
                 (4+4+2+2 bytes for INET, 16+16+2+2 for INET6), then TLVs (type, length, value)

Only what a DICOM listener can use is accepted: version 2, PROXY over TCP/IPv4 or TCP/IPv6, or
LOCAL (the balancer's own connection, e.g. a health check: §2.2 says to use the real endpoints
then). Anything else — the text version 1, UDP, UNIX sockets, a malformed TLV list, a header
longer than ``MAX_HEADER_BYTES`` — is an error, and the caller drops the connection. TLVs are
checked for framing but not interpreted (their CRC32c, if any, is not verified).

``ProxyHeaderReader.need`` says how many bytes to read next, so the caller never reads past the
header into the client's TLS ClientHello or A-ASSOCIATE-RQ.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

from dicomfw.core.policy import IPAddress
from dicomfw.errors import DicomfwError, LocalProtocolError

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_BYTES: Final = 16  # signature, version/command, family/transport, length
#: The longest header accepted: the address block plus 4 KiB of TLVs (balancers send a few).
MAX_HEADER_BYTES: Final = HEADER_BYTES + 36 + 4096

_LOCAL: Final = 0x20
_PROXY: Final = 0x21
_TCP4: Final = 0x11
_TCP6: Final = 0x21
_ADDRESS_BYTES: Final = {_TCP4: 12, _TCP6: 36}


class InvalidProxyHeader(DicomfwError):
    """The connection did not start with a valid PROXY v2 header: drop it."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """``source``/``destination`` are (address, port); ``None`` for LOCAL (use the real ones)."""

    command: Literal["PROXY", "LOCAL"]
    source: tuple[IPAddress, int] | None = None
    destination: tuple[IPAddress, int] | None = None


class ProxyHeaderReader:
    """Collects one PROXY v2 header, fed exactly ``need`` bytes at a time (or fewer)."""

    __slots__ = ("_buffer", "_total")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._total = HEADER_BYTES

    @property
    def need(self) -> int:
        """Bytes still missing from the header (0 once it is complete)."""
        return self._total - len(self._buffer)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; return the header once complete. Wrong bytes fail as soon as they are
        seen: a client speaking DICOM or TLS directly is refused on its first byte."""
        if len(data) > self.need:
            raise LocalProtocolError("fed more than the PROXY header needs")
        start = len(self._buffer)
        self._buffer += data
        signature_part = self._buffer[start : len(SIGNATURE)]
        if signature_part != SIGNATURE[start : start + len(signature_part)]:
            raise InvalidProxyHeader("not a PROXY protocol v2 header")
        if len(self._buffer) < HEADER_BYTES:
            return None
        if self._total == HEADER_BYTES:
            self._total = HEADER_BYTES + _check_fixed(bytes(self._buffer))
            if self._total > HEADER_BYTES:
                return None
        if self.need:
            return None
        return parse(bytes(self._buffer))


def _check_fixed(header: bytes) -> int:
    """Validate bytes 12-15; return the length of the rest."""
    version_command, family, length = struct.unpack_from(">BBH", header, 12)
    if version_command >> 4 != 2:
        raise InvalidProxyHeader(f"PROXY protocol version {version_command >> 4}, not 2")
    if version_command not in (_LOCAL, _PROXY):
        raise InvalidProxyHeader(f"unknown PROXY command {version_command & 0x0F}")
    if version_command == _PROXY:
        needed = _ADDRESS_BYTES.get(family)
        if needed is None:
            raise InvalidProxyHeader(
                f"address family/transport 0x{family:02x}: only TCP over IPv4 or IPv6 is relayed"
            )
        if length < needed:
            raise InvalidProxyHeader(f"address block of {length} bytes, {needed} needed")
    if HEADER_BYTES + length > MAX_HEADER_BYTES:
        raise InvalidProxyHeader(f"PROXY header of {HEADER_BYTES + length} bytes is too long")
    return int(length)


def parse(header: bytes) -> ProxyHeader:
    """Decode one complete header (exactly its bytes)."""
    if len(header) < HEADER_BYTES or header[: len(SIGNATURE)] != SIGNATURE:
        raise InvalidProxyHeader("not a PROXY protocol v2 header")
    length = _check_fixed(header)
    if len(header) != HEADER_BYTES + length:
        raise InvalidProxyHeader("PROXY header length does not match its length field")
    if header[12] == _LOCAL:
        return ProxyHeader("LOCAL")
    family = header[13]
    if family == _TCP4:
        source_ip: IPAddress = ipaddress.IPv4Address(header[16:20])
        destination_ip: IPAddress = ipaddress.IPv4Address(header[20:24])
        ports = 24
    else:
        source_ip = ipaddress.IPv6Address(header[16:32])
        destination_ip = ipaddress.IPv6Address(header[32:48])
        ports = 48
    source_port, destination_port = struct.unpack_from(">HH", header, ports)
    _check_tlvs(header, ports + 4)
    return ProxyHeader("PROXY", (source_ip, source_port), (destination_ip, destination_port))


def _check_tlvs(header: bytes, pos: int) -> None:
    """TLVs (§2.2.7) must tile the rest of the header exactly: type, 2-byte length, value."""
    while pos < len(header):
        if len(header) - pos < 3:
            raise InvalidProxyHeader("truncated TLV in the PROXY header")
        (length,) = struct.unpack_from(">H", header, pos + 1)
        pos += 3 + length
        if pos > len(header):
            raise InvalidProxyHeader("TLV longer than the PROXY header")
