"""Malformed input ends its own connection cleanly; a concurrent good association completes."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomfw.core.session import AssociationEnded, Command, Session, Side, State
from dicomfw.relay.server import Association, Refused
from tests.harness import (
    PEERS,
    WAIT,
    Pki,
    associate_rq,
    ct_image,
    echo_works,
    read_until_closed,
    rules,
    running_firewall,
    running_scp,
    scu,
    tls_association,
)

LIMITS = "{artim_seconds: 1, idle_seconds: 30, max_pdu_bytes: 65536}"


def abort_pdu(reason: int) -> bytes:
    """A-ABORT from the service provider (source 2) with ``reason`` (PS3.8 Table 9-26)."""
    return bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, reason))


def send_then_read(port: int, data: bytes, *, half_close: bool = False) -> tuple[bytes, float]:
    """Send raw bytes; return what came back before the firewall closed, and how long it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), WAIT) as sock:
        sock.settimeout(WAIT)
        if data:
            sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock), time.monotonic() - started


CASES: dict[str, tuple[bytes, bool, Callable[[bytes], bool]]] = {
    # name: (bytes sent, half-close after sending, what the answer must be)
    "unknown-pdu-type": (
        bytes((0x09, 0, 0, 0, 0, 4, 1, 2, 3, 4)),
        False,
        lambda answer: answer == abort_pdu(1),
    ),
    "p-data-before-association": (
        bytes((0x04, 0, 0, 0, 0, 6, 0, 0, 0, 2, 1, 3)),
        False,
        lambda answer: answer == abort_pdu(2),
    ),
    "length-over-the-limit": (
        struct.pack(">BxL", 0x01, 50_000_000) + b"\0" * 64,
        False,
        lambda answer: answer == abort_pdu(6),
    ),
    "truncated-pdu": (associate_rq("CT01", "PACS")[:40], True, lambda answer: answer == b""),
    "silent-client-hits-artim": (b"", False, lambda answer: answer == b""),
    "garbage-association-request": (
        struct.pack(">BxL", 0x01, 20) + b"\xff" * 20,
        False,
        lambda answer: answer[:1] == b"\x07",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_ends_its_connection_while_a_good_association_completes(
    tmp_path: Path, pki: Pki, case: str
) -> None:
    data, half_close, answer_ok = CASES[case]
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, rules(pki, pacs.port, upstream_tls=False, limits=LIMITS)
        ) as firewall,
    ):
        good = scu("CT01").associate("127.0.0.1", firewall.port("front"), ae_title="PACS")
        assert good.is_established
        answer, seconds = send_then_read(firewall.port("front"), data, half_close=half_close)
        assert good.send_c_store(ct_image(seed=5)).Status == 0x0000
        good.release()
    assert answer_ok(answer), answer
    assert seconds < 5.0  # closed by the firewall (ARTIM is 1 s), not by our own timeout
    assert len(pacs.stored) == 1


def test_garbage_instead_of_a_tls_client_hello_is_closed(tmp_path: Path, pki: Pki) -> None:
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, rules(pki, pacs.port, listener_tls=True, upstream_tls=False, limits=LIMITS)
        ) as firewall,
    ):
        port = firewall.port("front")
        good = tls_association(pki, port)
        assert good.is_established
        answer, seconds = send_then_read(port, b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 200)
        refused = firewall.wait_for(lambda e: isinstance(e, Refused))
        assert good.send_c_store(ct_image(seed=6)).Status == 0x0000
        good.release()
    assert not answer.startswith(b"\x02")  # certainly no association
    assert seconds < 5.0
    assert isinstance(refused, Refused) and refused.why == "tls_handshake_failed"
    assert len(pacs.stored) == 1


def test_a_silent_client_on_a_tls_listener_is_closed_at_the_handshake_timeout(
    tmp_path: Path, pki: Pki
) -> None:
    limits = "{artim_seconds: 30, idle_seconds: 30, tls_handshake_seconds: 1}"
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, rules(pki, pacs.port, listener_tls=True, upstream_tls=False, limits=limits)
        ) as firewall,
    ):
        answer, seconds = send_then_read(firewall.port("front"), b"")  # no ClientHello, ever
        refused = firewall.wait_for(lambda e: isinstance(e, Refused))
        good = tls_association(pki, firewall.port("front"))
        assert good.is_established and good.send_c_echo().Status == 0x0000  # others are served
        good.release()
    assert answer == b""
    assert 0.9 <= seconds < 5.0  # the handshake timeout, not ARTIM (30 s) nor ours (WAIT)
    assert isinstance(refused, Refused)
    assert (refused.why, refused.cause) == ("tls_handshake_failed", "timeout")


def test_a_bad_pdv_in_the_data_phase_aborts_both_sides(tmp_path: Path, pki: Pki) -> None:
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False)) as firewall,
    ):
        with socket.create_connection(("127.0.0.1", firewall.port("front")), WAIT) as sock:
            sock.settimeout(WAIT)
            sock.sendall(associate_rq("CT01", "PACS"))
            header = sock.recv(6, socket.MSG_WAITALL)
            assert header[0] == 0x02
            sock.recv(struct.unpack(">L", header[2:])[0], socket.MSG_WAITALL)  # rest of the AC
            # A command PDV on presentation context 99, which was never negotiated.
            sock.sendall(struct.pack(">BxLLBB", 0x04, 8, 4, 99, 0x03) + b"\0\0")
            answer = read_until_closed(sock)
        ended = firewall.wait_for(lambda e: isinstance(e, AssociationEnded))
        assert echo_works(firewall.port("front"))
    assert answer == abort_pdu(5)  # unexpected PDU parameter
    assert isinstance(ended, AssociationEnded) and ended.why == "requester_protocol_error"
    assert pacs.requests == ["C-ECHO"]  # only the later, good association's


def test_an_idle_association_is_aborted_on_both_sides(tmp_path: Path, pki: Pki) -> None:
    limits = "{artim_seconds: 5, idle_seconds: 0.5}"
    with (
        running_scp() as pacs,
        running_firewall(
            tmp_path, rules(pki, pacs.port, upstream_tls=False, limits=limits)
        ) as firewall,
    ):
        association = scu("CT01").associate("127.0.0.1", firewall.port("front"), ae_title="PACS")
        assert association.is_established
        ended = firewall.wait_for(lambda e: isinstance(e, AssociationEnded))
        deadline = time.monotonic() + WAIT
        while association.is_established and time.monotonic() < deadline:
            time.sleep(0.02)
    assert isinstance(ended, AssociationEnded) and ended.why == "idle_timeout"
    assert association.is_aborted
    assert pacs.requests == []


class BuggySession(Session):
    """Fails as a bug would, once BUGGY's association is up."""

    def receive(self, side: Side, data: bytes) -> list[Command]:
        if self.calling_ae == "BUGGY" and self.state is State.ESTABLISHED:
            raise RuntimeError("a bug in the firewall")
        return super().receive(side, data)


def test_an_internal_error_aborts_only_that_association(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Association.connection_made

    def connection_made(self: Association, transport: asyncio.BaseTransport) -> None:
        # The relay may be compiled (setup.py), so Session cannot be patched in place: each
        # association's fresh session is swapped for the faulty subclass, built alike.
        original(self, transport)
        fresh = self._session
        assert fresh is not None
        limits = self._runtime.config.limits
        self._session = BuggySession(
            fresh.policy,
            fresh.listener,
            fresh.address,
            fresh.identity,
            limits.max_pdu_bytes,
            self._gate,
            self._loop.time,
        )

    monkeypatch.setattr(Association, "connection_made", connection_made)
    peers = PEERS + "  - {ae_title: BUGGY, networks: [127.0.0.1]}\n"
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False, peers=peers)) as fw,
    ):
        good = scu("CT01").associate("127.0.0.1", fw.port("front"), ae_title="PACS")
        bad = scu("BUGGY").associate("127.0.0.1", fw.port("front"), ae_title="PACS")
        assert good.is_established and bad.is_established
        assert not bad.send_c_echo()  # no answer: aborted, never a made-up success
        ended = fw.wait_for(lambda e: isinstance(e, AssociationEnded))
        assert good.send_c_store(ct_image(seed=8)).Status == 0x0000
        good.release()
    assert bad.is_aborted
    assert isinstance(ended, AssociationEnded) and ended.why == "internal_error"
    assert len(pacs.stored) == 1
