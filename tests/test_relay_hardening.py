"""The fuzzing campaign's findings replayed against the running relay, with real peers.

Finding 1 goes through DCMTK's storescp as the upstream, whose debug log shows what a DCMTK
PACS would have read; findings 2, 3 and 7 through the relay with a pynetdicom PACS, while a
good association on the same firewall goes on.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from pathlib import Path

import pytest

from dicomfw.core.session import AssociationEnded, RequestRefused
from tests.harness import (
    DCMTK,
    VERIFICATION,
    WAIT,
    Firewall,
    Pki,
    associate_rq,
    echo_works,
    free_port,
    read_until_closed,
    rules,
    running_firewall,
    running_process,
    running_scp,
)
from tests.obs_harness import mixed_rules, observed_firewall, scrape, value
from tests.test_core_dimse import _command, _element, _ui

#: A-ABORT from the firewall (service provider) with reason 6, invalid PDU parameter value.
ABORT_INVALID = bytes.fromhex("07000000000400000206")
MOVE_CLASS = "1.2.840.10008.5.1.4.1.2.2.2"


def p_data(command: bytes, context_id: int = 1) -> bytes:
    """One P-DATA-TF with ``command`` as a whole command PDV (PS3.8 §9.3.5)."""
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def us(value: int) -> bytes:
    return struct.pack("<H", value)


#: Command sets with a repeated element that DCMTK reads as its first copy (a C-MOVE-RQ to
#: EVIL_AE) while a last-one-wins reader sees something the rules allow.
SMUGGLED: dict[str, bytes] = {
    "C-MOVE-RQ read as a C-MOVE-RSP": _command(
        _element(0x0002, _ui(VERIFICATION.encode())),
        _element(0x0100, us(0x0021)),
        _element(0x0100, us(0x8021)),
        _element(0x0110, us(7)),
        _element(0x0600, b"EVIL_AE "),
        _element(0x0800, us(0x0101)),
    ),
    "Move Destination EVIL_AE read as WS1": _command(
        _element(0x0002, _ui(MOVE_CLASS.encode())),
        _element(0x0100, us(0x0021)),
        _element(0x0110, us(7)),
        _element(0x0600, b"EVIL_AE "),
        _element(0x0600, b"WS1 "),
        _element(0x0800, us(0x0101)),
    ),
    "C-MOVE SOP class read as Verification": _command(
        _element(0x0002, _ui(MOVE_CLASS.encode())),
        _element(0x0002, _ui(VERIFICATION.encode())),
        _element(0x0100, us(0x0021)),
        _element(0x0110, us(7)),
        _element(0x0600, b"EVIL_AE "),
        _element(0x0800, us(0x0101)),
    ),
}


def associated(port: int, abstract_syntaxes: tuple[str, ...]) -> socket.socket:
    """A raw requester with an established association (CT01 → PACS)."""
    sock = socket.create_connection(("127.0.0.1", port), WAIT)
    sock.settimeout(WAIT)
    sock.sendall(associate_rq("CT01", "PACS", abstract_syntaxes))
    header = sock.recv(6, socket.MSG_WAITALL)
    body = sock.recv(int.from_bytes(header[2:], "big"), socket.MSG_WAITALL)
    assert header[0] == 0x02, header + body  # A-ASSOCIATE-AC
    return sock


@pytest.mark.parametrize("case", SMUGGLED)
def test_finding_1_a_smuggled_c_move_never_reaches_a_dcmtk_upstream(
    tmp_path: Path, pki: Pki, case: str
) -> None:
    port = free_port()
    storescp = (DCMTK / "storescp", "-d", "-aet", "PACS", "-od", tmp_path, port)
    allow = (
        "[{services: [C-ECHO]}, {services: [C-MOVE], sop_classes: "
        "[StudyRootQueryRetrieveInformationModelMove], move_destinations: [WS1]}]"
    )
    with running_process(*storescp, ready_port=port) as pacs:
        with running_firewall(tmp_path, rules(pki, port, upstream_tls=False, allow=allow)) as fw:
            # on the Verification context, which storescp accepts (it has no C-MOVE SCP): it
            # reads the command set whatever its context, which is what the log shows
            with associated(fw.port("front"), (VERIFICATION,)) as sock:
                sock.sendall(p_data(SMUGGLED[case]))
                answer = read_until_closed(sock)
            end = fw.wait_for(lambda e: isinstance(e, AssociationEnded))
            assert echo_works(fw.port("front"))  # the firewall and the PACS serve on
        pacs.terminate()
        _, log = pacs.communicate(timeout=WAIT)
    assert answer == ABORT_INVALID
    assert isinstance(end, AssociationEnded) and end.why == "requester_protocol_error"
    assert "repeated or out of order" in end.detail
    text = log.decode(errors="replace")
    assert "Received Echo Request" in text  # the log shows what storescp read
    assert "Move" not in text and "found twice" not in text, text[-2000:]


def test_finding_2_a_non_ascii_uid_is_an_abort_not_a_traceback(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    bad_uid = p_data(_command(_element(0x0002, b"\xff\x00"), _element(0x0100, us(0x0001))))
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False)) as fw,
    ):
        with associated(fw.port("front"), (VERIFICATION,)) as sock:
            sock.sendall(bad_uid)
            answer = read_until_closed(sock)
        end = fw.wait_for(lambda e: isinstance(e, AssociationEnded))
        assert echo_works(fw.port("front"))
    assert answer == ABORT_INVALID
    assert isinstance(end, AssociationEnded) and "not a UID" in end.detail
    assert "internal_error" not in caplog.text and "Traceback" not in caplog.text


def test_finding_2_on_the_delayed_request_path_the_association_ends_at_once(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The bad command arrives while a request is delayed by its rate: it used to be lost at
    the wakeup, the association hanging until the idle timeout with its slot taken."""
    limits = (
        "{artim_seconds: 2, idle_seconds: 30, max_concurrent_per_ip: 2, "
        "requests_per_minute_per_association: {C-ECHO: 60}}"
    )
    echo = _command(
        _element(0x0002, _ui(VERIFICATION.encode())),
        _element(0x0100, us(0x0030)),
        _element(0x0110, us(1)),
        _element(0x0800, us(0x0101)),
    )
    bad_uid = p_data(_command(_element(0x0002, b"\xff\x00"), _element(0x0100, us(0x0030))))
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False, limits=limits)) as fw,
    ):
        started = time.monotonic()
        with associated(fw.port("front"), (VERIFICATION,)) as sock:
            # 60 pass at once (a minute's burst), the 61st waits a second, the bad one after it
            sock.sendall(p_data(echo) * 61 + bad_uid)
            answer = read_until_closed(sock)
        seconds = time.monotonic() - started
        assert echo_works(fw.port("front"))  # its concurrency slot was given back
        assert echo_works(fw.port("front"))
    assert answer.endswith(ABORT_INVALID)
    assert seconds < 5.0  # not the 30-second idle timeout
    assert "internal_error" not in caplog.text


def refused_requests(count: int) -> bytes:
    """``count`` requests with a command field no DIMSE service has: each refused (0x0211)."""
    return b"".join(
        p_data(
            _command(
                _element(0x0002, _ui(VERIFICATION.encode())),
                _element(0x0100, us(0x0FF0)),
                _element(0x0110, us(number % 65536)),
                _element(0x0800, us(0x0101)),
            )
        )
        for number in range(count)
    )


def test_finding_3_a_requester_that_never_reads_its_refusals_is_no_longer_read(
    tmp_path: Path, pki: Pki
) -> None:
    """The flood's answers pile up at a requester that does not read them: the firewall stops
    reading it, so TCP holds the flood back at its sender instead of in the firewall."""
    limits = "{artim_seconds: 2, idle_seconds: 30, max_refusals_per_association: 0}"
    chunk = refused_requests(1_000)  # 80 KB, 1,000 refusals
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False, limits=limits)) as fw,
    ):
        with associated(fw.port("front"), (VERIFICATION,)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65_536)
            sock.settimeout(2.0)
            sent = 0
            try:
                while sent < 200 * len(chunk):  # 16 MB: far more than any buffer on the way
                    sock.sendall(chunk)
                    sent += len(chunk)
            except TimeoutError:
                pass  # sending blocked: the firewall stopped reading
            association = next(iter(fw.relay.associations)) if fw.relay else None
            assert association is not None
            waiting = fw.call(association.buffered_bytes)
        assert echo_works(fw.port("front"))
    assert sent < 100 * len(chunk), f"the firewall read {sent} bytes without them being read"
    # what the firewall holds for the requester is bounded by backpressure, not by the flood
    assert waiting < 4 * 1_048_576


def test_finding_7_a_refusal_flood_is_cut_off_and_logged_in_bounded_lines(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomfw.events")
    limits = "{artim_seconds: 2, idle_seconds: 30, max_refusals_per_association: 100}"
    with (
        running_scp() as pacs,
        running_firewall(tmp_path, rules(pki, pacs.port, upstream_tls=False, limits=limits)) as fw,
    ):
        with associated(fw.port("front"), (VERIFICATION,)) as sock:
            sock.sendall(refused_requests(300))
            answer = read_until_closed(sock)
        end = fw.wait_for(lambda e: isinstance(e, AssociationEnded))
        assert echo_works(fw.port("front"))
        refusals = refused_events(fw)
    assert isinstance(end, AssociationEnded) and (end.how, end.why) == (
        "aborted",
        "too_many_refusals",
    )
    assert pdu_types(answer) == [0x04] * 100 + [0x07]  # 100 answers, then the A-ABORT
    assert answer.endswith(bytes.fromhex("07000000000400000200"))
    assert sum(event.count for event in refusals) == 100  # every refusal counted
    assert [event.count for event in refusals][:10] == [1] * 10
    lines = [r for r in caplog.records if "request_refused" in r.getMessage()]
    assert len(lines) == 11, [r.getMessage() for r in lines]  # ten, then one with the count
    assert "count=90" in lines[-1].getMessage()
    assert pacs.requests == ["C-ECHO"]  # only the good association's echo: nothing of the flood


def pdu_types(stream: bytes) -> list[int]:
    """The type of each PDU in ``stream`` (PS3.8 §9.3.1 headers), which must end on a PDU."""
    types, pos = [], 0
    while pos < len(stream):
        pdu_type, length = struct.unpack_from(">BxL", stream, pos)
        types.append(pdu_type)
        pos += 6 + length
    assert pos == len(stream)
    return types


def refused_events(fw: Firewall) -> list[RequestRefused]:
    return [event for _, event in fw.events if isinstance(event, RequestRefused)]


def test_finding_7_metrics_and_the_audit_count_every_refusal_of_a_flood_in_bounded_records(
    tmp_path: Path, pki: Pki
) -> None:
    audit = tmp_path / "audit.jsonl"
    extra = f'metrics: {{bind: "127.0.0.1:0"}}\naudit: {{file: {audit}}}\n'
    with (
        running_scp() as pacs,
        observed_firewall(tmp_path, mixed_rules(pki, pacs.port, extra)) as (fw, observability),
    ):
        assert observability.server is not None
        with associated(fw.port("front"), (VERIFICATION,)) as sock:
            sock.sendall(refused_requests(300))  # cut off after the default 100
            read_until_closed(sock)
        fw.wait_for(lambda e: isinstance(e, AssociationEnded))
        samples = scrape(observability.server.port)
    assert value(samples, "dicomfw_refusals_total", reason="unrecognized_operation") == 100
    assert value(samples, "dicomfw_refusals_total", reason="too_many_refusals") == 1
    assert (
        value(samples, "dicomfw_dimse_requests_total", service="unknown", status="failure") == 100
    )
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    refused = [r for r in records if r["event"] == "request_refused"]
    assert [r["count"] for r in refused] == [1] * 10 + [90]
    [ended] = [r for r in records if r["event"] == "association"]
    assert ended["outcome"] == "aborted" and ended["reason"] == "too_many_refusals"
