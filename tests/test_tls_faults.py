"""TLS faults at the listener: odd handshakes, renegotiation, ends mid-PDU, the wrong protocol.

The firewall runs in-process (``running_firewall``) with a mutual-TLS listener in front of a
pynetdicom PACS; clients are pynetdicom, or a memory-BIO TLS client (tests/tlshelpers.py) where
a test needs to control every record: a ClientHello cut short, a renegotiation started with
OpenSSL's own ``SSL_renegotiate``, a close_notify or a TCP reset in the middle of a P-DATA-TF.
Every case ends in bounded time and leaves the firewall serving the next association.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

from dicomfw.core.session import AssociationEnded
from dicomfw.relay import libssl
from dicomfw.relay.server import Refused
from tests.corehelpers import c_store_rq, command_pdv, data_pdv, p_data
from tests.faultproxy import TRICKLE_BYTES, Fault, fault_proxy
from tests.harness import (
    CT,
    VERIFICATION,
    WAIT,
    Firewall,
    Pki,
    associate_rq,
    client_context,
    read_until_closed,
    rules,
    running_firewall,
    running_scp,
    server_context,
    tls_association,
)
from tests.tlshelpers import MemoryBioClient

HANDSHAKE_SECONDS = 1.5
LIMITS = f"{{artim_seconds: 5, idle_seconds: 5, tls_handshake_seconds: {HANDSHAKE_SECONDS}}}"


def tls_rules(pki: Pki, pacs_port: int, listener_tls: bool = True) -> str:
    return rules(
        pki,
        pacs_port,
        listener_tls=listener_tls,
        upstream_tls=False,
        limits=LIMITS,
        allow="[{services: [C-ECHO, C-STORE], sop_classes: [CTImageStorage]}]",
    )


def still_serving(pki: Pki, port: int) -> bool:
    association = tls_association(pki, port)
    if not association.is_established:
        return False
    ok = association.send_c_echo().Status == 0x0000
    association.release()
    return ok


class DicomOverTls(MemoryBioClient):
    """A modality whose TLS records the test controls (``MemoryBioClient`` with DICOM on top)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__(port, context)  # type: ignore[arg-type]
        self.sock.settimeout(WAIT)

    def handshake(self) -> None:
        self.pump(self.connection.do_handshake)

    def send(self, data: bytes) -> None:
        self.connection.write(data)
        self.sock.sendall(self.outgoing.read())

    def read_pdu(self) -> bytes:
        header = self.pump(lambda: self.connection.read(6))
        body = bytearray()
        length = struct.unpack(">L", header[2:6])[0]
        while len(body) < length:
            wanted = length - len(body)
            body += self.pump(lambda: self.connection.read(wanted))  # noqa: B023 (called now)
        return header + bytes(body)

    def associate(self) -> None:
        self.send(associate_rq("CT01", "PACS", (VERIFICATION, CT)))
        assert self.read_pdu()[0] == 0x02, "no A-ASSOCIATE-AC"

    def reset(self) -> None:
        """Close with a TCP RST (``SO_LINGER`` 0), no TLS close_notify."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close_notify_and_close(self) -> None:
        """A TLS close_notify, then FIN: the orderly end of TLS, in the middle of a PDU."""
        with contextlib.suppress(ssl.SSLWantReadError):  # not waiting for the firewall's
            self.connection.unwrap()
        self.sock.sendall(self.outgoing.read())
        self.sock.close()


def modality_context(pki: Pki, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = client_context(pki, pki.modality)
    context.check_hostname = False
    if maximum is not None:
        context.maximum_version = maximum
    return context


def ended(firewall: Firewall, since: int) -> list[AssociationEnded | Refused]:
    return [
        event
        for _, event in firewall.events[since:]
        if isinstance(event, AssociationEnded | Refused)
    ]


# ---- handshakes -------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_handshake_split_into_single_bytes_still_associates(
    tmp_path: Path, pki: Pki, direction: str
) -> None:
    """The first ``TRICKLE_BYTES`` of the handshake, the whole ClientHello (up), or the
    ServerHello and what follows it (down), arrive one byte per TCP segment: the handshake and
    then the association complete as usual."""
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, tls_rules(pki, pacs.port)) as firewall,
        fault_proxy(
            firewall.port("front"), lambda _: Fault("trickle", direction, TRICKLE_BYTES)
        ) as proxy,
    ):
        assert still_serving(pki, proxy.port)
        assert proxy.connections[0].passed[direction] > TRICKLE_BYTES


@pytest.mark.parametrize("stalls", ["half way through its ClientHello", "before its second flight"])
def test_a_handshake_that_never_finishes_is_closed_at_the_handshake_timeout(
    tmp_path: Path, pki: Pki, stalls: str
) -> None:
    """Half a ClientHello and then silence; or a whole ClientHello, the firewall's whole flight
    read, and then nothing (no certificate, no Finished). The handshake timeout bounds both,
    not ARTIM, and the firewall goes on serving."""
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, tls_rules(pki, pacs.port)) as firewall,
    ):
        client = DicomOverTls(firewall.port("front"), modality_context(pki))
        with pytest.raises(ssl.SSLWantReadError):
            client.connection.do_handshake()
        hello = client.outgoing.read()
        started = time.monotonic()
        client.sock.sendall(hello if stalls == "before its second flight" else hello[:100])
        answer = read_until_closed(client.sock)
        seconds = time.monotonic() - started
        client.sock.close()
        refused = firewall.wait_for(lambda event: isinstance(event, Refused))
        assert still_serving(pki, firewall.port("front"))
    # The firewall's handshake records when it had a whole ClientHello, nothing otherwise.
    assert answer[:1] == (b"\x16" if stalls == "before its second flight" else b"")
    assert HANDSHAKE_SECONDS - 0.1 <= seconds < HANDSHAKE_SECONDS + 3
    assert isinstance(refused, Refused) and refused.cause == "timeout"


# ---- renegotiation ------------------------------------------------------------------------------


def renegotiate(connection: ssl.SSLObject) -> None:
    """Start a TLS 1.2 renegotiation from the client (``SSL_renegotiate``: ``ssl`` has no API
    for it); the next ``do_handshake`` sends the new ClientHello."""
    lib = libssl.LIBSSL
    path = libssl._mapped_libssl()
    if lib is None or path is None:
        pytest.skip("libssl's objects cannot be reached from this interpreter")
    handle = libssl.connection_handle(lib, connection)
    assert handle
    start = ctypes.CDLL(path).SSL_renegotiate
    start.restype, start.argtypes = ctypes.c_int, [ctypes.c_void_p]
    assert start(handle) == 1


#: OpenSSL 3's SSL_OP_ALLOW_CLIENT_RENEGOTIATION (``ssl`` has no name for it).
ALLOW_CLIENT_RENEGOTIATION = 1 << 8


def test_the_renegotiation_the_next_test_attempts_works_with_a_server_that_allows_it(
    pki: Pki,
) -> None:
    """The control for the refusal below: against a TLS 1.2 server that allows client
    renegotiation, the same client renegotiates and goes on talking."""
    context = server_context(pki, pki.pacs)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.options = (context.options & ~ssl.OP_NO_RENEGOTIATION) | ALLOW_CLIENT_RENEGOTIATION
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.settimeout(WAIT)
                while data := tls.recv(100):
                    tls.sendall(data)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        client = DicomOverTls(listener.getsockname()[1], modality_context(pki))
        client.handshake()
        renegotiate(client.connection)
        client.pump(client.connection.do_handshake)  # the server, reading, answers it
        client.send(b"after")
        assert client.pump(lambda: client.connection.read(5)) == b"after"
        client.sock.close()
    finally:
        listener.close()
        server.join(WAIT)


def test_a_tls_1_2_renegotiation_is_refused_and_the_association_ends_cleanly(
    tmp_path: Path, pki: Pki
) -> None:
    """Client-initiated renegotiation costs the server a handshake's CPU per request and has
    a history of attacks; ``relay/tls.py`` refuses it (``OP_NO_RENEGOTIATION``). Mid-association
    the refusal ends that association cleanly (the PACS gets an A-ABORT, nothing is half
    stored), and the firewall goes on serving."""
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, tls_rules(pki, pacs.port)) as firewall,
    ):
        client = DicomOverTls(firewall.port("front"), modality_context(pki, ssl.TLSVersion.TLSv1_2))
        client.handshake()
        assert client.connection.version() == "TLSv1.2"
        client.associate()
        since = len(firewall.events)
        renegotiate(client.connection)
        with pytest.raises(ssl.SSLError) as refusal:
            client.pump(client.connection.do_handshake)
        client.sock.close()
        end = firewall.wait_for(lambda event: isinstance(event, AssociationEnded))
        assert still_serving(pki, firewall.port("front"))
    assert "RENEGOTIATION" in str(refusal.value).upper()
    assert ended(firewall, since)[:1] == [end]
    assert isinstance(end, AssociationEnded) and end.how == "aborted"
    assert pacs.stored == []


# ---- the end of TLS in the middle of a P-DATA-TF ------------------------------------------------


@pytest.mark.parametrize("ending", ["close_notify", "tcp_reset"])
def test_tls_ending_in_the_middle_of_a_p_data_tf_aborts_the_association_and_stores_nothing(
    tmp_path: Path, pki: Pki, ending: str
) -> None:
    """A C-STORE's data set PDU cut off half way by a TLS close_notify, or by a TCP reset: the
    firewall aborts toward the PACS, which stores nothing and answers nothing, in bounded time."""
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, tls_rules(pki, pacs.port)) as firewall,
    ):
        client = DicomOverTls(firewall.port("front"), modality_context(pki))
        client.handshake()
        client.associate()
        command = p_data(command_pdv(3, c_store_rq(1)))
        data_set = p_data(data_pdv(3, b"\x08\x00\x16\x00" + bytes(4_000), last=True))
        client.send(command + data_set[: len(data_set) // 2])
        started = time.monotonic()
        if ending == "close_notify":
            client.close_notify_and_close()
        else:
            client.reset()
        end = firewall.wait_for(lambda event: isinstance(event, AssociationEnded))
        seconds = time.monotonic() - started
        assert still_serving(pki, firewall.port("front"))
    assert isinstance(end, AssociationEnded)
    assert (end.how, end.why) == ("aborted", "requester_connection_lost")
    assert seconds < 2.0
    assert pacs.stored == []


# ---- the wrong protocol -------------------------------------------------------------------------


def test_plain_dicom_to_a_tls_listener_is_refused_before_any_dicom_is_read(
    tmp_path: Path, pki: Pki
) -> None:
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, tls_rules(pki, pacs.port)) as firewall,
    ):
        with socket.create_connection(("127.0.0.1", firewall.port("front")), WAIT) as sock:
            sock.settimeout(WAIT)
            sock.sendall(associate_rq("CT01", "PACS"))
            answer = read_until_closed(sock)
        refused = firewall.wait_for(lambda event: isinstance(event, Refused))
        assert still_serving(pki, firewall.port("front"))
    assert not answer.startswith(b"\x02")  # no association, plain or otherwise
    assert isinstance(refused, Refused)
    assert (refused.why, refused.cause) == ("tls_handshake_failed", "not_tls")
    assert pacs.requests == ["C-ECHO"]


def test_tls_to_a_plain_listener_is_an_unrecognized_pdu_and_the_handshake_fails(
    tmp_path: Path, pki: Pki
) -> None:
    """A TLS ClientHello starts with 0x16, which is no PDU type: the firewall aborts (PS3.8
    reason 1, unrecognized PDU) and closes; the client's handshake fails on what it got."""
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, tls_rules(pki, pacs.port, listener_tls=False)) as firewall,
    ):
        client = DicomOverTls(firewall.port("front"), modality_context(pki))
        with pytest.raises((ssl.SSLError, AssertionError)):
            client.handshake()
        client.sock.close()
        end = firewall.wait_for(lambda event: isinstance(event, AssociationEnded))
    assert isinstance(end, AssociationEnded)
    assert (end.how, end.why) == ("aborted", "requester_protocol_error")
    assert pacs.requests == []
