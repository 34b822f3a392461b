"""The PROXY v2 header parser on bytes: what a balancer sends is understood, anything else is
refused, as early as the first wrong byte, and never a byte past the header is asked for."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest

from dicomfw.core.proxy import (
    MAX_HEADER_BYTES,
    SIGNATURE,
    InvalidProxyHeader,
    ProxyHeader,
    ProxyHeaderReader,
    parse,
)
from dicomfw.errors import LocalProtocolError
from tests.harness import associate_rq


def header(
    command: int = 0x21, family: int = 0x11, body: bytes | None = None, tlvs: bytes = b""
) -> bytes:
    if body is None:
        body = bytes((10, 1, 2, 3, 192, 0, 2, 1)) + struct.pack(">HH", 40000, 104)
    body += tlvs
    return SIGNATURE + bytes((command, family)) + struct.pack(">H", len(body)) + body


IPV6_BODY = (
    ip_address("2001:db8::7").packed + ip_address("2001:db8::1").packed + struct.pack(">HH", 5, 104)
)


def read(data: bytes, chunk: int | None = None) -> ProxyHeader:
    """Feed ``data`` the way the relay does: at most ``need`` bytes at a time."""
    reader = ProxyHeaderReader()
    pos = 0
    while True:
        take = reader.need if chunk is None else min(chunk, reader.need)
        result = reader.feed(data[pos : pos + take])
        pos += take
        if result is not None:
            assert pos == len(data) and reader.need == 0
            return result


def test_a_tcp4_header_names_the_real_client_and_the_address_it_called() -> None:
    expected = ProxyHeader("PROXY", (ip_address("10.1.2.3"), 40000), (ip_address("192.0.2.1"), 104))
    assert read(header()) == expected
    assert read(header(), chunk=1) == expected  # byte by byte, as a slow network delivers it


def test_a_tcp6_header_with_tlvs() -> None:
    tlvs = bytes((0x04, 0, 0)) + bytes((0x05, 0, 3)) + b"abc"  # NOOP, UNIQUE_ID
    parsed = read(header(family=0x21, body=IPV6_BODY, tlvs=tlvs))
    assert parsed.source == (ip_address("2001:db8::7"), 5)
    assert parsed.destination == (ip_address("2001:db8::1"), 104)


def test_local_is_the_balancers_own_connection_and_carries_no_address() -> None:
    assert read(header(command=0x20, family=0x00, body=b"")) == ProxyHeader("LOCAL")
    assert read(header(command=0x20)) == ProxyHeader("LOCAL")  # an address block is ignored


def test_the_reader_asks_for_the_fixed_part_then_exactly_the_rest() -> None:
    reader = ProxyHeaderReader()
    assert reader.need == 16
    assert reader.feed(header()[:16]) is None
    assert reader.need == 12
    with pytest.raises(LocalProtocolError):
        reader.feed(bytes(13))


@pytest.mark.parametrize(
    "first_bytes",
    [associate_rq("CT01", "PACS")[:8], b"\x16\x03\x01\x02\x00", b"PROXY TCP4 10.1.2.3 "],
    ids=["dicom-a-associate-rq", "tls-client-hello", "proxy-v1-text"],
)
def test_a_client_without_a_v2_header_is_refused_on_its_first_byte(first_bytes: bytes) -> None:
    with pytest.raises(InvalidProxyHeader):
        ProxyHeaderReader().feed(first_bytes[:1])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (header(command=0x11), "version 1, not 2"),
        (header(command=0x22), "unknown PROXY command 2"),
        (header(family=0x12), "only TCP over IPv4 or IPv6"),  # UDP
        (header(family=0x31, body=bytes(216)), "only TCP over IPv4 or IPv6"),  # UNIX
        (header(family=0x00, body=b""), "only TCP over IPv4 or IPv6"),  # PROXY + UNSPEC
        (header(body=bytes(8)), "address block of 8 bytes, 12 needed"),
        (header(family=0x21, body=bytes(12)), "address block of 12 bytes, 36 needed"),
        (header(tlvs=bytes((0x05, 0))), "truncated TLV"),
        (header(tlvs=bytes((0x05, 0, 9, 1))), "TLV longer than the PROXY header"),
        (header(tlvs=bytes(MAX_HEADER_BYTES)), "too long"),
    ],
    ids=[
        "version-1",
        "command-2",
        "udp",
        "unix",
        "proxy-unspec",
        "short-ipv4",
        "short-ipv6",
        "truncated-tlv",
        "overlong-tlv",
        "too-long",
    ],
)
def test_a_malformed_header_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(InvalidProxyHeader, match=message):
        read(data)
    with pytest.raises(InvalidProxyHeader, match=message):
        parse(data)


def test_the_header_length_bounds_what_is_read() -> None:
    reader = ProxyHeaderReader()
    reader.feed(header()[:14] + struct.pack(">H", 65535)[:1])
    with pytest.raises(InvalidProxyHeader, match="too long"):
        reader.feed(b"\xff")  # 16 + 65535 bytes would be asked for: refused first
